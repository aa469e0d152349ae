"""Connection: one WebSocket on the event loop, driven over a real socketpair (no server).

The test plays the client on the other end of the pair; the event loop runs
whenever the test yields (``gevent.sleep``).
"""

from __future__ import annotations

import logging
import socket
import uuid

import gevent
import pytest
from wsframes import ServerFrames, client_frame, close_frame, text

from relay import frames
from relay.codes import Close
from relay.connection import ABNORMAL, CLOSED, CLOSING, OPEN, Connection, push_all, random_uuid
from relay.outbox import Outbox


class Recorder:
    """A Handler that records what the connection told it."""

    def __init__(self, on_text=None):
        self.texts: list[str] = []
        self.binaries: list[bytes] = []
        self.closing = 0
        self.closed = 0
        self._on_text = on_text

    def on_text(self, conn, message):
        self.texts.append(message)
        if self._on_text:
            self._on_text(conn, message)

    def on_binary(self, conn, data):
        self.binaries.append(data)

    def on_control(self, conn):
        return True

    def on_closing(self, conn):
        self.closing += 1

    def on_closed(self, conn):
        self.closed += 1
        self.closed_with = (conn.close_code, conn.close_reason)  # what the disconnect log would say


@pytest.fixture
def pair():
    """(make, peers): ``make(**options)`` builds a Connection on one end of a socketpair; the test holds the other."""
    made = []

    def make(handler=None, *, max_message=64 * 1024, max_queue=1 << 20, close_timeout=0.3, sndbuf=None, rcvbuf=None):
        ours, theirs = socket.socketpair()
        if sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if rcvbuf:
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        handler = handler or Recorder()
        outbox = Outbox()
        conn = Connection(
            ours,
            outbox=outbox,
            handler=handler,
            max_message=max_message,
            max_queue=max_queue,
            close_timeout=close_timeout,
        )
        conn.start()
        made.append((conn, theirs))
        return conn, handler, ServerFrames(theirs), theirs

    yield make
    for conn, theirs in made:
        conn.abort("test over")
        theirs.close()


def run_loop(seconds: float = 0.02) -> None:
    gevent.sleep(seconds)


def test_a_text_message_reaches_the_handler_whole(pair):
    conn, handler, _, peer = pair()
    data = client_frame(frames.OP_TEXT, b'{"type":"PING"}')
    for i in range(len(data)):  # one byte at a time
        peer.send(data[i : i + 1])
        run_loop(0.001)
    run_loop()
    assert handler.texts == ['{"type":"PING"}']


def test_bytes_sent_behind_the_upgrade_are_parsed_first(pair):
    ours, theirs = socket.socketpair()
    handler = Recorder()
    conn = Connection(ours, outbox=Outbox(), handler=handler, max_message=1024, max_queue=1 << 20, close_timeout=1)
    second = text("also early")
    conn.start(pending=text("early") + second[:3])
    theirs.send(second[3:])
    run_loop()
    assert handler.texts == ["early", "also early"]
    conn.abort("test over")
    theirs.close()


def test_a_ping_frame_is_answered_with_its_payload(pair):
    conn, _, server, peer = pair()
    peer.send(client_frame(frames.OP_PING, b"are you there"))
    run_loop()
    assert server.next() == (frames.OP_PONG, b"are you there")


def test_partial_writes_keep_the_unsent_tail_and_the_frame_order(pair):
    conn, _, server, peer = pair(max_queue=8 << 20, sndbuf=4096, rcvbuf=4096)
    sent = [frames.text(f"{n:04d}".encode() + bytes([65 + n % 26]) * 50_000) for n in range(40)]  # 2 MB
    for frame in sent:
        assert conn.push(frame)
    run_loop()
    assert conn._outbox.stalls >= 1 and conn._blocked  # the kernel took only part: the rest waits
    got = []
    while len(got) < len(sent):
        opcode, payload = server.next()  # reading lets the writability watcher finish the job
        got.append(frames.encode(opcode, payload))
        run_loop(0)
    assert got == sent  # every frame whole, none torn, in order
    assert conn.state is OPEN


class CountingSocket(socket.socket):
    """A real socket that notes each large bytes object it is given to send (a copy made for the send)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.large_copies = 0

    def send(self, data, *args):
        if type(data) is bytes and len(data) > 1 << 20:
            self.large_copies += 1
        return super().send(data, *args)


def test_the_unsent_tail_of_a_large_replay_is_not_copied_again_with_each_frame_queued_behind_it():
    """A partial send kept the tail as a view; the next write joined it with the frames queued behind it,
    copying what was left of a 2 MB replay on every partial send while live broadcasts kept coming."""
    raw, peer = socket.socketpair()
    ours = CountingSocket(fileno=raw.detach())
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn = Connection(ours, outbox=Outbox(), handler=Recorder(), max_message=1024, max_queue=1 << 20, close_timeout=1)
    conn.start()
    reader = ServerFrames(peer)
    try:
        replay = [frames.text(f"{n:04d}".encode() + b"r" * 50_000) for n in range(40)]  # 2 MB
        conn.push_owed(replay)
        run_loop(0)
        assert conn._blocked  # the kernel took only part of it
        live = [frames.text(f"live {n}".encode()) for n in range(40)]
        got = []
        for frame in live:  # a broadcast behind it after each frame the client reads
            assert conn.push(frame)
            opcode, payload = reader.next()
            got.append(frames.encode(opcode, payload))
            run_loop(0)
        while len(got) < len(replay) + len(live):
            opcode, payload = reader.next()
            got.append(frames.encode(opcode, payload))
            run_loop(0)
        assert got == replay + live  # whole, in order
        assert ours.large_copies == 1, ours.large_copies  # the replay as it was queued, and no copy of it since
        assert conn.state is OPEN and conn._pending is None and conn._pending_bytes == 0
    finally:
        conn.abort("test over")
        peer.close()


def test_a_client_owing_more_than_max_queue_is_closed_1013_without_tearing_a_frame(pair):
    conn, handler, server, peer = pair(max_queue=64 * 1024, sndbuf=4096, rcvbuf=4096)
    frame = frames.text(b"x" * 30_000)
    pushed = 0
    while conn.push(frame) and pushed < 1000:
        pushed += 1
        run_loop(0)
    assert conn.state is CLOSING and conn.close_code == Close.TRY_AGAIN_LATER
    assert handler.closing == 1
    assert not conn.push(frame)  # nothing more is queued on a closing connection
    seen = []
    while True:
        opcode, payload = server.next()
        if opcode == frames.OP_CLOSE:
            break
        assert payload == b"x" * 30_000  # what was started went out whole
        seen.append(payload)
        run_loop(0)
    assert int.from_bytes(payload[:2], "big") == Close.TRY_AGAIN_LATER
    assert len(seen) < pushed  # the frames behind the overflow were dropped


def test_replays_stretch_the_queue_limit_twice_and_a_third_one_unread_counts_against_it(pair):
    """A client is not a slow consumer for being owed replays larger than WS_MAX_QUEUE_BYTES (a page's
    first two SUBSCRIBEs since); but one that asks for replay after replay and reads none is one."""
    conn, handler, server, _ = pair(max_queue=64 * 1024, sndbuf=4096, rcvbuf=4096)
    owed = [frames.text(b"x" * 30_000)] * 10  # 300 KB, several times the limit
    for _ in range(2):
        conn.push_owed(owed)
        run_loop(0)
    assert conn.state is OPEN
    conn.push_owed(owed)  # neither is read yet
    run_loop(0)
    assert conn.state is CLOSING and conn.close_code == Close.TRY_AGAIN_LATER and conn.overflowed
    # A client that reads what it was owed gets the stretch again for the next one.
    again, _, reader, _ = pair(max_queue=64 * 1024)
    for _ in range(3):
        again.push_owed(owed)
        again.push_owed(owed)
        for _ in owed * 2:
            assert reader.next() == (frames.OP_TEXT, b"x" * 30_000)
        run_loop(0)
    assert again.state is OPEN


def test_push_all_queues_like_push_on_each_and_skips_the_closing(pair):
    (a, _, a_frames, _), (b, _, b_frames, _) = pair(), pair()
    leaving, _, leaving_frames, _ = pair()
    leaving.close(Close.SERVICE_RESTART, "bye")
    first, second = frames.text(b"first"), frames.text(b"second")
    assert push_all([a, leaving, b], first) == 2
    assert push_all([b, leaving, a], second) == 2
    run_loop()
    for server in (a_frames, b_frames):
        assert [server.next(), server.next()] == [(frames.OP_TEXT, b"first"), (frames.OP_TEXT, b"second")]
    assert leaving_frames.next()[0] == frames.OP_CLOSE  # its close frame, and nothing pushed after it


def test_push_all_closes_a_client_past_max_queue_1013_as_push_does(pair):
    conn, handler, _, _ = pair(max_queue=64 * 1024, sndbuf=4096, rcvbuf=4096)
    frame = frames.text(b"x" * 30_000)
    for _ in range(1000):  # bounded; the client reads nothing, so the queue fills within a few
        if conn.state is not OPEN:
            break
        push_all([conn], frame)
        run_loop(0)
    assert conn.state is CLOSING and conn.close_code == Close.TRY_AGAIN_LATER and conn.overflowed
    assert push_all([conn], frame) == 0


def test_close_waits_for_the_answer_then_the_timer_drops_a_silent_client(pair):
    conn, handler, server, peer = pair(close_timeout=0.2)
    conn.close(Close.NORMAL, "bye")
    run_loop()
    assert server.close_code() == (Close.NORMAL, "bye")
    assert conn.state is CLOSING and handler.closed == 0  # still waiting for the client's answer
    run_loop(0.3)
    assert conn.state is CLOSED and handler.closed == 1 and conn.close_reason == "bye"
    assert peer.recv(10) == b""  # the TCP connection is gone


def test_the_clients_close_answer_ends_the_connection_at_once(pair):
    conn, handler, server, peer = pair(close_timeout=5)
    conn.close(Close.SERVICE_RESTART, "service restart")
    run_loop()
    assert server.close_code() == (Close.SERVICE_RESTART, "service restart")
    peer.send(close_frame(Close.SERVICE_RESTART))
    run_loop()
    assert conn.state is CLOSED and handler.closed == 1


def test_a_client_close_is_echoed_with_its_code_and_its_reason_kept(pair):
    conn, handler, server, peer = pair()
    peer.send(close_frame(4000, "leaving"))
    run_loop()
    assert server.close_code() == (4000, "")
    assert conn.state is CLOSED and handler.closed_with == (4000, "leaving")
    assert peer.recv(10) == b""  # dropped once the echo was written, no timer needed


def test_a_protocol_violation_closes_1002_half_closes_and_discards_until_the_client_leaves(pair):
    conn, handler, server, peer = pair(close_timeout=5)
    peer.send(b"\x81\x05hello")  # unmasked: clients must mask
    run_loop()
    peer.send(text("more, still in flight") * 50)  # a client still sending must not reset the close frame away
    run_loop()
    assert server.close_code()[0] == Close.PROTOCOL_ERROR
    with pytest.raises(ConnectionError):
        server.next()  # then FIN: nothing more from the server
    assert conn.state is CLOSING and handler.texts == []  # what came after the violation was discarded
    peer.close()
    run_loop()
    assert conn.state is CLOSED and handler.closed == 1


def test_a_refused_socket_flooded_with_frames_parses_no_more_than_one_reads_worth(pair):
    """A socket told to close (a bad token: 4401) is read for its client's close answer, for up to
    WS_CLOSE_TIMEOUT_MS: a flood of tiny frames meanwhile was parsed whole, 15 ms a 64 KiB read."""
    conn, handler, server, peer = pair(close_timeout=5)
    conn.close(Close.UNAUTHORIZED, "token expired")
    run_loop()
    assert server.close_code() == (Close.UNAUTHORIZED, "token expired")
    ping = client_frame(frames.OP_PING, b"")
    peer.send(ping * 1000)
    run_loop()
    assert conn._parser is None  # past 512 frames in one read: the rest is discarded unparsed
    peer.send(close_frame(Close.UNAUTHORIZED))  # and so is a close answer after it: the timer ends it
    run_loop()
    assert conn.state is CLOSING and handler.closed == 0
    peer.close()
    run_loop()
    assert conn.state is CLOSED and handler.closed_with == (Close.UNAUTHORIZED, "token expired")


def test_a_lost_connection_is_reported_as_1006(pair):
    conn, handler, _, peer = pair()
    peer.close()
    run_loop()
    assert conn.state is CLOSED and conn.close_code == ABNORMAL and handler.closed == 1


def test_a_handler_exception_closes_1011_and_is_logged(pair, caplog):
    def broken(conn, message):
        raise RuntimeError("a bug in a handler")

    conn, _, server, peer = pair(Recorder(on_text=broken))
    with caplog.at_level(logging.ERROR, logger="relay.connection"):
        peer.send(text("x"))
        run_loop()
    assert server.close_code() == (Close.INTERNAL_ERROR, "internal error")
    assert "handler failed" in caplog.text and "a bug in a handler" in caplog.text


class BrokenOnClose(Recorder):
    def on_closing(self, conn):
        super().on_closing(conn)
        raise RuntimeError("a bug in on_closing")

    def on_closed(self, conn):
        super().on_closed(conn)
        raise RuntimeError("a bug in on_closed")


@pytest.fixture
def hub_errors(monkeypatch):
    """What reached gevent's hub from a callback: nothing may (it prints and moves on, mid-teardown)."""
    seen = []
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", lambda context, kind, value, tb: seen.append(value))
    return seen


@pytest.mark.parametrize("ending", ["lost", "close_timer"])
def test_close_handlers_that_fail_are_logged_and_the_socket_is_still_torn_down(pair, caplog, hub_errors, ending):
    conn, handler, _, peer = pair(BrokenOnClose(), close_timeout=0.1)
    bystander, bystander_handler, _, bystander_peer = pair()
    with caplog.at_level(logging.ERROR, logger="relay.connection"):
        if ending == "lost":
            peer.close()  # the read callback finds the end of the stream
        else:
            conn.close(Close.NORMAL, "bye")  # the client never answers: the close timer ends it
        run_loop(0.3)
    assert conn.state is CLOSED and handler.closing == 1 and handler.closed == 1
    assert "a bug in on_closing" in caplog.text and "a bug in on_closed" in caplog.text
    assert hub_errors == []
    bystander_peer.send(text("still fine"))
    run_loop()
    assert bystander_handler.texts == ["still fine"]


def test_a_handler_that_blocks_is_reported_by_name_and_only_its_connection_closes(pair, caplog):
    """The event-loop rule, enforced: a sleep inside a frame handler is named in the log, never silent."""

    def sleepy(conn, message):
        gevent.sleep(0.01)  # blocking inside a libev callback: not allowed

    conn, _, server, peer = pair(Recorder(on_text=sleepy))
    bystander, bystander_handler, _, bystander_peer = pair()
    with caplog.at_level(logging.ERROR, logger="relay.events"):
        peer.send(text("x"))
        run_loop()
    assert server.close_code() == (Close.INTERNAL_ERROR, "internal error")
    [record] = [r for r in caplog.records if r.msg == "ws.handler_blocked"]
    assert "sleepy" in record.fields["at"] and "test_connection.py" in record.fields["at"]
    assert record.fields["handler"] == "Recorder.on_text" and "conn.defer" in record.fields["message"]
    bystander_peer.send(text("still fine"))
    run_loop()
    assert bystander.state is OPEN and bystander_handler.texts == ["still fine"]


def test_defer_runs_blocking_work_and_comes_back_through_the_connection(pair):
    def slow_lookup(conn, message):
        def work():
            gevent.sleep(0.05)  # stands for a Supabase call
            conn.send_now(frames.text(b"looked up " + message.encode()))

        conn.defer(work)

    conn, _, server, peer = pair(Recorder(on_text=slow_lookup))
    peer.send(text("u-1"))
    run_loop(0.1)
    assert server.next() == (frames.OP_TEXT, b"looked up u-1")
    assert conn.state is OPEN


def test_deferred_work_that_fails_closes_1011(pair):
    def fails(conn, message):
        conn.defer(lambda: 1 / 0)

    conn, _, server, peer = pair(Recorder(on_text=fails))
    peer.send(text("x"))
    run_loop(0.05)
    assert server.close_code()[0] == Close.INTERNAL_ERROR


def test_keepalive_pings_then_closes_4408_when_nothing_came_back(pair):
    conn, _, server, peer = pair()
    conn.keepalive()
    run_loop()
    assert server.next() == (frames.OP_PING, b"")
    conn.keepalive()  # nothing arrived since: the client is gone
    run_loop()
    assert server.close_code() == (Close.KEEPALIVE_TIMEOUT, "no answer to ping")


def test_anything_from_the_client_counts_as_an_answer_to_keepalive(pair):
    conn, _, server, peer = pair()
    conn.keepalive()
    run_loop()
    server.next()
    peer.send(client_frame(frames.OP_PONG, b""))
    run_loop()
    conn.keepalive()
    run_loop()
    assert server.next() == (frames.OP_PING, b"") and conn.state is OPEN


def test_client_ids_are_random_version_4_uuids_as_uuid_writes_them():
    ids = [random_uuid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for client_id in ids[:200]:
        parsed = uuid.UUID(client_id)
        assert str(parsed) == client_id and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert {i[14] for i in ids} == {"4"} and {i[19] for i in ids} == set("89ab")
    for position in (0, 9, 15, 20, 24, 35):  # random digits take every value (a stuck bit would show)
        assert len({i[position] for i in ids}) == 16
