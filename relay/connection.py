"""One accepted WebSocket, driven by the event loop: no greenlet of its own.

After Flask-Sock has answered the upgrade, the socket is handed here and the
HTTP request ends. From then on the connection lives on two libev watchers
(readable, and writable only while the kernel buffer is full), so an idle
client costs a few hundred bytes of Python objects instead of a parked
greenlet with its stack. This is also why gunicorn's ``worker_connections``
does not cap the number of open sockets: they no longer hold a pool slot.
``docs/architecture.md`` draws the whole life of a socket.

Writing never blocks and never tears a frame: a ``send`` that takes only part
of the data keeps the rest (and everything queued after it) until the socket
is writable again. What a client has not taken is bounded by ``max_queue``;
past it the client is closed with 1013 instead of slowing anyone else.

A connection is the transport plus the per-client state the protocol layer
keeps on it (``identity`` and its ``user_id``/``role``/``clinic_id``,
``channels``, the rate bucket), stored here so the hub can index and match
connections without another lookup. This module reads none of that state:
what a frame means is the :class:`Handler`'s business.

**The rule of this design: code called from an event-loop callback never
blocks.** Reads and write completions run inside gevent's hub, as libev
callbacks. There, anything that would wait (``gevent.sleep``, a contended
gevent lock, a socket or HTTP call such as a Supabase lookup, a Redis round
trip, a database query that waits on a lock) raises gevent's
``BlockingSwitchOutError``. Such a handler is reported (``ws.handler_blocked``
in the log, naming the fix) and its connection is closed with 1011; other
connections are not disturbed. Blocking work goes through :meth:`Connection.defer`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol, cast

import gevent
from gevent.exceptions import BlockingSwitchOutError

from . import frames
from .codes import Close
from .directory import Identity
from .eventlog import event

log = logging.getLogger("relay.connection")

OPEN = "open"
CLOSING = "closing"
CLOSED = "closed"
ABNORMAL = 1006  # never sent: what a close without a close frame is reported as
MAX_OWED_UNREAD = 2  # replays the queue limit stretches for before the client has read (push_owed)
_READ = 1
_WRITE = 2
_LINGER_RESET = struct.pack("ii", 1, 0)


class Handler(Protocol):
    """What the connection calls back; the protocol layer implements it.

    Every method runs **inside an event-loop callback** (gevent's hub): it must
    not block. No sleep, no contended lock, no network or disk I/O that waits.
    Queue replies with ``conn.push``/``conn.send_now``; hand blocking work to
    ``conn.defer(fn, ...)``, which runs it in a greenlet of its own from where
    it comes back through the same connection methods.
    """

    def on_text(self, conn: Connection, text: str) -> None:
        """A whole text message (UTF-8 already checked)."""

    def on_binary(self, conn: Connection, data: bytes) -> None:
        """A whole binary message."""

    def on_control(self, conn: Connection) -> bool:
        """A ping or a pong arrived: whether the connection may have it answered (False: the handler
        refused it, and closed the connection). Each costs a parse and a pong; unlimited, one client
        sending nothing else could keep a worker's loop busy."""

    def on_closing(self, conn: Connection) -> None:
        """The connection stopped being OPEN: take it out of every index.

        Unlike the frame handlers, this and ``on_closed`` are not watched for
        blocking by name: a violation here surfaces as the read callback's
        failure and aborts the socket. Keep them to index updates and counters."""

    def on_closed(self, conn: Connection) -> None:
        """The socket is gone; ``conn.close_code``/``close_reason`` say why (same rule as ``on_closing``)."""


class Watcher(Protocol):
    """The part of a libev watcher (``loop.io``/``loop.timer``) used here; gevent ships no types."""

    def start(self, callback: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class Outbox(Protocol):
    stalls: int

    def schedule(self, conn: Connection) -> None: ...


def random_uuid() -> str:
    """A random (version 4) UUID as text, what ``str(uuid.uuid4())`` gives, in a third of its time.

    Every connect makes one (its ``clientId``, also the key of its session);
    the uuid module's object and formatting cost more than the 16 random bytes.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Connection:
    __slots__ = (
        "id",
        "identity",
        "user_id",
        "role",
        "clinic_id",
        "token_ms",
        "sent_after",
        "late",
        "channels",
        "opened_at",
        "heard",
        "rate_tokens",
        "rate_at",
        "backlog",
        "state",
        "close_code",
        "close_reason",
        "overflowed",
        "_sock",
        "_loop",
        "_outbox",
        "_handler",
        "_parser",
        "_read_watch",
        "_write_watch",
        "_timer",
        "_pending",
        "_pending_bytes",
        "_scheduled",
        "_blocked",
        "_close_when_flushed",
        "_max_queue",
        "_queue_limit",
        "_stretched",
        "_close_timeout",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        outbox: Outbox,
        handler: Handler,
        max_message: int,
        max_queue: int,
        close_timeout: float,
        max_frames: int = frames.MAX_FRAMES_PER_READ,
        loop: Any = None,  # gevent's libev loop (untyped); the current hub's by default
    ):
        sock.setblocking(False)
        self.id = random_uuid()
        # Client state kept for the protocol layer and the hub (see the module docstring).
        self.user_id: str | None = None  # set once admitted (see identify)
        self.role: str | None = None
        self.clinic_id: str | None = None
        self.token_ms = 0  # when the token it was admitted with was minted (a sign-out everywhere ends it)
        # The offset after which it was sent every broadcast meant for its user, role, clinic and the channels
        # it held at the time: the stream's position when it joined (a recovered resume's: the offset its
        # replay began after), moved back to a SUBSCRIBE since's once that is replayed. A later SUBSCRIBE
        # since replays only what its own new channels add (a channel taken in between without since counts
        # as taken then, as it asked: see ``late``).
        self.sent_after = 0
        # Channels held that were sent everything only after a later offset than ``sent_after`` (taken
        # without since, or with a since not replayed, or replayed since a later position), each with that
        # offset: a broadcast to one from before it was not sent through it. None when there are none.
        self.late: dict[str, int] | None = None
        self.channels: set[str] = set()
        self.rate_tokens = 0.0
        self.rate_at = 0.0
        self.backlog: list[str] | None = None  # messages waiting behind one that is being answered
        # Transport state.
        self.opened_at = time.monotonic()
        self.heard = True  # something arrived since the last keep-alive ping
        self.state = OPEN
        self.close_code: int | None = None
        self.close_reason = ""
        self.overflowed = False  # closed 1013 for owing more than max_queue (a slow consumer)
        self._sock = sock
        self._loop = loop if loop is not None else gevent.get_hub().loop
        self._outbox = outbox
        self._handler = handler
        self._parser: frames.FrameParser | None = frames.FrameParser(max_message, max_frames)
        self._read_watch: Watcher | None = None
        self._write_watch: Watcher | None = None
        self._timer: Watcher | None = None
        self._pending: list[bytes | memoryview] | None = None
        self._pending_bytes = 0
        self._scheduled = False
        self._blocked = False
        self._close_when_flushed = False
        self._max_queue = max_queue
        self._queue_limit = max_queue  # stretched while a replay is being written (push_owed)
        self._stretched = 0  # replays it was stretched for since the queue was last written whole
        self._close_timeout = close_timeout

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id} {self.state}>"

    # -- lifecycle ----------------------------------------------------------

    def identify(self, identity: Identity) -> None:
        """Attach who this is; the hub indexes these fields.

        Only what access depends on is kept (not the name or email), and the
        role and clinic are interned: ten thousand connections share a few of
        each (measured: ~0.3 KB a connection less).
        """
        self.user_id = identity.user_id
        self.role = sys.intern(identity.role)
        self.clinic_id = sys.intern(identity.clinic_id) if identity.clinic_id is not None else None

    @property
    def admitted(self) -> bool:
        """Whether it was ever let in (a refused socket is closed without an identity)."""
        return self.user_id is not None

    def start(self, pending: bytes = b"") -> None:
        """Begin reading from the client.

        ``pending`` is what the client sent right behind its upgrade request,
        which the HTTP server had already read off the socket: it is parsed
        first, as if it had just arrived.
        """
        if self._read_watch is None and self.state is not CLOSED:
            watch = self._read_watch = self._loop.io(self._sock.fileno(), _READ)
            watch.start(self._on_readable)
            if pending:
                self._received(pending)

    def close(self, code: int, reason: str = "", *, drop_when_sent: bool = False, logged: str | None = None) -> None:
        """Start the closing handshake.

        The close frame goes after what is already queued; the socket is
        dropped when the client answers, or after ``close_timeout`` if it
        does not. ``drop_when_sent`` ends it as soon as the frame is written
        instead: at once when the client already said goodbye; after a
        protocol violation by half-closing and discarding whatever still
        arrives (see ``_linger``). ``logged`` is the reason kept for the
        disconnect log when it differs from the one sent.
        """
        if self.state is not OPEN:
            return
        self.close_code, self.close_reason = code, reason if logged is None else logged
        self._leave_open()
        self._close_when_flushed = drop_when_sent
        self._enqueue(frames.close(code, reason))
        if drop_when_sent and not self._blocked:
            self._write()
        self._arm_close_timer()

    def reject(self, code: int, reason: str) -> None:
        """Close a socket that was never admitted (bad token, unknown user, draining)."""
        self.close(code, reason)
        self.start()  # read, so that the client's close answer ends it promptly

    def abort(self, why: str) -> None:
        """Drop the TCP connection now (RST), without a closing handshake."""
        if self.state is CLOSED:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        if self.close_code is None:
            self.close_code, self.close_reason = ABNORMAL, why
        self._finish()

    def keepalive(self) -> None:
        """Called once per ping interval: ping, or give up on a client that never answered."""
        if self.state is not OPEN:
            return
        if not self.heard:
            self.close(Close.KEEPALIVE_TIMEOUT, "no answer to ping")
            return
        self.heard = False
        self._enqueue(frames.PING)

    def defer(self, work: Callable[..., object], *args: object) -> gevent.Greenlet:
        """Run ``work(*args)`` in a greenlet of its own, where it may block.

        The way out of the event-loop rule: a handler that must wait for
        something (a lookup, a round trip) defers it and returns at once.
        ``work`` talks back through this connection (``push``, ``send_now``,
        ``close``), all safe from any greenlet; it should check ``state`` first,
        since the client may have left meanwhile. An exception in ``work`` is
        logged and closes this connection with 1011.
        """

        def run() -> None:
            try:
                work(*args)
            except Exception:
                log.exception("deferred work failed for %s", self.id)
                self.close(Close.INTERNAL_ERROR, "internal error")

        return gevent.spawn(run)

    # -- writing ------------------------------------------------------------

    def push(self, frame: bytes) -> bool:
        """Queue a whole frame for the outbox to write. False if the connection is closing."""
        if self.state is not OPEN:
            return False
        self._enqueue(frame)
        return True

    def push_owed(self, frames: list[bytes]) -> None:
        """Queue what the client is owed at once (a replay, bounded by WS_RECOVERY_MAX_MESSAGES).

        The queue limit stretches to hold it until the queue has been written:
        a client is not a slow consumer for being sent what it missed. For
        two replays at most (a page's first SUBSCRIBEs since: plain, and with
        last): one more owed before the queue was written counts against the
        limit as it stands (a client that asks for replays and reads none
        would otherwise stretch it without end: ``SUBSCRIBE since`` again and
        again).
        """
        if self.state is not OPEN or not frames:
            return
        owed = b"".join(frames)  # one queue entry: a replay is hundreds of frames
        if self._stretched < MAX_OWED_UNREAD:
            self._stretched += 1
            self._queue_limit = self._pending_bytes + len(owed) + self._max_queue
        self._enqueue(owed)

    def send_now(self, frame: bytes) -> bool:
        """Queue a reply and try to write it at once (replies should not wait for a batch)."""
        if not self.push(frame):
            return False
        if not self._blocked:
            self._write()
        return True

    def flush(self) -> None:
        """The outbox's entry point."""
        self._scheduled = False
        if self._pending and not self._blocked and self.state is not CLOSED:
            self._write()

    def _enqueue(self, frame: bytes) -> None:
        # push_all (below) inlines the common case of this method: keep the two alike.
        pending = self._pending
        if pending is None:
            self._pending = [frame]
            self._pending_bytes = len(frame)
        else:
            pending.append(frame)
            self._pending_bytes += len(frame)
            if self._pending_bytes > self._queue_limit and self.state is OPEN:
                if not self._blocked:
                    self._write()  # maybe the outbox just has not got here yet
                if self._pending_bytes > self._queue_limit:
                    self._overflow()
                return
        if not self._scheduled and not self._blocked:
            self._scheduled = True
            self._outbox.schedule(self)

    def _write(self) -> None:
        pending = self._pending
        if not pending:
            return
        # The unsent tail of an earlier write (a memoryview: maybe most of a large replay) goes alone:
        # joined with the frames queued behind it, it would be copied again on every partial send.
        alone = len(pending) == 1 or type(pending[0]) is memoryview
        data = pending[0] if alone else b"".join(pending)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close_code, self.close_reason = ABNORMAL, f"write failed: {exc.strerror or exc}"
            self._finish()
            return
        if sent == len(data) and len(pending) > 1 and alone:
            del pending[0]  # the tail is out: the frames behind it next
            self._pending_bytes -= sent
            self._write()
            return
        if sent == len(data):
            self._pending = None
            self._pending_bytes = 0
            self._queue_limit = self._max_queue
            self._stretched = 0
            if self._blocked and self._write_watch is not None:
                self._write_watch.stop()
                self._blocked = False
            if self._close_when_flushed:
                self._close_when_flushed = False
                if self._parser is None:
                    self._linger()
                else:
                    self._finish()
            return
        # Keep the unsent tail; it must go out before anything else or the stream is torn.
        pending[: 1 if alone else len(pending)] = [memoryview(data)[sent:]]
        self._pending_bytes -= sent
        if not self._blocked:
            if self._write_watch is None:
                self._write_watch = self._loop.io(self._sock.fileno(), _WRITE)
            cast(Watcher, self._write_watch).start(self._on_writable)
            self._blocked = True
            self._outbox.stalls += 1

    def _on_writable(self) -> None:
        try:
            self._write()
        except Exception:
            log.exception("write callback failed")
            self.abort("write_error")

    def _overflow(self) -> None:
        # A started write must finish or the stream is torn; the frames behind it are dropped.
        if self._blocked and self._pending:
            self._pending = self._pending[:1]
            self._pending_bytes = len(self._pending[0])
        else:
            self._pending, self._pending_bytes = None, 0
        self.overflowed = True
        self.close(Close.TRY_AGAIN_LATER, "slow consumer: too much unread data")

    # -- reading ------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            self._read()
        except Exception:
            log.exception("read callback failed for %s", self.id)
            self.abort("internal_error")

    def _read(self) -> None:
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if self.close_code is None:
                self.close_code, self.close_reason = ABNORMAL, f"read failed: {exc.strerror or exc}"
            self._finish()
            return
        if not data:
            if self.close_code is None:
                self.close_code, self.close_reason = ABNORMAL, "connection lost"
            self._finish()
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        self.heard = True
        if self._parser is None:
            return  # after a protocol error the stream cannot be trusted: discard until EOF or the timer
        try:
            messages = self._parser.feed(data)
        except frames.ProtocolViolation as violation:
            # "Fail the WebSocket connection" (RFC 6455 7.1.7): the stream cannot be parsed any
            # further. What came whole before it is handled; then the close frame, and the socket
            # is dropped once it is out.
            self._parser = None
            self._handle_messages(violation.messages)
            self.close(violation.code, violation.reason, drop_when_sent=True)
            return
        self._handle_messages(messages)

    def _handle_messages(self, messages: list[tuple[int, object]]) -> None:
        # The opcode says what the payload is (see FrameParser.feed).
        for opcode, payload in messages:
            if self.state is CLOSED:
                return
            if opcode == frames.OP_TEXT:
                if self.state is OPEN:
                    self._dispatch(self._handler.on_text, payload)
            elif opcode == frames.OP_BINARY:
                if self.state is OPEN:
                    self._dispatch(self._handler.on_binary, payload)
            elif opcode == frames.OP_PING:
                if self.state is OPEN and self._dispatch(self._handler.on_control):
                    self._enqueue(frames.encode(frames.OP_PONG, cast(bytes, payload)))
            elif opcode == frames.OP_PONG:
                if self.state is OPEN:
                    self._dispatch(self._handler.on_control)
            elif opcode == frames.OP_CLOSE:
                self._on_close_frame(*cast(tuple[int, str], payload))

    # Any: the payload is str for on_text and bytes for on_binary; the opcode decided which.
    def _dispatch(self, callback: Callable[..., Any], *payload: object) -> Any:
        """``callback(self, *payload)``'s answer; None when it failed (the connection is then closing)."""
        try:
            return callback(self, *payload)
        except BlockingSwitchOutError as blocked:
            # The one rule of this design was broken (see the module docstring): say so, loudly.
            event(
                "ws.handler_blocked",
                level="error",
                clientId=self.id,
                handler=getattr(callback, "__qualname__", repr(callback)),
                at=_blocking_call_site(blocked),
                message="a frame handler tried to block inside an event-loop callback; "
                "move the waiting work into conn.defer(...)",
            )
            self.close(Close.INTERNAL_ERROR, "internal error")
        except Exception:
            log.exception("handler failed for %s", self.id)
            self.close(Close.INTERNAL_ERROR, "internal error")
        return None

    def _on_close_frame(self, code: int, reason: str) -> None:
        if self.state is OPEN:
            # The client is leaving: echo its code, drop the socket once that is written,
            # and log what the client said.
            self.close(code, drop_when_sent=True, logged=reason)
        else:
            self._finish()  # the answer to our own close frame

    # -- teardown -----------------------------------------------------------

    def _leave_open(self) -> None:
        self.state = CLOSING
        self._tell(self._handler.on_closing)

    def _tell(self, callback: Callable[[Connection], None]) -> None:
        """The handler's ``on_closing``/``on_closed``: a failure is logged and the teardown goes on.
        They run inside watcher callbacks too (a close timer, a failed read), where an exception
        would escape into gevent's hub and the socket would be left half torn down."""
        try:
            callback(self)
        except Exception:
            log.exception("close handler failed for %s", self.id)

    def _arm_close_timer(self) -> None:
        if self._timer is None and self.state is not CLOSED:
            timer = self._timer = self._loop.timer(self._close_timeout)
            timer.start(self._on_close_timeout)

    def _linger(self) -> None:
        """After a protocol violation: the close frame is out, but the client may still be sending.

        Closing now, with its bytes unread, would make the kernel answer with a
        reset, and a reset can destroy the close frame before the client reads
        it (Chrome then reports 1006, not 1009). So send FIN instead and keep
        reading, discarding everything, until the client closes its side or
        the close timer ends it.
        """
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._finish()

    def _on_close_timeout(self) -> None:
        try:
            self.abort("close_timeout")
        except Exception:
            log.exception("close timer failed for %s", self.id)

    def _finish(self) -> None:
        if self.state is CLOSED:
            return
        if self.state is OPEN:
            self._leave_open()
        self.state = CLOSED
        for watch in (self._read_watch, self._write_watch, self._timer):
            if watch is not None:
                watch.stop()
                watch.close()
        self._read_watch = self._write_watch = self._timer = None
        self._pending, self._pending_bytes, self._blocked = None, 0, False
        try:
            self._sock.close()
        except OSError:
            pass
        self._tell(self._handler.on_closed)


def push_all(conns: list[Connection], frame: bytes) -> int:
    """``conn.push(frame)`` on each of ``conns`` (a fan-out's hot loop); returns how many took it.

    The same as calling :meth:`Connection.push` on each, with its common case
    inlined (open, room left in the queue): one call per recipient instead of
    three halved the Python time of a 10,000-recipient fan-out's pushes
    (~240 -> ~130 ns a recipient, warm; about twice that under load). A queue
    about to pass its limit takes the method's own path (flush, or close 1013).
    """
    size = len(frame)
    delivered = 0
    for conn in conns:
        if conn.state is not OPEN:
            continue
        delivered += 1
        pending = conn._pending
        if pending is None:
            conn._pending = [frame]
            conn._pending_bytes = size
        elif conn._pending_bytes + size <= conn._queue_limit:
            pending.append(frame)
            conn._pending_bytes += size
        else:
            conn._enqueue(frame)
            continue
        if not conn._scheduled and not conn._blocked:
            conn._scheduled = True
            conn._outbox.schedule(conn)
    return delivered


def _blocking_call_site(error: BaseException) -> str:
    """Where our code made the blocking call: the innermost traceback frame outside gevent."""
    site = "unknown"
    for frame, line in traceback.walk_tb(error.__traceback__):
        path = frame.f_code.co_filename
        if f"{os.sep}gevent{os.sep}" not in path:
            site = f"{frame.f_code.co_qualname} ({os.path.basename(path)}:{line})"
    return site
