"""The identity watcher without a server: a directory that fails, changes that must not be lost."""

from __future__ import annotations

import gevent

from relay.directory import DirectoryUnavailable, Identity
from relay.revocation import IdentityWatcher
from relay.signouts import SignoutsUnavailable


class Flaky:
    """One change (bob disabled), and a directory whose first ``fails`` reads of users fail."""

    name = "flaky"
    recheck_batch = 100

    def __init__(self, fails: int):
        self.fails = fails

    def changes_since(self, cursor):
        return 1, ([] if cursor == 1 else ["bob"])

    def get_many(self, user_ids):
        if self.fails:
            self.fails -= 1
            raise DirectoryUnavailable("database is locked")
        return {user_id: Identity(user_id, None, None, "nurse", "c-1", active=False) for user_id in user_ids}


def test_a_change_whose_user_could_not_be_read_is_read_again_at_the_next_poll():
    applied = []
    watcher = IdentityWatcher(
        Flaky(fails=1),
        lambda: [],
        lambda user_id, identity: applied.append(user_id),
        recheck_interval=3600,
        poll_interval=0.01,
    )
    watcher.start()
    for _ in range(1000):  # two polls 10 ms apart; up to 10 s on a loaded machine (a hang guard)
        if applied:
            break
        gevent.sleep(0.01)
    gevent.killall(watcher._greenlets)
    assert applied and applied[0] == "bob" and watcher.errors == 1  # was never applied: the cursor had moved on


def test_the_recheck_runs_every_interval_from_the_start_of_the_last_round():
    rounds = []

    class Slow(Flaky):
        def changes_since(self, cursor):
            return 1, []  # only the re-check reads users here

        def get_many(self, user_ids):
            rounds.append(gevent.get_hub().loop.now())
            return {}  # the round then takes half the interval: the watcher's pause after its one batch

    watcher = IdentityWatcher(Slow(fails=0), lambda: ["bob"], lambda *a: None, recheck_interval=1, poll_interval=60)
    watcher.start()
    for _ in range(200):  # four rounds: ~3 s, up to 20 s on a loaded machine (a hang guard)
        if len(rounds) >= 4:
            break
        gevent.sleep(0.1)
    gevent.killall(watcher._greenlets)
    gaps = [b - a for a, b in zip(rounds, rounds[1:], strict=False)]
    # Every 1 s; the old loop waited the interval after the round as well (1.5 s). A loaded machine
    # only stretches gaps, so the shortest one says what the loop asks for.
    assert len(gaps) >= 3 and min(gaps) < 1.25, gaps


def test_the_recheck_reads_each_batch_from_the_sign_out_store_too_and_either_may_fail_alone():
    read: list[list[str]] = []

    def sign_outs(batch):
        read.append(batch)
        if len(read) == 1:
            raise SignoutsUnavailable("Redis is unreachable")

    class Batches(Flaky):
        recheck_batch = 2

        def changes_since(self, cursor):
            return 1, []

    users = ["ann", "bob", "cat"]
    directory = Batches(fails=1)  # the first batch's identities cannot be read: its sign-outs still are
    watcher = IdentityWatcher(
        directory, lambda: users, lambda *a: None, recheck_interval=0.2, poll_interval=60, sign_outs=sign_outs
    )
    watcher.start()
    for _ in range(500):  # a second round has begun (within 5 s: a hang guard, not a timing)
        if len(read) >= 3:
            break
        gevent.sleep(0.01)
    gevent.killall(watcher._greenlets)
    assert read[:3] == [["ann", "bob"], ["cat"], ["ann", "bob"]], read
    assert watcher.errors == 2  # one each, and neither stopped the round
