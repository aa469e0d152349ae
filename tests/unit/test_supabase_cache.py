"""The Supabase directory's cache: lookups overlap, and the fresher answer is the one kept."""

from __future__ import annotations

import gevent
import gevent.event

from relay.directory import Identity
from relay.supabase_directory import SupabaseDirectory

USER = "0b5f3a2c-1d4e-4f60-8a7b-9c0d1e2f3a4b"
ACTIVE = Identity(USER, "n@example.org", "N", "nurse", "c-1")
BANNED = Identity(USER, "n@example.org", "N", "nurse", "c-1", active=False)


def test_a_slow_lookup_that_saw_the_user_before_a_ban_does_not_overwrite_the_recheck_that_saw_it():
    directory = SupabaseDirectory("http://127.0.0.1:9", "service-key")  # never called: fetch is replaced
    answered = gevent.event.Event()

    def slow_fetch(user_id):  # read before the ban, answered after the re-check
        answered.wait(5)
        return ACTIVE

    directory.fetch = slow_fetch
    lookup = gevent.spawn(directory.get, USER)
    gevent.sleep(0.01)
    # The periodic re-check (get_many) begins after the lookup and answers first: banned.
    directory._remember(USER, BANNED, directory._read_begins())
    answered.set()
    assert lookup.get(timeout=5) == BANNED  # the fresher answer, for this lookup too
    assert directory.get(USER) == BANNED  # and the cache keeps it: new sockets are refused


def test_a_later_lookup_replaces_an_earlier_answer():
    directory = SupabaseDirectory("http://127.0.0.1:9", "service-key")
    directory._remember(USER, BANNED, directory._read_begins())
    directory.fetch = lambda user_id: ACTIVE  # the ban was lifted
    directory._cache.clear()  # (expired)
    assert directory.get(USER) == ACTIVE
    assert directory._remember(USER, BANNED, 0) == ACTIVE  # an answer older than the cached one is dropped
