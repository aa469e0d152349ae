"""A live fuzz: hundreds of clients sending random and malformed frames and HTTP requests at a real gunicorn,
while well-behaved clients receive broadcasts. The worker never restarts, every well-behaved client gets every
broadcast once and in order, and memory returns to its level once the fuzzers are gone."""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from support import Resumer

FUZZERS = 300  # sessions, each a fresh TCP connection, all at once
MIN_BROADCASTS = 60  # published while the fuzz runs (and after, until at least this many)
MAX_BROADCASTS = 3000  # a bound on the loop


def masked(opcode: int, payload: bytes, rng: random.Random, *, fin=True, rsv=0, mask=True) -> bytes:
    size = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if size < 126:
        head = bytes((first, (0x80 if mask else 0) | size))
    elif size < 65536:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, size)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, size)
    if not mask:
        return head + payload
    key = rng.randbytes(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def random_frames(rng: random.Random) -> bytes:
    """A burst of frames that are mostly wrong in some way."""
    out = b""
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.25:
            message = rng.choice(
                [
                    {"type": rng.choice(["PING", "SUBSCRIBE", "UNSUBSCRIBE", "DANCE", 7, None])},
                    {"type": "SUBSCRIBE", "data": {"channels": [rng.choice(["system:announcements", "x" * 300, 5])]}},
                    {"type": "SUBSCRIBE", "data": {"channels": "not a list", "last": rng.choice([True, 1, "yes"])}},
                    [1, 2, 3],
                ]
            )
            out += masked(0x1, json.dumps(message).encode(), rng)
        elif kind < 0.4:
            out += masked(0x1, rng.randbytes(rng.randint(0, 200)), rng)  # maybe not UTF-8
        elif kind < 0.5:
            out += masked(rng.choice([0x3, 0x7, 0xB, 0xF]), rng.randbytes(10), rng)  # reserved opcodes
        elif kind < 0.6:
            out += masked(0x1, b"half", rng, fin=False) + masked(0x2, b"interleaved", rng)  # broken fragmenting
        elif kind < 0.7:
            out += masked(0x9, rng.randbytes(rng.randint(0, 200)), rng)  # control frame, maybe too long
        elif kind < 0.8:
            out += masked(0x8, struct.pack("!H", rng.choice([0, 999, 1005, 1015, 2999, 5000])), rng)
        elif kind < 0.9:
            out += masked(0x1, b"unmasked", rng, mask=False)
        else:
            out += bytes((0x81, 0xFF)) + struct.pack("!Q", 1 << rng.randint(20, 63))  # announce a monster
    return out


def random_http(rng: random.Random, port: int) -> bytes:
    choices = [
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * rng.randint(1000, 20000) + b"\r\n\r\n",
        rng.randbytes(rng.randint(1, 500)) + b"\r\n\r\n",
        b"POST /broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: "
        + str(rng.randint(-5, 99999)).encode()
        + b"\r\n\r\n"
        + rng.randbytes(rng.randint(0, 300)),
        b"POST /broadcast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + rng.randbytes(50),
        b"BREW /coffee HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",  # no key
        b"GET /ws?token="
        + base64.b64encode(rng.randbytes(30))
        + b" HTTP/1.1\r\nHost: 127.0.0.1:"
        + str(port).encode()
        + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
        + base64.b64encode(os.urandom(16))
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ]
    return rng.choice(choices)


def fuzz_one(port: int, token: str, seed: int) -> None:
    rng = random.Random(seed)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            if rng.random() < 0.6:  # a real upgrade, then garbage
                key = base64.b64encode(os.urandom(16)).decode()
                sock.sendall(
                    f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
                )
                sock.recv(4096)
                for _ in range(rng.randint(1, 3)):
                    sock.sendall(random_frames(rng))
            else:
                sock.sendall(random_http(rng, port))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.recv(65536):
                pass
    except OSError:
        pass  # the server may close on us at any point: that is its right


def test_the_worker_survives_a_live_fuzz_and_good_clients_get_everything(start_server):
    srv = start_server(WS_CLOSE_TIMEOUT_MS=500, HTTP_REQUEST_TIMEOUT_MS=2000)
    pid = srv.health()["pid"]
    good = [Resumer(srv, user, ["system:announcements"]) for user in ("alice", "bob", "carol", "erin") * 5]
    for client in good:
        client.connect()
    time.sleep(0.5)
    rss_before = srv.health()["memory"]["rss"]
    token = srv.token("dave")  # a disabled user's token: refused even before any garbage, or
    tokens = [srv.token(user) for user in ("alice", "bob", "carol", "erin")] + [token]
    sent: list[str] = []
    fuzzing_done = threading.Event()

    def publish():  # all through the fuzz, and a little after
        for n in range(MAX_BROADCASTS):
            if fuzzing_done.is_set() and n >= MIN_BROADCASTS:
                break
            response = srv.broadcast(
                {"message": {"type": "GOOD", "data": {"n": n}}, "filter": {"channels": ["system:announcements"]}}
            )
            assert response.status_code == 200, response.text
            sent.append(response.json()["id"])
            time.sleep(0.03)

    publisher = threading.Thread(target=publish)
    publisher.start()
    with ThreadPoolExecutor(FUZZERS) as pool:  # all of them at once
        list(pool.map(lambda n: fuzz_one(srv.port, tokens[n % len(tokens)], 1000 + n), range(FUZZERS)))
    during = len(sent)
    fuzzing_done.set()
    publisher.join(timeout=60)
    assert not publisher.is_alive() and during >= 10 and len(sent) >= MIN_BROADCASTS, (during, len(sent))
    for client in good:
        client.read(quiet=1.0)
        assert client.ids == sent  # every one, once, in order
        client.close()
    assert srv.health()["pid"] == pid  # the worker never restarted
    time.sleep(2.5)  # the fuzzers' sockets and greenlets are gone
    rss_after = srv.health()["memory"]["rss"]
    assert rss_after < rss_before + 25 * 1024 * 1024, (rss_before, rss_after)
    log = srv.log_text()
    assert "Traceback" not in log and "Worker exiting" not in log and "WORKER TIMEOUT" not in log
