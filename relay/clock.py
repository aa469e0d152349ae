"""Wall-clock time as the wire carries it: epoch milliseconds, and ISO 8601 in UTC."""

from __future__ import annotations

import datetime as dt
import time
from typing import TypeVar


def now_ms() -> int:
    """Milliseconds since the epoch (token timestamps, PONG, offsets' publish times)."""
    return int(time.time() * 1000)


Moment = TypeVar("Moment", int, float)


def drop_older(times: dict[str, Moment], cutoff: Moment) -> list[str]:
    """Remove from the front of ``times`` (kept in the order of its times, oldest first) every key whose
    time is before ``cutoff``; return them. Stops at the first one that is not: bounded by what it drops."""
    dropped = []
    while times:
        key, at = next(iter(times.items()))
        if at >= cutoff:
            break
        del times[key]
        dropped.append(key)
    return dropped


def now_iso() -> str:
    """Now as ``2025-11-03T10:00:00.000Z`` (the ``at`` of messages the service writes itself)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
