"""Both ends of RFC 6455 as a test plays the client: masked client frames out, server frames in."""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import gevent


def client_frame(opcode: int, payload: bytes, *, fin=True, masked=True, rsv=0, length_override=None) -> bytes:
    """A frame as a browser would send it (masked)."""
    first = (0x80 if fin else 0) | rsv | opcode
    size = len(payload) if length_override is None else length_override
    mask_bit = 0x80 if masked else 0
    if size < 126:
        header = bytes((first, mask_bit | size))
    elif size < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if not masked:
        return header + payload
    key = os.urandom(4)
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(message: dict | str) -> bytes:
    """A masked text frame carrying ``message`` (JSON-encoded unless it is a str)."""
    body = message if isinstance(message, str) else json.dumps(message)
    return client_frame(0x1, body.encode())


def close_frame(code: int, reason: str = "") -> bytes:
    return client_frame(0x8, struct.pack("!H", code) + reason.encode())


class ServerFrames:
    """Reads the server's (unmasked) frames off the test's end of a socketpair.

    Waiting yields to gevent's loop, so the connection under test (on the
    other end, in the same thread) keeps writing while the test reads.
    """

    def __init__(self, sock: socket.socket, timeout: float = 2.0):
        self.sock = sock
        self.sock.setblocking(False)
        self.timeout = timeout
        self.buffer = b""

    def next(self) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); ConnectionError at EOF, TimeoutError after ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no whole frame from the server within {self.timeout} s") from None
                gevent.sleep(0.001)
                continue
            if not data:
                raise ConnectionError("the server closed the TCP connection")
            self.buffer += data

    def json(self) -> dict:
        opcode, payload = self.next()
        assert opcode == 0x1, f"expected a text frame, got opcode {opcode:#x}: {payload[:80]!r}"
        return json.loads(payload)

    def close_code(self) -> tuple[int, str]:
        """Skip to the server's close frame and return its (code, reason)."""
        while True:
            opcode, payload = self.next()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    def _take(self) -> tuple[int, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        assert buf[0] & 0x80 and not buf[1] & 0x80, "server frames are final and unmasked"
        size, head = buf[1] & 0x7F, 2
        if size == 126:
            if len(buf) < 4:
                return None
            size, head = struct.unpack("!H", buf[2:4])[0], 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size, head = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < head + size:
            return None
        self.buffer = buf[head + size :]
        return buf[0] & 0x0F, bytes(buf[head : head + size])
