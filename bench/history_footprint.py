"""What the delivery guarantee keeps, measured: 10,000 clients and 100 broadcasts/s over a full window.

Fills each store the way that load would at steady state, through the real
History classes: the window's worth of broadcasts (100/s x 120 s = 12,000,
each ~300 bytes of data, addressed to one of 200 clinic channels, each with an
Idempotency-Key), the last value of each channel, and 10,000 sessions with two
channels each. Then it reports Redis's ``used_memory`` growth, the SQLite
file's size, and what a worker holds in memory for the same load (its
recent window of 4,096 envelopes and its 10,000 live sessions).

    python bench/history_footprint.py            # needs redis-server; ~30 s

Loopback only; the redis-server it starts is stopped by its PID.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relay.envelope import Envelope, Filter  # noqa: E402
from relay.history import Idempotency, Session  # noqa: E402
from relay.redis_history import RedisHistory  # noqa: E402
from relay.sequencer import Sequencer  # noqa: E402
from relay.sqlite_history import SqliteHistory  # noqa: E402

CLIENTS, RATE, WINDOW_S, CHANNELS = 10_000, 100, 120, 200
BROADCASTS = RATE * WINDOW_S


def envelope(n: int) -> Envelope:
    data = {
        "queue": [{"number": i, "name": f"Patient {n}-{i}", "room": "B"} for i in range(6)],
        "at": "2026-12-01T10:00:00Z",
    }
    return Envelope("QUEUE_UPDATE", data, Filter(channels=frozenset({f"clinic:c-{n % CHANNELS}:queue"})))


def fill(store) -> None:
    now = int(time.time() * 1000)
    for n in range(BROADCASTS):
        e = envelope(n)
        key = Idempotency.of("api", f"producer-{n}", e.type, e.data, e.filter.to_json())
        store.append(e, idempotency=key)
        store.complete(key, {"ok": True, "delivered": 50, "id": e.id, "offset": n + 1})
    sessions = [
        Session(str(uuid.uuid4()), f"user-{i}", (f"clinic:c-{i % CHANNELS}:queue", "system:announcements"))
        for i in range(CLIENTS)
    ]
    for start in range(0, CLIENTS, 1000):
        store.save_sessions(sessions[start : start + 1000], now + 240_000)


def redis_used(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += conn.recv(65536)
    line = next(li for li in data.decode().splitlines() if li.startswith("used_memory:"))
    return int(line.split(":")[1])


def worker_side() -> tuple[int, int]:
    """Bytes a worker holds for the recent window and its live sessions (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    sequencer = Sequencer(lambda e: 0, lambda a, n: [], on_reset=lambda e: None)
    sequencer.prime("e", 0)
    for n in range(BROADCASTS):
        sequencer.offer(envelope(n).placed("e", n + 1))
    window = tracemalloc.get_traced_memory()[0] - before
    before = tracemalloc.get_traced_memory()[0]
    live = {str(uuid.uuid4()): ({f"clinic:c-{i % CHANNELS}:queue", "system:announcements"}) for i in range(CLIENTS)}
    sessions = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del live
    return window, sessions


def main() -> None:
    results = {"clients": CLIENTS, "broadcasts_per_s": RATE, "window_s": WINDOW_S, "broadcasts_kept": BROADCASTS}
    with tempfile.TemporaryDirectory(prefix="relay-footprint-") as scratch:
        db = Path(scratch) / "history.db"
        store = SqliteHistory(str(db), window_ms=WINDOW_S * 1000, last_value_ttl_ms=86_400_000)
        started = time.perf_counter()
        fill(store)
        results["sqlite_fill_s"] = round(time.perf_counter() - started, 2)
        store.close()
        results["sqlite_bytes"] = sum(p.stat().st_size for p in Path(scratch).glob("history.db*"))

        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("needs redis-server (apt-get install redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", scratch],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                try:
                    base = redis_used(port)
                    break
                except OSError:
                    time.sleep(0.05)
            store = RedisHistory(
                f"redis://127.0.0.1:{port}/0", prefix="relay", window_ms=WINDOW_S * 1000, last_value_ttl_ms=86_400_000
            )
            started = time.perf_counter()
            fill(store)
            results["redis_fill_s"] = round(time.perf_counter() - started, 2)
            results["redis_bytes"] = redis_used(port) - base
            store.close()
        finally:
            redis.terminate()
            redis.wait(10)
    window, sessions = worker_side()
    results["worker_recent_window_bytes"] = window
    results["worker_live_sessions_bytes"] = sessions
    print(json.dumps(results, indent=2))
    mb = 1 << 20
    print(
        f"\nRedis +{results['redis_bytes'] / mb:.1f} MB, SQLite {results['sqlite_bytes'] / mb:.1f} MB on disk; "
        f"per worker: recent window {window / mb:.1f} MB, live sessions {sessions / mb:.1f} MB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
