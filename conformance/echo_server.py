"""An echo server built on the project's own framing and connection code, for the Autobahn fuzzing client.

It answers the upgrade itself (a minimal RFC 6455 handshake; the service's
own is Flask-Sock's, which Autobahn does not test) and then hands the socket
to :class:`relay.connection.Connection` with a handler that sends every text
and binary message back: exactly the code path of a live client, from the
first byte after the 101 to the closing handshake.

    python conformance/echo_server.py 9001

Loopback only. Message size: 16 MiB (Autobahn's section 9 sends up to 16 MiB;
the service itself stops at 64 KiB).
"""

from __future__ import annotations

import _socket
import base64
import hashlib
import sys
from pathlib import Path

from gevent import monkey

monkey.patch_all()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gevent.server import StreamServer  # noqa: E402

from relay import frames  # noqa: E402
from relay.connection import Connection  # noqa: E402
from relay.outbox import Outbox  # noqa: E402

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 16 << 20
outbox = Outbox()


class Echo:
    """The Handler: every message straight back (text as text, binary as binary)."""

    def on_text(self, conn, text: str) -> None:
        conn.push(frames.text(text.encode()))

    def on_binary(self, conn, data: bytes) -> None:
        conn.push(frames.encode(frames.OP_BINARY, data))

    def on_control(self, conn) -> bool:
        return True  # the test suite pings hard on purpose: no rate limit here

    def on_closing(self, conn) -> None: ...

    def on_closed(self, conn) -> None: ...


def handle(sock, address) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or len(data) > 16384:
            sock.close()
            return
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    key = headers.get(b"sec-websocket-key", b"")
    accept = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    raw = _socket.socket(fileno=sock.detach())  # the C socket underneath, as blueprints/socket.py does
    conn = Connection(
        raw,
        outbox=outbox,
        handler=Echo(),
        max_message=MAX_MESSAGE,
        max_queue=64 << 20,
        close_timeout=2.0,
        max_frames=1 << 20,  # Autobahn's 9.3.1 streams 65,536 fragments of 64 bytes
    )
    conn.start(rest)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9001
    server = StreamServer(("127.0.0.1", port), handle)
    print(f"echo server on ws://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
