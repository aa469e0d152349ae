"""The history seam, one contract: SqliteHistory and RedisHistory (a real redis-server) behave the same."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from relay.config import MAX_LAST_VALUE_TTL_MS
from relay.envelope import Envelope, Filter
from relay.history import Appended, Idempotency, IdempotencyConflict, Previous, Session
from relay.redis_history import RedisHistory
from relay.sqlite_history import SqliteHistory

WINDOW = 60_000


@pytest.fixture(params=["sqlite", "redis"])
def make(request, tmp_path):
    """``make(**options)``: a fresh store of the kind under test (a second call: the same store, reopened)."""
    made = []

    def build(window_ms: int = WINDOW, last_value_ttl_ms: int = 3_600_000, max_entries: int = 200_000):
        if request.param == "sqlite":
            store = SqliteHistory(
                str(tmp_path / "history.db"),
                window_ms=window_ms,
                last_value_ttl_ms=last_value_ttl_ms,
                max_entries=max_entries,
            )
        else:
            server = getattr(request, "_redis", None) or request.getfixturevalue("redis_server")
            request._redis = server
            store = RedisHistory(
                server.url,
                prefix="t",
                window_ms=window_ms,
                last_value_ttl_ms=last_value_ttl_ms,
                max_entries=max_entries,
            )
        made.append(store)
        return store

    build.kind = request.param
    yield build
    for store in made:
        store.close()


def envelope(n: int, *, channels=("system:announcements",), at: int | None = None, **flt) -> Envelope:
    return Envelope(
        "ANNOUNCEMENT",
        {"n": n},
        Filter(channels=frozenset(channels), **{k: frozenset(v) for k, v in flt.items()}),
        **({"at": at} if at is not None else {}),
    )


def test_offsets_are_strictly_increasing_in_one_epoch_and_the_head_follows(make):
    store = make()
    epoch, head = store.head()
    assert head == 0 and epoch
    placed = [store.append(envelope(n)) for n in range(5)]
    assert all(isinstance(p, Appended) and p.epoch == epoch for p in placed)
    assert [p.offset for p in placed] == [1, 2, 3, 4, 5]
    assert store.head() == (epoch, 5)


def test_read_returns_whole_envelopes_after_an_offset_in_order(make):
    store = make()
    sent = [envelope(n, user_ids=["bob"]) for n in range(4)]
    for e in sent:
        store.append(e)
    got = store.read(1, 10)
    assert [e.offset for e in got] == [2, 3, 4]
    assert [(e.id, e.data, e.filter) for e in got] == [(e.id, e.data, e.filter) for e in sent[1:]]
    assert got[0].frame() == sent[1].placed(got[0].epoch, 2).frame()  # byte for byte the live frame
    assert [e.offset for e in store.read(0, 2)] == [1, 2] and store.read(4, 10) == []
    assert store.oldest() == 1


def test_last_values_keep_the_newest_per_channel_and_respect_their_age(make):
    store = make()
    store.append(envelope(1, channels=["clinic:c-1:queue", "clinic:c-2:queue"]))
    store.append(envelope(2, channels=["clinic:c-1:queue"]))
    store.append(envelope(3, channels=["system:announcements"]))
    last = store.last_values(["clinic:c-1:queue", "clinic:c-2:queue", "clinic:c-9:queue"], 60_000)
    assert numbers(last) == {"clinic:c-1:queue": [2], "clinic:c-2:queue": [1]}
    assert last["clinic:c-1:queue"][0].offset == 2
    store.append(envelope(4, channels=["clinic:c-3:queue"], at=int(time.time() * 1000) - 120_000))
    assert store.last_values(["clinic:c-3:queue"], 60_000) == {}  # older than asked for


def test_the_longest_last_value_age_the_settings_allow_is_kept_read_and_trimmed(make):
    """WS_LAST_VALUE_TTL_MS's ceiling: both stores take it (an age past 2**63 ms overflowed SQLite's
    integers on every trim and read, and Redis's PEXPIRE on every append)."""
    store = make(last_value_ttl_ms=MAX_LAST_VALUE_TTL_MS)
    store.append(envelope(1, channels=["clinic:c-1:queue"]))
    store.trim(int(time.time() * 1000))
    assert numbers(store.last_values(["clinic:c-1:queue"], MAX_LAST_VALUE_TTL_MS)) == {"clinic:c-1:queue": [1]}


def numbers(last: dict[str, list[Envelope]]) -> dict[str, list[int]]:
    return {name: [e.data["n"] for e in values] for name, values in last.items()}


def test_last_values_are_kept_per_audience_newest_first(make):
    """A broadcast to some of a channel's subscribers (a user, a role) replaces only their value."""
    store = make()
    queue = ["clinic:c-1:queue"]
    store.append(envelope(1, channels=queue))
    store.append(envelope(2, channels=queue, user_ids=["bob"]))
    store.append(envelope(3, channels=queue + ["clinic:c-2:queue"], roles=["admin"]))
    store.append(envelope(4, channels=["clinic:c-1:queue", "system:announcements"]))  # everyone's again
    store.append(envelope(5, channels=queue, roles=["admin"]))
    last = store.last_values(queue + ["clinic:c-2:queue"], 60_000)
    assert numbers(last) == {"clinic:c-1:queue": [5, 4, 2], "clinic:c-2:queue": [3]}
    assert [e.filter for e in last["clinic:c-1:queue"]] == [
        Filter(channels=frozenset(queue), roles=frozenset(["admin"])),
        Filter(channels=frozenset(["clinic:c-1:queue", "system:announcements"])),
        Filter(channels=frozenset(queue), user_ids=frozenset(["bob"])),
    ]


def test_a_channel_keeps_its_most_recent_audiences(make):
    from relay.history import LAST_AUDIENCES

    store = make()
    queue = ["clinic:c-1:queue"]
    store.append(envelope(0, channels=queue, user_ids=["first"]))
    store.append(envelope(1, channels=queue))
    for n in range(2, LAST_AUDIENCES + 1):  # one audience too many: the one broadcast to longest ago goes
        store.append(envelope(n, channels=queue, user_ids=[f"user-{n}"]))
    kept = numbers(store.last_values(queue, 60_000))["clinic:c-1:queue"]
    assert kept == list(range(LAST_AUDIENCES, 0, -1))  # "first" went, everyone's (1) stayed
    store.append(envelope(99, channels=queue))  # the everyone audience again: room for no one new
    assert len(store.last_values(queue, 60_000)["clinic:c-1:queue"]) == LAST_AUDIENCES


def test_last_values_are_kept_for_the_release_before_and_what_it_writes_is_read(make):
    """Before audiences, a channel kept one value (SQLite table last_values, Redis key last:<channel>),
    and workers of that release (a rolling deploy, a rollback) read only that: it is still written.
    What such a worker writes there is read too, until it expires."""
    store = make()
    store.append(envelope(1, channels=["clinic:c-1:queue"]))
    store.append(envelope(2, channels=["clinic:c-1:queue"], user_ids=["bob"]))
    time.sleep(0.01)  # a moment after the epoch began (Redis tells its values from before by their time)
    now = int(time.time() * 1000)
    if make.kind == "sqlite":
        with sqlite3.connect(store.path) as db:
            kept = db.execute("SELECT offset FROM last_values WHERE channel = 'clinic:c-1:queue'").fetchone()[0]
    else:
        kept = int(store._client.get("t:last:clinic:c-1:queue").split(b" ")[0])
    assert kept == 2  # the latest to the channel, whatever its audience, as the release before keeps it

    def written_by_the_release_before(channel: str, offset: int, at: int, n: int) -> None:
        text = json.dumps(envelope(n, channels=[channel]).placed("e", offset).to_json())
        if make.kind == "sqlite":
            with sqlite3.connect(store.path) as db:
                db.execute("INSERT OR REPLACE INTO last_values VALUES (?, ?, ?, ?)", (channel, offset, at, text))
        else:
            store._client.hincrby("t:stream:meta", "head", 1)  # its append took the offset
            store._client.set(f"t:last:{channel}", f"{offset} {at} {text}")

    written_by_the_release_before("clinic:c-1:queue", 3, now, 3)
    written_by_the_release_before("clinic:c-2:queue", 4, now - 120_000, 4)  # too old
    last = store.last_values(["clinic:c-1:queue", "clinic:c-2:queue"], 60_000)
    assert numbers(last) == {"clinic:c-1:queue": [3, 2, 1]}


def test_an_idempotency_key_appends_once_and_gives_the_first_answer(make):
    store = make()
    key = Idempotency.of("api", "k-1", "ANNOUNCEMENT", {"n": 1}, {})
    first = store.append(envelope(1), idempotency=key)
    assert isinstance(first, Appended)
    again = store.append(envelope(1), idempotency=key)
    assert isinstance(again, Previous) and again.offset == first.offset and again.answer is None
    store.complete(key, {"ok": True, "delivered": 3, "id": again.envelope_id, "offset": first.offset})
    assert store.previous(key).answer["delivered"] == 3
    assert store.append(envelope(1), idempotency=key).answer["delivered"] == 3
    assert store.head()[1] == first.offset  # nothing more was appended
    other = Idempotency.of("api", "k-1", "ANNOUNCEMENT", {"n": 2}, {})  # same key, another broadcast
    with pytest.raises(IdempotencyConflict):
        store.append(envelope(2), idempotency=other)
    scoped = Idempotency.of("admin:alice", "k-1", "ANNOUNCEMENT", {"n": 1}, {})  # same key, someone else
    assert isinstance(store.append(envelope(1), idempotency=scoped), Appended)


def test_sessions_are_saved_loaded_extended_and_forgotten(make):
    store = make()
    now = int(time.time() * 1000)
    store.save_sessions([Session("c-1", "bob", ("a", "b")), Session("c-2", "carol", ())], now + 60_000)
    assert store.load_session("c-1") == Session("c-1", "bob", ("a", "b"))
    store.save_sessions([Session("c-3", "erin", ("x",))], now + 300)
    store.touch_sessions(["c-2"], now + 300)
    time.sleep(0.5)
    assert store.load_session("c-3") is None and store.load_session("c-2") is None  # expired
    assert store.load_session("c-1") is not None
    store.delete_sessions(["c-1"])
    assert store.load_session("c-1") is None and store.load_session("nobody") is None


def test_a_shared_store_says_whether_a_sessions_socket_was_open_when_written(make):
    """The embedded store, one worker's at a time, answers False (see Session): it keeps its schema."""
    store = make()
    expires = int(time.time() * 1000) + 60_000
    store.save_sessions([Session("c-1", "bob", ("a",), open=True), Session("c-2", "bob", ("a",))], expires)
    assert store.load_session("c-1").open is (make.kind == "redis") and store.load_session("c-2").open is False
    store.save_sessions([Session("c-1", "bob", ("a",), open=False)], expires)  # then it closed
    assert store.load_session("c-1") == Session("c-1", "bob", ("a",), open=False)


def test_the_embedded_sessions_table_is_still_the_one_the_previous_release_writes(tmp_path):
    """During the reload that deploys a release, the old worker's drain writes its sessions with the old
    code into the same file (and a rollback goes on writing it): a changed table would refuse them."""
    store = SqliteHistory(str(tmp_path / "history.db"), window_ms=WINDOW, last_value_ttl_ms=3_600_000)
    store.save_sessions([Session("c-1", "bob", ("a",), open=True)], int(time.time() * 1000) + 60_000)
    store.close()
    db = sqlite3.connect(tmp_path / "history.db")
    previous = "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)"  # as the release before this one writes
    db.execute(previous, ("c-2", "bob", '["a"]', int(time.time() * 1000) + 60_000))
    db.commit()
    db.close()
    store = SqliteHistory(str(tmp_path / "history.db"), window_ms=WINDOW, last_value_ttl_ms=3_600_000)
    assert store.load_session("c-2") == Session("c-2", "bob", ("a",))
    store.close()


def test_trim_drops_broadcasts_older_than_the_window_and_keeps_the_rest(make):
    store = make(window_ms=300)
    for n in range(3):
        store.append(envelope(n))
    time.sleep(0.5)  # by the store's clock, which may be its own (Redis's)
    store.append(envelope(9))
    assert store.trim(int(time.time() * 1000)) == 3
    assert [e.offset for e in store.read(0, 10)] == [4] and store.oldest() == 4
    assert store.head()[1] == 4  # offsets are never reused after a trim
    assert isinstance(store.append(envelope(10)), Appended) and store.head()[1] == 5


def test_the_count_bound_holds_whatever_the_rate(make):
    store = make(max_entries=5)
    for n in range(30):
        store.append(envelope(n))
    store.trim(int(time.time() * 1000))
    assert len(store.read(0, 100)) <= 10  # Redis trims approximately (MAXLEN ~); both stay bounded


def test_status_reports_the_stream(make):
    store = make()
    store.append(envelope(1))
    status = store.status()
    assert status["kind"] == make.kind and status["head"] == 1 and status["retained"] == 1
    assert status["oldest"]["offset"] == 1 and status["epoch"] == store.head()[0]


def test_a_lost_store_is_a_new_epoch(make, tmp_path):
    store = make()
    store.append(envelope(1))
    epoch, _ = store.head()
    store.close()
    if make.kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"history.db{suffix}").unlink(missing_ok=True)
    else:
        import redis

        redis.Redis.from_url(_url_of(store)).flushall()
    again = make()
    new_epoch, head = again.head()
    assert new_epoch != epoch and head == 0
    placed = again.append(envelope(2))
    assert placed.epoch == new_epoch and placed.offset == 1


def test_an_embedded_file_last_written_before_this_boot_is_a_new_epoch(tmp_path):
    """A power cut can take a SQLite file's last commits, whose offsets would then be handed out
    again: a file last opened under another boot of the kernel starts a new epoch, once."""
    import sqlite3

    from relay import sqlite_history

    path = str(tmp_path / "history.db")

    def reopened() -> SqliteHistory:
        return SqliteHistory(path, window_ms=WINDOW, last_value_ttl_ms=3_600_000)

    assert sqlite_history.boot_id()  # this is Linux: the check is live, not skipped
    store = reopened()
    for n in range(3):
        store.append(envelope(n))
    epoch, head = store.head()
    store.close()
    store = reopened()  # the same boot (a restart, a reload): the same stream
    assert store.head() == (epoch, head) and len(store.read(0, 10)) == 3
    store.close()

    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = 'an-earlier-boot' WHERE key = 'boot'")
    db.close()
    store = reopened()
    new_epoch, new_head = store.head()
    assert new_epoch != epoch and new_head == head and store.read(0, 10) == []
    assert store.append(envelope(9)).offset == head + 1  # never an offset the lost tail may have had
    store.close()
    store = reopened()  # the next process of this boot keeps it
    assert store.head() == (new_epoch, head + 1)
    store.close()


def test_starting_over_forgets_the_last_values_which_may_have_gone_back_too(make):
    """Redis back from a snapshot: its last values are the snapshot's, older than what clients were
    shown; the resync that follows must not bring them back as the current state (review)."""
    store = make()
    store.append(envelope(1, channels=["clinic:c-1:queue"]))
    epoch, _ = store.head()
    store.start_over(epoch)
    assert store.last_values(["clinic:c-1:queue"], 60_000) == {}
    store.append(envelope(2, channels=["clinic:c-1:queue"]))
    assert numbers(store.last_values(["clinic:c-1:queue"], 60_000)) == {"clinic:c-1:queue": [2]}


def test_starting_over_drops_the_stream_under_a_new_epoch_once(make):
    """The stream came back older under the same epoch: a new one, so its old offsets are refused."""
    store = make()
    for n in range(3):
        store.append(envelope(n))
    epoch, head = store.head()
    new_epoch, new_head = store.start_over(epoch)
    assert new_epoch != epoch and store.head() == (new_epoch, new_head) and store.read(0, 10) == []
    placed = store.append(envelope(9))
    assert placed.epoch == new_epoch and placed.offset == new_head + 1
    assert [e.offset for e in store.read(new_head, 10)] == [placed.offset]
    # A second worker that noticed the same thing asks with the old epoch: nothing more happens.
    assert store.start_over(epoch) == (new_epoch, new_head + 1)
    assert [e.id for e in store.read(0, 10)] == [store.read(new_head, 1)[0].id]


def test_trim_by_time_drops_a_prefix_never_a_hole_whatever_the_clock_did(make):
    """``at`` is a wall clock that can step back: an old time in the middle must not leave a hole."""
    store = make(window_ms=1000)
    now = int(time.time() * 1000)
    for at in (now, now - 5000, now):  # offset 2 stamped by a clock that had stepped back
        store.append(envelope(at, at=at))
    store.trim(now)
    offsets = [e.offset for e in store.read(0, 10)]
    assert offsets and offsets == list(range(offsets[0], 4))  # whole from wherever it starts


def _url_of(store) -> str:
    kwargs = store._client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def test_a_redis_stream_whose_epoch_was_lost_is_dropped_not_relabelled(redis_server):
    """The meta hash gone but the stream kept (evicted, deleted by hand): a new epoch must not claim the
    old entries as its own, and appends must go on (XADD refuses an id below the stream's last)."""
    import redis

    store = RedisHistory(redis_server.url, prefix="t", window_ms=WINDOW, last_value_ttl_ms=3_600_000)
    try:
        for n in (1, 2, 3):
            store.append(envelope(n))
        old_epoch, _ = store.head()
        redis.Redis.from_url(redis_server.url).delete("t:stream:meta")
        epoch, head = store.head()
        assert epoch != old_epoch and head == 0 and store.read(0, 10) == []
        placed = store.append(envelope(4))
        assert isinstance(placed, Appended) and (placed.epoch, placed.offset) == (epoch, 1)
        redis.Redis.from_url(redis_server.url).delete("t:stream:meta")
        started, head = store.start_over(epoch)  # a worker that noticed the stream went back, too late
        assert started not in (epoch, None) and store.head() == (started, head) and store.read(0, 10) == []
    finally:
        store.close()


def test_a_redis_read_labels_what_it_read_with_that_streams_epoch_even_if_redis_starts_over_meanwhile(redis_server):
    """Redis flushed (and a broadcast appended to the new stream) between any two round trips of a read:
    the envelopes read must carry the epoch of the stream they came from, or a resume would replay the
    new stream's offsets as the old one's (recovery checks each envelope's epoch)."""
    import redis

    store = RedisHistory(redis_server.url, prefix="t", window_ms=WINDOW, last_value_ttl_ms=3_600_000)
    try:
        for n in (1, 2, 3):
            store.append(envelope(n))
        old_epoch, _ = store.head()
        other = redis.Redis.from_url(redis_server.url)
        round_trips = []
        call = store._call

        def starting_over_between_round_trips(fn, *args, **kwargs):
            if round_trips:  # a second round trip of the same read
                other.flushall()
                RedisHistory(redis_server.url, prefix="t", window_ms=WINDOW, last_value_ttl_ms=3_600_000).append(
                    envelope(99)
                )
            round_trips.append(fn)
            return call(fn, *args, **kwargs)

        store._call = starting_over_between_round_trips
        read = store.read(0, 10)
        store._call = call
        new_epoch, _ = store.head()
        assert all(
            (e.epoch, e.data["n"]) in {(old_epoch, 1), (old_epoch, 2), (old_epoch, 3), (new_epoch, 99)} for e in read
        )
        assert read  # it read something, from one stream or the other
        other.close()
    finally:
        store.close()


# -- Redis alone: several hosts' clocks, keys lost one by one ------------------------------------


@pytest.fixture
def redis_history(redis_server):
    store = RedisHistory(redis_server.url, prefix="t", window_ms=WINDOW, last_value_ttl_ms=3_600_000)
    yield store
    store.close()


def test_a_stream_whose_epoch_was_lost_is_not_read_back_as_the_new_epochs(redis_history):
    """Its meta hash evicted or deleted, the stream's entries belong to no epoch: read under the epoch
    claimed next, a worker took them for the new stream's and dropped the new broadcasts at those
    offsets as duplicates (review)."""
    for n in range(3):
        redis_history.append(envelope(n))
    redis_history._client.delete("t:stream:meta")
    assert redis_history.read(0, 10) == []
    new_epoch, head = redis_history.head()
    placed = redis_history.append(envelope(9))
    assert (placed.epoch, placed.offset) == (new_epoch, head + 1)
    assert [e.data["n"] for e in redis_history.read(0, 10)] == [9]


def test_last_values_of_another_epoch_are_not_offered(redis_history):
    redis_history.append(envelope(1, channels=["clinic:c-1:queue"]))
    redis_history._client.delete("t:stream:meta")  # offsets start again from 1: they no longer order
    redis_history.append(envelope(2, channels=["clinic:c-2:queue"]))
    assert redis_history.last_values(["clinic:c-1:queue"], 60_000) == {}


def test_an_old_release_value_of_a_lost_epoch_is_not_offered(redis_history):
    """A last:<channel> key has no epoch: one above the stream's head (its meta hash lost, offsets
    counting from 1 again) cannot be this epoch's, and would outrank every value of it."""
    for n in range(5):
        redis_history.append(envelope(n, channels=["clinic:c-1:queue"]))
    redis_history._client.delete("t:stream:meta")
    redis_history.append(envelope(9, channels=["clinic:c-2:queue"]))
    assert redis_history.last_values(["clinic:c-1:queue"], 60_000) == {}


def test_a_channel_at_its_audience_cap_makes_room_from_another_epoch_first(redis_history):
    """After the meta hash was lost the new epoch's offsets are the lowest: a cap dropping the lowest
    offset deleted each new value as it was written (review)."""
    from relay.history import LAST_AUDIENCES

    for n in range(LAST_AUDIENCES):
        redis_history.append(envelope(n, channels=["clinic:c-1:queue"], user_ids=[f"u{n}"]))
    redis_history._client.delete("t:stream:meta")
    redis_history.append(envelope(100, channels=["clinic:c-1:queue"], user_ids=["newbie"]))
    redis_history.append(envelope(101, channels=["clinic:c-1:queue"]))
    assert numbers(redis_history.last_values(["clinic:c-1:queue"], 60_000)) == {"clinic:c-1:queue": [101, 100]}


def test_the_window_is_kept_by_redis_clock_whatever_a_hosts_clock_says(redis_history):
    """A broadcast stamped by a host whose clock is behind, a trim by one whose clock is ahead: neither
    drops what is still in the window (an entry's time is Redis's, and so is the trim's)."""
    now = int(time.time() * 1000)
    redis_history.append(envelope(1, at=now - 10 * WINDOW))
    redis_history.append(envelope(2))
    assert redis_history.trim(now + 10 * WINDOW) == 0
    assert [e.data["n"] for e in redis_history.read(0, 10)] == [1, 2]


def test_sessions_are_kept_for_the_window_by_this_hosts_clock_not_redis(redis_history, monkeypatch):
    """A host whose clock is behind Redis's gave its sessions an absolute end already past for Redis: they
    vanished as they were written, and every resume there was no_session (review)."""
    behind = time.time() - 150
    monkeypatch.setattr("relay.redis_history.time.time", lambda: behind)
    redis_history.save_sessions([Session("c-1", "bob", ("a",))], int(behind * 1000) + WINDOW)
    redis_history.touch_sessions(["c-1"], int(behind * 1000) + WINDOW)
    assert redis_history.load_session("c-1") == Session("c-1", "bob", ("a",))
