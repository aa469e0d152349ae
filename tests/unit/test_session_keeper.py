"""The session keeper lets deliveries go first: its batches of live sessions wait while the outbox is busy,
within bounds; sessions that ended, and the deletion of resumed ones, never wait."""

from __future__ import annotations

import time

import gevent
import pytest

from relay.history import Session
from relay.sessions import SessionKeeper


class Store:
    """Records what the keeper writes (the History methods it calls)."""

    def __init__(self, write_s: float = 0.0) -> None:
        self.saved: list[str] = []
        self.last: dict[str, Session] = {}  # each session as last written
        self.touched: list[str] = []
        self.deleted: list[str] = []
        self.write_s = write_s  # a write that yields, as a Redis round trip does

    def save_sessions(self, sessions: list[Session], expires_at_ms: int) -> None:
        if self.write_s:
            gevent.sleep(self.write_s)
        self.saved += [s.client_id for s in sessions]
        self.last.update((s.client_id, s) for s in sessions)

    def touch_sessions(self, client_ids: list[str], expires_at_ms: int) -> None:
        self.touched += client_ids

    def delete_sessions(self, client_ids: list[str]) -> None:
        self.deleted += client_ids


class Conn:
    def __init__(self, n: int) -> None:
        self.id, self.user_id, self.channels = f"c-{n}", f"u-{n}", {"system:announcements"}


@pytest.fixture
def busy():
    return [True]


@pytest.fixture
def keeper(busy):
    keeper = SessionKeeper(Store(), window_ms=60_000, busy=lambda: busy[0])  # type: ignore[arg-type]
    for n in range(3):
        keeper.opened(Conn(n))  # type: ignore[arg-type]
    return keeper


def test_a_patient_flush_waits_while_busy_and_writes_once_the_outbox_is_done(keeper, busy):
    writer = gevent.spawn(keeper.flush, time.monotonic() + 5)
    gevent.sleep(0.05)
    assert keeper.store.saved == []  # the outbox is busy: the batch waits
    busy[0] = False
    writer.join(timeout=2)
    assert sorted(keeper.store.saved) == ["c-0", "c-1", "c-2"]


def test_patience_ends_so_a_worker_that_is_always_busy_still_saves_its_sessions(keeper):
    started = time.monotonic()
    gevent.spawn(keeper.flush, started + 0.05).join(timeout=2)
    assert sorted(keeper.store.saved) == ["c-0", "c-1", "c-2"]
    assert 0.04 <= time.monotonic() - started < 1.5


def test_the_drains_flush_and_refresh_do_not_wait(keeper):
    started = time.monotonic()
    keeper.flush()  # no patience: what the drain calls before the worker exits
    keeper.refresh()
    assert sorted(keeper.store.saved) == ["c-0", "c-1", "c-2"]
    assert sorted(keeper.store.touched) == ["c-0", "c-1", "c-2"]
    assert time.monotonic() - started < 0.5


def test_ended_sessions_and_deletions_do_not_wait_for_the_outbox(keeper):
    leaving = Conn(7)
    keeper.opened(leaving)  # type: ignore[arg-type]
    keeper.closed(leaving)  # type: ignore[arg-type]
    keeper.resumed("c-9")
    writer = gevent.spawn(keeper.flush, time.monotonic() + 5)
    gevent.sleep(0.05)
    # Its client may be resuming on another worker now, which looks for the session only briefly.
    assert keeper.store.saved == ["c-7"] and keeper.store.deleted == ["c-9"]
    writer.kill()


def test_a_session_that_ends_while_a_round_waits_for_the_outbox_is_written_without_waiting_for_it(keeper, busy):
    """Found by review: it was written by the next round only, after the waiting one's patience (a second),
    and its client, back on another worker meanwhile, was restored the store's older copy of it (without a
    channel it had taken since)."""
    writer = gevent.spawn(keeper.flush, time.monotonic() + 5)
    gevent.sleep(0.05)
    leaving = keeper._live["c-1"]
    leaving.channels = {"system:announcements", "clinic:c-1:queue"}  # taken, not written yet: the round waits
    keeper.changed(leaving)
    keeper.closed(leaving)
    keeper.resumed("c-9")
    gevent.sleep(0.05)
    assert keeper.store.saved == ["c-1"] and keeper.store.deleted == ["c-9"]  # the round still waits
    assert keeper.store.last["c-1"] == Session("c-1", "u-1", ("clinic:c-1:queue", "system:announcements"), False)
    busy[0] = False
    writer.join(timeout=2)
    assert sorted(keeper.store.saved) == ["c-0", "c-1", "c-2"]  # the waiting round: c-1 not again, as open


def test_a_session_that_ends_while_the_expiry_refresh_waits_is_written_at_once_and_not_pushed_ahead(keeper, busy):
    refresher = gevent.spawn(keeper.refresh, time.monotonic() + 5)
    gevent.sleep(0.05)
    keeper.closed(keeper._live["c-2"])
    gevent.sleep(0.05)
    assert keeper.store.saved == ["c-2"] and keeper.store.touched == []  # the refresh still waits
    busy[0] = False
    refresher.join(timeout=2)
    assert sorted(keeper.store.touched) == ["c-0", "c-1"]  # its expiry stays the window's


def test_a_drain_waits_for_the_ended_sessions_a_waiting_round_is_writing():
    """Found by review: the keeper's waiting round writes sessions as they end; a drain's flush, closing
    the sockets meanwhile, returned while that write was still under way, and the worker exited."""
    busy = [True]
    keeper = SessionKeeper(Store(write_s=0.2), window_ms=60_000, busy=lambda: busy[0])  # type: ignore[arg-type]
    for n in range(3):
        keeper.opened(Conn(n))  # type: ignore[arg-type]
    waiting = gevent.spawn(keeper.flush, time.monotonic() + 5)
    gevent.sleep(0.05)
    keeper.closed(keeper._live["c-0"])
    gevent.sleep(0.05)  # the waiting round is writing it (0.2 s)
    keeper.store.write_s = 0  # the drain's own writes are quick
    for n in (1, 2):  # the drain closes the others, then flushes
        keeper.closed(keeper._live[f"c-{n}"])
    keeper.flush()
    assert sorted(keeper.store.saved) == ["c-0", "c-1", "c-2"] and keeper.pending("c-0") is None
    waiting.kill()


def test_a_session_that_ended_is_found_here_while_it_is_being_written():
    keeper = SessionKeeper(Store(write_s=0.2), window_ms=60_000)  # type: ignore[arg-type]
    leaving = Conn(7)
    keeper.opened(leaving)  # type: ignore[arg-type]
    keeper.closed(leaving)  # type: ignore[arg-type]
    writer = gevent.spawn(keeper.flush)
    gevent.sleep(0.05)
    found = keeper.pending("c-7")  # the client is back and resumes here before the store has it
    assert found is not None and found.channels == ("system:announcements",)
    writer.join(timeout=2)
    assert keeper.store.saved == ["c-7"] and keeper.pending("c-7") is None  # now the store has it


def test_a_drain_while_the_keeper_waits_leaves_no_session_unwritten(keeper, busy):
    left_before = Conn(5)
    keeper.opened(left_before)  # type: ignore[arg-type]
    keeper.closed(left_before)  # type: ignore[arg-type]
    waiting = gevent.spawn(keeper.flush, time.monotonic() + 5)  # takes c-5 and c-0..c-2's changes
    gevent.sleep(0.05)
    for n in range(3):  # SIGTERM: the drain closes every socket, then flushes at once
        keeper.closed(keeper._live[f"c-{n}"])
    keeper.flush()
    assert sorted(keeper.store.saved) == ["c-0", "c-1", "c-2", "c-5"]  # nothing held back by the waiting flush
    busy[0] = False  # had the worker not exited yet, the waiting flush goes on...
    waiting.join(timeout=2)
    assert waiting.dead and all(keeper.store.last[f"c-{n}"].open is False for n in (0, 1, 2, 5))  # ...writing none open


class DownStore(Store):
    def save_sessions(self, sessions: list[Session], expires_at_ms: int) -> None:
        raise ConnectionError("the store is down")

    def delete_sessions(self, client_ids: list[str]) -> None:
        raise ConnectionError("the store is down")


def test_while_the_store_is_down_ended_sessions_are_kept_for_the_window_not_forever():
    """Past the window there is nothing to resume: a long outage must not pile them up (nor, once the
    store is back, write sessions long expired with a fresh expiry)."""
    keeper = SessionKeeper(DownStore(), window_ms=100)  # type: ignore[arg-type]
    old = [Conn(n) for n in range(3)]
    for conn in old:
        keeper.opened(conn)  # type: ignore[arg-type]
        keeper.closed(conn)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        keeper.flush()
    assert keeper.pending("c-0") is not None  # within the window: kept for the next try
    time.sleep(0.15)
    recent = Conn(9)
    keeper.opened(recent)  # type: ignore[arg-type]
    keeper.closed(recent)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        keeper.flush()
    assert keeper.pending("c-0") is None and keeper.pending("c-9") is not None
    assert keeper.status()["pending"] == 1


def test_while_the_store_is_down_resumed_sessions_are_remembered_as_long_as_the_store_would_offer_them():
    """A resume to the same worker needs no store: through an outage each added a deletion to write and a
    session to refuse, never dropped (found by review). Past the window and its refresh margin the store
    offers that session no more, so both can go."""
    keeper = SessionKeeper(DownStore(), window_ms=100, refresh_ms=10)  # type: ignore[arg-type]
    keeper.resumed("c-0")
    with pytest.raises(ConnectionError):
        keeper.flush()
    assert keeper.taken("c-0")  # within the window: still refused, its deletion still to be written
    time.sleep(0.15)
    keeper.resumed("c-9")
    with pytest.raises(ConnectionError):
        keeper.flush()
    assert not keeper.taken("c-0") and keeper.taken("c-9")
    assert keeper._forget == ["c-9"]


def test_a_live_session_is_written_as_open_and_one_that_ended_as_not():
    """A resume on another worker asks the worker holding an open one to close its socket (4409)."""
    keeper = SessionKeeper(Store(), window_ms=60_000)  # type: ignore[arg-type]
    conn = Conn(1)
    keeper.opened(conn)  # type: ignore[arg-type]
    keeper.flush()
    assert keeper.store.last["c-1"].open is True and keeper.pending("c-1").open is True
    keeper.closed(conn)  # type: ignore[arg-type]
    assert keeper.pending("c-1").open is False
    keeper.flush()
    assert keeper.store.last["c-1"].open is False


def test_a_session_resumed_while_its_socket_is_still_open_here_leaves_nothing_when_that_socket_closes():
    """Else the old socket's close would write the session again, and it could be restored twice."""
    keeper = SessionKeeper(Store(), window_ms=60_000)  # type: ignore[arg-type]
    conn = Conn(1)
    keeper.opened(conn)  # type: ignore[arg-type]
    keeper.flush()
    keeper.resumed("c-1")  # on another socket, here or on another worker
    keeper.flush()
    keeper.closed(conn)  # type: ignore[arg-type]  # then the old socket is closed (4409)
    keeper.flush()
    keeper.refresh()
    assert keeper.store.saved == ["c-1"] and keeper.store.deleted == ["c-1"] and keeper.store.touched == []
    assert keeper.pending("c-1") is None and keeper.taken("c-1") is False


def test_status_counts_as_pending_what_a_flush_is_still_writing():
    """A test (and an operator) waiting for ``pending == 0`` took a flush that had taken its changes but
    not yet written them for done (found by review)."""
    keeper = SessionKeeper(Store(write_s=0.2), window_ms=60_000)  # type: ignore[arg-type]
    live, gone = Conn(1), Conn(2)
    keeper.opened(live)  # type: ignore[arg-type]
    keeper.opened(gone)  # type: ignore[arg-type]
    keeper.closed(gone)  # type: ignore[arg-type]
    assert keeper.status()["pending"] == 2
    writer = gevent.spawn(keeper.flush)
    gevent.sleep(0.05)  # the ended session's write has begun, and waits on the store
    assert keeper.status()["pending"] == 2 and keeper.store.saved == []
    gevent.sleep(0.25)  # the live session's write now
    assert keeper.status()["pending"] == 1 and keeper.store.saved == ["c-2"]
    writer.join(5)
    assert keeper.status()["pending"] == 0 and sorted(keeper.store.saved) == ["c-1", "c-2"]
