"""One accepted WebSocket, driven by the event loop: no greenlet of its own.

After Flask-Sock has answered the upgrade, the socket is handed here and the
HTTP request ends. From then on the connection lives on two libev watchers
(readable, and writable only while the kernel buffer is full), so an idle
client costs a few hundred bytes of Python objects instead of a parked
greenlet with its stack. This is also why gunicorn's ``worker_connections``
does not cap the number of open sockets: they no longer hold a pool slot.

Writing never blocks and never tears a frame: a ``send`` that takes only part
of the data keeps the rest (and everything queued after it) until the socket
is writable again. What a client has not taken is bounded by ``max_queue``;
past it the client is closed with 1013 instead of slowing anyone else.

Callbacks from here to the protocol layer go through a small handler
interface (``on_text``, ``on_binary``, ``on_closing``, ``on_closed``) so that
this module knows sockets and frames, and nothing about channels or users.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
import uuid
from typing import Protocol

import gevent

from . import frames
from .codes import Close

log = logging.getLogger("relay.connection")

OPEN = "open"
CLOSING = "closing"
CLOSED = "closed"
ABNORMAL = 1006  # never sent: what a close without a close frame is reported as
_READ = 1
_WRITE = 2
_LINGER_RESET = struct.pack("ii", 1, 0)


class Handler(Protocol):
    def on_text(self, conn: Connection, text: str) -> None: ...

    def on_binary(self, conn: Connection, data: bytes) -> None: ...

    def on_closing(self, conn: Connection) -> None:
        """The connection stopped being OPEN: take it out of every index."""

    def on_closed(self, conn: Connection) -> None:
        """The socket is gone; ``conn.close_code``/``close_reason`` say why."""


class Connection:
    __slots__ = (
        "id",
        "identity",
        "user_id",
        "role",
        "clinic_id",
        "channels",
        "remote",
        "opened_at",
        "heard",
        "rate_tokens",
        "rate_at",
        "state",
        "close_code",
        "close_reason",
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
        "_close_timeout",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        outbox,
        handler: Handler,
        max_message: int,
        max_queue: int,
        close_timeout: float,
        remote: str | None = None,
        loop=None,
    ):
        sock.setblocking(False)
        self.id = str(uuid.uuid4())
        self.identity = None
        self.user_id: str | None = None
        self.role: str | None = None
        self.clinic_id: str | None = None
        self.channels: set[str] = set()
        self.remote = remote
        self.opened_at = time.monotonic()
        self.heard = True  # something arrived since the last keep-alive ping
        self.rate_tokens = 0.0
        self.rate_at = 0.0
        self.state = OPEN
        self.close_code: int | None = None
        self.close_reason = ""
        self._sock = sock
        self._loop = loop if loop is not None else gevent.get_hub().loop
        self._outbox = outbox
        self._handler = handler
        self._parser: frames.FrameParser | None = frames.FrameParser(max_message)
        self._read_watch = None
        self._write_watch = None
        self._timer = None
        self._pending: list | None = None
        self._pending_bytes = 0
        self._scheduled = False
        self._blocked = False
        self._close_when_flushed = False
        self._max_queue = max_queue
        self._close_timeout = close_timeout

    def __repr__(self) -> str:
        return f"<Connection {self.id} user={self.user_id} {self.state}>"

    # -- lifecycle ----------------------------------------------------------

    def identify(self, identity) -> None:
        self.identity = identity
        self.user_id = identity.user_id
        self.role = identity.role
        self.clinic_id = identity.clinic_id

    def start(self) -> None:
        """Begin reading from the client."""
        if self._read_watch is None and self.state is not CLOSED:
            self._read_watch = self._loop.io(self._sock.fileno(), _READ)
            self._read_watch.start(self._on_readable)

    def close(self, code: int, reason: str = "", *, drop_when_sent: bool = False) -> None:
        """Start the closing handshake.

        The close frame goes after what is already queued; the socket is
        dropped when the client answers, or after ``close_timeout`` if it
        does not. ``drop_when_sent`` drops it as soon as the frame is written
        instead (the client already said goodbye, or broke the protocol).
        """
        if self.state is not OPEN:
            return
        self.close_code, self.close_reason = code, reason
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

    # -- writing ------------------------------------------------------------

    def push(self, frame: bytes) -> bool:
        """Queue a whole frame for the outbox to write. False if the connection is closing."""
        if self.state is not OPEN:
            return False
        self._enqueue(frame)
        return True

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
        pending = self._pending
        if pending is None:
            self._pending = [frame]
            self._pending_bytes = len(frame)
        else:
            pending.append(frame)
            self._pending_bytes += len(frame)
            if self._pending_bytes > self._max_queue and self.state is OPEN:
                if not self._blocked:
                    self._write()  # maybe the outbox just has not got here yet
                if self._pending_bytes > self._max_queue:
                    self._overflow()
                return
        if not self._scheduled and not self._blocked:
            self._scheduled = True
            self._outbox.schedule(self)

    def _write(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close_code, self.close_reason = ABNORMAL, f"write failed: {exc.strerror or exc}"
            self._finish()
            return
        if sent == len(data):
            self._pending = None
            self._pending_bytes = 0
            if self._blocked:
                self._write_watch.stop()
                self._blocked = False
            if self._close_when_flushed:
                self._finish()
            return
        # Keep the unsent tail; it must go out before anything else or the stream is torn.
        self._pending = [memoryview(data)[sent:]]
        self._pending_bytes = len(data) - sent
        if not self._blocked:
            if self._write_watch is None:
                self._write_watch = self._loop.io(self._sock.fileno(), _WRITE)
            self._write_watch.start(self._on_writable)
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
        self.heard = True
        if self._parser is None:
            return  # after a protocol error the stream cannot be trusted; wait for the timer
        try:
            messages = self._parser.feed(data)
        except frames.ProtocolViolation as violation:
            # "Fail the WebSocket connection" (RFC 6455 7.1.7): the stream cannot be
            # parsed any further, so send the close frame and drop the socket once it is out.
            self._parser = None
            self.close(violation.code, violation.reason, drop_when_sent=True)
            return
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
                if self.state is OPEN:
                    self._enqueue(frames.encode(frames.OP_PONG, payload))
            elif opcode == frames.OP_CLOSE:
                self._on_close_frame(*payload)

    def _dispatch(self, callback, payload) -> None:
        try:
            callback(self, payload)
        except Exception:
            log.exception("handler failed for %s", self.id)
            self.close(Close.INTERNAL_ERROR, "internal error")

    def _on_close_frame(self, code: int, reason: str) -> None:
        if self.state is OPEN:
            # The client is leaving: echo its code, drop the socket once that is written.
            self.close(code, drop_when_sent=True)
            self.close_reason = reason  # what the client said, for the disconnect log
        else:
            self._finish()  # the answer to our own close frame

    # -- teardown -----------------------------------------------------------

    def _leave_open(self) -> None:
        self.state = CLOSING
        self._handler.on_closing(self)

    def _arm_close_timer(self) -> None:
        if self._timer is None and self.state is not CLOSED:
            self._timer = self._loop.timer(self._close_timeout)
            self._timer.start(self._on_close_timeout)

    def _on_close_timeout(self) -> None:
        self.abort("close_timeout")

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
        self._handler.on_closed(self)
