"""Wall-clock time as the wire carries it: epoch milliseconds, and ISO 8601 in UTC."""

from __future__ import annotations

import datetime as dt
import time


def now_ms() -> int:
    """Milliseconds since the epoch (token timestamps, PONG, offsets' publish times)."""
    return int(time.time() * 1000)


def now_iso() -> str:
    """Now as ``2025-11-03T10:00:00.000Z`` (the ``at`` of messages the service writes itself)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
