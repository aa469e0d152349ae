"""Outbox: the one writer greenlet. It coalesces queued frames and survives a broken connection."""

from __future__ import annotations

import logging
import socket

import gevent

from relay import frames
from relay.connection import Connection
from relay.outbox import Outbox


class CountingSocket:
    """A real socket that counts the ``send`` calls the connection makes on it."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.sends: list[int] = []

    def send(self, data) -> int:
        sent = self._sock.send(data)
        self.sends.append(sent)
        return sent

    def __getattr__(self, name):
        return getattr(self._sock, name)


class Quiet:
    def on_text(self, conn, text): ...
    def on_binary(self, conn, data): ...
    def on_control(self, conn):
        return True

    def on_closing(self, conn): ...
    def on_closed(self, conn): ...


def test_frames_queued_before_the_writer_runs_go_out_in_one_send():
    outbox = Outbox()
    ours, theirs = socket.socketpair()
    counted = CountingSocket(ours)
    conn = Connection(counted, outbox=outbox, handler=Quiet(), max_message=1024, max_queue=1 << 20, close_timeout=1)
    one, two, three = (frames.text(f"broadcast {n}".encode()) for n in range(3))
    for frame in (one, two, three):
        conn.push(frame)  # three broadcasts arrive before the outbox gets to this connection
    gevent.sleep(0.01)
    assert counted.sends == [len(one) + len(two) + len(three)]
    assert theirs.recv(4096) == one + two + three
    conn.abort("done")
    theirs.close()


class Flushable:
    def __init__(self, name, *, broken=False):
        self.name, self.broken = name, broken
        self.flushed = 0
        self.aborted: str | None = None

    def flush(self):
        if self.broken:
            raise OSError("a socket in a bad state")
        self.flushed += 1

    def abort(self, why):
        self.aborted = why
        if self.broken == "beyond repair":
            raise RuntimeError("a bug on the way out")


def test_one_broken_connection_never_stops_the_writer(caplog):
    outbox = Outbox()
    conns = [Flushable("a"), Flushable("b", broken=True), Flushable("c"), Flushable("d")]
    with caplog.at_level(logging.ERROR, logger="relay.outbox"):
        for conn in conns:
            outbox.schedule(conn)
        gevent.sleep(0.01)
    assert [c.flushed for c in conns] == [1, 0, 1, 1]
    assert conns[1].aborted == "flush_error" and "flush failed" in caplog.text
    later = Flushable("later")
    outbox.schedule(later)  # the writer is still alive for the next round
    gevent.sleep(0.01)
    assert later.flushed == 1


def test_a_connection_that_cannot_even_be_dropped_does_not_stop_the_writer(caplog):
    """Were the writer to die, every frame of the worker would wait forever (it is never started again)."""
    outbox = Outbox()
    conns = [Flushable("a"), Flushable("b", broken="beyond repair"), Flushable("c")]
    with caplog.at_level(logging.ERROR, logger="relay.outbox"):
        for conn in conns:
            outbox.schedule(conn)
        gevent.sleep(0.01)
    assert [c.flushed for c in conns] == [1, 0, 1]
    assert "dropping a connection failed" in caplog.text
    later = Flushable("later")
    outbox.schedule(later)
    gevent.sleep(0.01)
    assert later.flushed == 1


def test_the_writer_yields_once_its_time_slice_is_used_so_others_run_during_a_big_flush(monkeypatch):
    import relay.outbox

    monkeypatch.setattr(relay.outbox, "WRITE_SLICE_S", 0.0)  # every look at the clock finds the slice used up
    monkeypatch.setattr(relay.outbox, "CHECK_EVERY", 10)
    outbox = Outbox()
    order: list[str] = []

    class Logged(Flushable):
        def flush(self):
            order.append("flush")

    for n in range(30):
        outbox.schedule(Logged(str(n)))
    gevent.spawn(lambda: order.append("someone else"))
    gevent.sleep(0.01)
    assert order.index("someone else") < 30 and order.count("flush") == 30
    assert outbox.status()["backlog"] == 0


def test_busy_while_sockets_wait_or_a_round_is_being_written():
    outbox = Outbox()
    ours, theirs = socket.socketpair()
    seen_while_writing = []

    class Watching(CountingSocket):
        def send(self, data) -> int:  # inside the round: the connection is off the list, the round goes on
            seen_while_writing.append(outbox.busy)
            return super().send(data)

    conn = Connection(
        Watching(ours), outbox=outbox, handler=Quiet(), max_message=1024, max_queue=1 << 20, close_timeout=1
    )
    assert not outbox.busy
    conn.push(frames.text(b"hello"))
    assert outbox.busy  # queued, the writer has not run yet
    gevent.sleep(0.01)
    assert seen_while_writing == [True]
    assert not outbox.busy and theirs.recv(64) == frames.text(b"hello")
    conn.abort("done")
    theirs.close()
