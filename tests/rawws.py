"""A hand-made WebSocket client for the cases a polite library cannot play:
one that never answers, one that reads one byte at a time, one that stalls."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct


class RawClient:
    def __init__(self, port: int, token: str, *, rcvbuf: int | None = None, pipelined: list[dict] = ()):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        # ``pipelined`` messages go in the same write as the request, before the 101 (an impatient client).
        self.sock.sendall(request + b"".join(self._frame(message) for message in pipelined))
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))

    def send_json(self, message: dict) -> None:
        self.sock.sendall(self._frame(message))

    @staticmethod
    def _frame(message: dict) -> bytes:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        size = len(payload)
        header = bytes((0x81, 0x80 | size)) if size < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, size)
        return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 0x8:
                return struct.unpack("!H", payload[:2])[0]

    def read_frame(self, chunk: int = 65536) -> tuple[int, bytes]:
        """The next whole server frame as (opcode, payload), reading ``chunk`` bytes at a time."""
        while True:
            frame = self._take_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(chunk)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data

    def read_json(self, chunk: int = 65536) -> dict:
        while True:
            opcode, payload = self.read_frame(chunk)
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise ConnectionError(f"closed with {struct.unpack('!H', payload[:2])[0]}")

    def _take_frame(self):
        buf = self.buffer
        if len(buf) < 2:
            return None
        assert buf[0] & 0x80, "server frames are never fragmented"
        assert not buf[1] & 0x80, "server frames are never masked"
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
        return buf[0] & 0x0F, buf[head : head + size]

    def close(self) -> None:
        self.sock.close()
