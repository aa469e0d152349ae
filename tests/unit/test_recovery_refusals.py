"""Recovery's refusals without a server: a real SqliteHistory in a temporary file, a primed sequencer."""

import time

import pytest

from relay.envelope import Envelope, Filter
from relay.history import HistoryUnavailable, Session
from relay.recovery import Prepared, Reason, Recovery, ResumeRequest
from relay.sequencer import Sequencer
from relay.sessions import SessionKeeper
from relay.sqlite_history import SqliteHistory

ANN = "system:announcements"


@pytest.fixture
def stream(tmp_path):
    history = SqliteHistory(str(tmp_path / "history.db"), window_ms=60_000, last_value_ttl_ms=60_000, max_entries=5)
    yield history
    history.close()


def recovery_over(history, *, max_messages=100):
    epoch, head = history.head()
    sequencer = Sequencer(lambda e: 0, history.read, on_reset=lambda epoch: None)
    sequencer.prime(epoch, head)
    sessions = SessionKeeper(history, window_ms=60_000)
    return Recovery(history, sequencer, sessions, max_messages=max_messages, session_wait=0.0), sequencer


def publish(history, n):
    for i in range(n):
        history.append(Envelope("ANNOUNCEMENT", {"n": i}, Filter()))


def resume(recovery, sequencer, offset, *, user="bob", channels=(ANN,)):
    return recovery.prepare(
        ResumeRequest("c-1", sequencer.epoch, offset),
        user,
        refusal=lambda name: None,
        admits=lambda flt, names: flt.admits(user, "nurse", "clinic-1", names),
    )


def saved(history, channels=(ANN,)):
    history.save_sessions([Session("c-1", "bob", tuple(channels))], int(time.time() * 1000) + 60_000)


def test_missed_broadcasts_the_history_still_has_are_prepared(stream):
    publish(stream, 2)
    start = stream.head()[1]
    publish(stream, 3)
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    prepared = resume(recovery, sequencer, start)
    assert isinstance(prepared, Prepared) and [e.place for e in prepared.missed] == [start + 1, start + 2, start + 3]


def test_missed_broadcasts_the_history_no_longer_has_are_history_gone(stream):
    publish(stream, 2)
    start = stream.head()[1]
    publish(stream, 8)  # 10 in all; the history keeps 5
    stream.trim(int(time.time() * 1000))
    assert stream.oldest() > start + 1
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    assert resume(recovery, sequencer, start) == Reason.GONE


def test_a_history_with_an_offset_missing_in_the_middle_is_history_gone_not_a_partial_replay(stream):
    """Trimmed between two reads, or a hole the store was left with: the replay is not whole, so the
    client must be told (recovered: false), never handed the rest as if it were everything."""
    start = stream.head()[1]
    publish(stream, 4)
    with stream._lock:
        stream._conn().execute("DELETE FROM history WHERE offset = ?", (start + 2,))
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    assert resume(recovery, sequencer, start) == Reason.GONE
    assert isinstance(resume(recovery, sequencer, start + 2), Prepared)  # after the hole: whole


def test_more_missed_than_allowed_is_too_many(stream):
    start = stream.head()[1]
    publish(stream, 4)
    saved(stream)
    recovery, sequencer = recovery_over(stream, max_messages=3)
    prepared = resume(recovery, sequencer, start)
    # Read for everyone from the window or the store; counted for this connection when it joins.
    if isinstance(prepared, Prepared):
        prepared = prepared.replay(sequencer, lambda flt: True, 3)
    assert prepared == Reason.TOO_MANY


def test_a_wrong_epoch_is_refused_before_the_session_is_even_read(stream):
    recovery, sequencer = recovery_over(stream)
    refused = recovery.prepare(
        ResumeRequest("c-1", "another-epoch", 0), "bob", refusal=lambda name: None, admits=lambda f, n: True
    )
    assert refused == Reason.EPOCH


class _ResetWhileReading:
    """The store answers the session lookup, and meanwhile the stream starts over (Redis flushed, say):
    the worker receives the new epoch's first broadcasts while this resume waits."""

    def __init__(self, history, sequencer, epoch, count):
        self.history, self.sequencer, self.epoch, self.count = history, sequencer, epoch, count

    def __getattr__(self, name):
        return getattr(self.history, name)

    def load_session(self, client_id):
        session = self.history.load_session(client_id)
        for offset in range(1, self.count + 1):
            self.sequencer.offer(Envelope("ANNOUNCEMENT", {"n": offset}, Filter()).placed(self.epoch, offset))
        return session


def test_a_stream_reset_while_a_resume_waits_is_epoch_changed_not_a_replay_of_the_new_stream(stream):
    """Offset 3 of the old stream is not offset 3 of the new one: replaying the new stream's 4..6 as
    if they were what the client missed would skip its 1..3 and say recovered. Refuse instead."""
    publish(stream, 5)
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    old_epoch = sequencer.epoch
    recovery.history = _ResetWhileReading(stream, sequencer, "epoch-after-the-reset", 6)
    prepared = resume(recovery, sequencer, 3)
    assert sequencer.epoch == "epoch-after-the-reset" and sequencer.position == 6
    assert isinstance(prepared, Prepared) and prepared.epoch == old_epoch
    assert prepared.replay(sequencer, lambda flt: True, 100) == Reason.EPOCH


def test_a_missed_broadcast_from_another_stream_refuses_the_whole_replay(stream):
    start = stream.head()[1]
    publish(stream, 3)
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    prepared = resume(recovery, sequencer, start)
    assert isinstance(prepared, Prepared) and prepared.replay(sequencer, lambda flt: True, 100) != Reason.EPOCH
    strays = prepared.missed[1]
    prepared.missed[1] = Envelope(strays.type, strays.data, strays.filter, strays.id, strays.at, strays.offset, "other")
    assert prepared.replay(sequencer, lambda flt: True, 100) == Reason.EPOCH


def test_a_session_is_restored_once_even_before_its_deletion_is_written(stream):
    start = stream.head()[1]
    publish(stream, 2)
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    assert isinstance(resume(recovery, sequencer, start), Prepared)
    recovery.sessions.resumed("c-1")  # what the admission does once the socket joins
    assert resume(recovery, sequencer, start) == Reason.NO_SESSION  # the store still has it: not for long
    recovery.sessions.flush()
    assert stream.load_session("c-1") is None and not recovery.sessions.taken("c-1")
    assert resume(recovery, sequencer, start) == Reason.NO_SESSION


def test_another_users_session_or_none_is_no_session(stream):
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    assert resume(recovery, sequencer, 0, user="carol") == Reason.NO_SESSION
    stream.delete_sessions(["c-1"])
    assert resume(recovery, sequencer, 0) == Reason.NO_SESSION


def test_a_store_that_cannot_be_used_says_history_unavailable(tmp_path):
    from relay.history import HistoryUnavailable

    broken = SqliteHistory(str(tmp_path), window_ms=1000, last_value_ttl_ms=1000)  # a folder, not a file
    with pytest.raises(HistoryUnavailable, match="embedded history cannot be used"):
        broken.append(Envelope("ANNOUNCEMENT", {}, Filter()))
    with pytest.raises(HistoryUnavailable):
        broken.head()


def test_a_replay_decides_each_audience_once_and_keeps_the_order(stream):
    """Two audiences over 40 missed broadcasts: two filter checks, not forty, and the same replay."""
    start = stream.head()[1]
    nurses, admins = Filter(roles=frozenset({"nurse"})), Filter(roles=frozenset({"admin"}))
    for i in range(40):
        # Read back from the store: every envelope has its own Filter object, interned on the way in.
        stream.append(Envelope("ALERT", {"n": i}, nurses if i % 2 else admins))
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    prepared = resume(recovery, sequencer, start)
    assert isinstance(prepared, Prepared) and len(prepared.missed) == 40
    checked = []

    def admits(flt):
        checked.append(flt)
        return flt.admits("bob", "nurse", "clinic-1", [ANN])

    replay = prepared.replay(sequencer, admits, 100)
    assert len(checked) == 2
    assert [e.data["n"] for e in replay] == list(range(1, 40, 2))


def test_equal_filters_that_are_not_shared_are_each_checked_and_decided_alike(stream):
    start = stream.head()[1]
    publish(stream, 3)
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    prepared = resume(recovery, sequencer, start)
    assert isinstance(prepared, Prepared)
    # Not interned (as a filter built by hand would be): three objects, three checks, same answer.
    prepared.missed = [Envelope(e.type, e.data, Filter(), e.id, e.at, e.offset, e.epoch) for e in prepared.missed]
    checked = []
    replay = prepared.replay(sequencer, lambda flt: checked.append(flt) or True, 100)
    assert len(checked) == 3 and len(replay) == 3


def test_a_resume_from_past_this_workers_position_catches_up_from_the_history_before_refusing(stream):
    """A client that learnt the head from another worker (a PONG, a CONNECTED) comes to one whose listener
    is behind (reconnecting): the history has the offsets, so the resume is honoured, not refused."""
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    recovery.catch_up_timeout = 0.05
    start = sequencer.position
    publish(stream, 3)  # appended by another worker; this one's listener never told it
    prepared = resume(recovery, sequencer, start + 3)
    assert isinstance(prepared, Prepared) and sequencer.position == start + 3


def test_an_offset_the_stream_never_had_is_still_refused_after_catching_up(stream):
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    recovery.catch_up_timeout = 0.05
    assert resume(recovery, sequencer, sequencer.position + 50) == Reason.INVALID


def test_a_resume_past_this_workers_position_while_the_store_is_away_is_unavailable_not_invalid(stream):
    """Whether the stream had the offset cannot be told: the client is told the store is away, not that its
    position was wrong (found by review)."""
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    recovery.catch_up_timeout = 0.05

    def away(after, limit):
        raise HistoryUnavailable("the store is away")

    sequencer._fetch = away
    assert resume(recovery, sequencer, sequencer.position + 3) == Reason.UNAVAILABLE


def test_a_resume_from_past_the_window_keeps_only_what_was_meant_for_it(tmp_path):
    """Read from the store, every broadcast of the range was kept, everyone's: a resume from far back
    held the whole history in memory, and a few at once from one user many times that (found by review)."""
    history = SqliteHistory(str(tmp_path / "h.db"), window_ms=60_000, last_value_ttl_ms=60_000)
    start = history.head()[1]
    elsewhere, everyone = Filter(clinic_ids=frozenset({"clinic-2"})), Filter()
    for i in range(30):
        history.append(
            Envelope("CLINIC_ALERT" if i % 10 else "ANNOUNCEMENT", {"n": i}, elsewhere if i % 10 else everyone)
        )
    saved(history)
    recovery, sequencer = recovery_over(history)
    sequencer._recent.max_count = 2  # a window shorter than the gap: the store is read
    prepared = resume(recovery, sequencer, start)
    assert isinstance(prepared, Prepared) and [e.data["n"] for e in prepared.missed] == [0, 10, 20]
    assert [e.data["n"] for e in prepared.replay(sequencer, lambda flt: True, 100)] == [0, 10, 20]
    history.close()


def test_a_session_two_sockets_resume_at_once_is_read_for_one_of_them(stream):
    """Both passed the session check before either took it, and each read the missed broadcasts."""
    import gevent

    start = stream.head()[1]
    publish(stream, 2)
    saved(stream)
    recovery, sequencer = recovery_over(stream)
    reads = []
    load = stream.load_session

    def slow_load(client_id):
        reads.append(client_id)
        gevent.sleep(0.05)  # the store answers after a moment: the other socket comes meanwhile
        return load(client_id)

    stream.load_session = slow_load
    first, second = gevent.spawn(resume, recovery, sequencer, start), gevent.spawn(resume, recovery, sequencer, start)
    gevent.joinall([first, second], timeout=5)
    assert isinstance(first.value, Prepared) and second.value == Reason.NO_SESSION and reads == ["c-1"]
    assert isinstance(resume(recovery, sequencer, start), Prepared)  # once it is done, it may be asked again
