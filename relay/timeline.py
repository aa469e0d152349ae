"""The last hour, minute by minute: what ``GET /health?history=1`` shows and the dashboard draws.

Each worker keeps 60 one-minute buckets (bounded memory: a bucket's keys are
close codes, refusal reasons and error codes, each from a fixed set). With
Redis, every worker shares its buckets (``relay.redis_timeline``) and any
worker can answer for the cluster by merging them: counts add up, the
"open connections (max)" of a minute is the sum of each worker's maximum
(an upper bound: two workers' peaks need not coincide), and broadcast
durations merge exactly because they are kept as histograms, not percentiles.

Everything here is plain data and arithmetic: recording is a few dict
updates, safe to call from an event-loop callback.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from .codes import Close

MINUTES = 60
# Broadcast durations (POST to answer), milliseconds: the upper bound of each histogram bin.
DURATION_BINS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 25, 50, 75, 100, 250, 500, 1000, 2500, 5000, 10_000)
# Closes that are part of normal life: the server or the page ended it, or a deploy restarted the worker.
NORMAL_CLOSES = frozenset({"1000", "1001", "1012"})
KNOWN_CLOSES = frozenset({*(str(c) for c in range(1000, 1016)), *(str(int(c)) for c in Close)})


def close_label(code: int | None) -> str:
    """A close code as a bounded label: a client may close with any of 4,000 codes."""
    text = str(code) if code is not None else "1005"
    return text if text in KNOWN_CLOSES else "other"


class Minute:
    """One minute of one worker (or, merged, of the cluster)."""

    __slots__ = (
        "start",
        "connections_max",
        "connects",
        "disconnects",
        "auth_failures",
        "client_errors",
        "broadcasts",
        "delivered",
        "durations",
    )

    def __init__(self, start: int):
        self.start = start  # epoch seconds, a multiple of 60
        self.connections_max = 0
        self.connects = 0
        self.disconnects: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.client_errors: dict[str, int] = {}
        self.broadcasts = 0
        self.delivered = 0
        self.durations = [0] * (len(DURATION_BINS_MS) + 1)

    def to_json(self) -> dict:
        return {
            "start": self.start,
            "connectionsMax": self.connections_max,
            "connects": self.connects,
            "disconnects": dict(self.disconnects),
            "authFailures": dict(self.auth_failures),
            "clientErrors": dict(self.client_errors),
            "broadcasts": self.broadcasts,
            "delivered": self.delivered,
            "durations": list(self.durations),
        }

    @classmethod
    def from_json(cls, doc: dict) -> Minute:
        minute = cls(int(doc["start"]))
        minute.connections_max = int(doc.get("connectionsMax", 0))
        minute.connects = int(doc.get("connects", 0))
        minute.disconnects = {str(k): int(v) for k, v in (doc.get("disconnects") or {}).items()}
        minute.auth_failures = {str(k): int(v) for k, v in (doc.get("authFailures") or {}).items()}
        minute.client_errors = {str(k): int(v) for k, v in (doc.get("clientErrors") or {}).items()}
        minute.broadcasts = int(doc.get("broadcasts", 0))
        minute.delivered = int(doc.get("delivered", 0))
        durations = [int(n) for n in doc.get("durations") or []]
        if len(durations) == len(minute.durations):
            minute.durations = durations
        return minute

    def add(self, other: Minute) -> None:
        self.connections_max += other.connections_max
        self.connects += other.connects
        for mine, theirs in (
            (self.disconnects, other.disconnects),
            (self.auth_failures, other.auth_failures),
            (self.client_errors, other.client_errors),
        ):
            for key, count in theirs.items():
                mine[key] = mine.get(key, 0) + count
        self.broadcasts += other.broadcasts
        self.delivered += other.delivered
        self.durations = [a + b for a, b in zip(self.durations, other.durations, strict=True)]

    def percentile(self, share: float) -> float | None:
        """The duration (ms) below which ``share`` of this minute's broadcasts took: a bin's upper bound."""
        total = sum(self.durations)
        if not total:
            return None
        rank = share * total
        seen = 0
        for index, count in enumerate(self.durations):
            seen += count
            if seen >= rank:
                return DURATION_BINS_MS[index] if index < len(DURATION_BINS_MS) else float(DURATION_BINS_MS[-1])
        return float(DURATION_BINS_MS[-1])  # pragma: no cover - the loop always reaches the rank


class Timeline:
    """This worker's last hour. ``clock`` returns epoch seconds (a test passes its own)."""

    def __init__(self, clock: Callable[[], float] = time.time, minutes: int = MINUTES):
        self.clock = clock
        self.minutes = minutes
        self._buckets: dict[int, Minute] = {}
        self._open = 0  # open connections now, for the current minute's maximum

    def _now(self) -> Minute:
        start = int(self.clock()) // 60 * 60
        bucket = self._buckets.get(start)
        if bucket is None:
            bucket = self._buckets[start] = Minute(start)
            bucket.connections_max = self._open
            oldest = start - (self.minutes - 1) * 60
            for stale in [s for s in self._buckets if s < oldest]:
                del self._buckets[stale]
        return bucket

    # -- recording (called from anywhere, event-loop callbacks included) --------------------

    def connected(self) -> None:
        self._open += 1
        bucket = self._now()
        bucket.connects += 1
        bucket.connections_max = max(bucket.connections_max, self._open)

    def disconnected(self, code: int | None) -> None:
        self._open = max(0, self._open - 1)
        bucket = self._now()
        label = close_label(code)
        bucket.disconnects[label] = bucket.disconnects.get(label, 0) + 1

    def auth_failed(self, reason: str) -> None:
        bucket = self._now()
        bucket.auth_failures[reason] = bucket.auth_failures.get(reason, 0) + 1

    def client_error(self, code: str) -> None:
        bucket = self._now()
        bucket.client_errors[code] = bucket.client_errors.get(code, 0) + 1

    def broadcast(self, delivered: int, duration_ms: float) -> None:
        bucket = self._now()
        bucket.broadcasts += 1
        bucket.delivered += delivered
        bucket.durations[bisect.bisect_left(DURATION_BINS_MS, duration_ms)] += 1

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        """Every kept minute, oldest first (what a worker shares with the others)."""
        self._now()  # rolls the window forward even when nothing happened lately
        return [self._buckets[start].to_json() for start in sorted(self._buckets)]


def merge(snapshots: Iterable[list[dict]], now: float, minutes: int = MINUTES) -> list[Minute]:
    """The cluster's last ``minutes`` minutes, oldest first, one bucket per minute (empty ones included)."""
    current = int(now) // 60 * 60
    starts = [current - (minutes - 1 - i) * 60 for i in range(minutes)]
    merged = {start: Minute(start) for start in starts}
    for snapshot in snapshots:
        for doc in snapshot:
            try:
                bucket = Minute.from_json(doc)
            except (KeyError, TypeError, ValueError):
                continue  # a worker of another version: skip what cannot be read
            if bucket.start in merged:
                merged[bucket.start].add(bucket)
    return [merged[start] for start in starts]


def history_json(minutes: list[Minute]) -> dict:
    """``/health?history=1``'s ``history`` and ``errorRates``."""
    rows = []
    for minute in minutes:
        row = minute.to_json()
        del row["durations"]
        row["broadcastP50Ms"] = minute.percentile(0.5)
        row["broadcastP99Ms"] = minute.percentile(0.99)
        rows.append(row)
    return {"history": rows, "errorRates": error_rates(minutes)}


def error_rates(minutes: list[Minute]) -> dict:
    """Over the last 1, 5 and 15 minutes (the current, partial minute included): auth failures and
    client errors per minute, and the share of closes that were abnormal (not 1000, 1001 or 1012)."""
    out = {}
    for span in (1, 5, 15):
        window = minutes[-span:]
        auth = sum(sum(m.auth_failures.values()) for m in window)
        errors = sum(sum(m.client_errors.values()) for m in window)
        closes = sum(sum(m.disconnects.values()) for m in window)
        abnormal = sum(n for m in window for code, n in m.disconnects.items() if code not in NORMAL_CLOSES)
        out[f"{span}m"] = {
            "authFailuresPerMin": round(auth / span, 3),
            "clientErrorsPerMin": round(errors / span, 3),
            "abnormalCloseShare": round(abnormal / closes, 4) if closes else 0.0,
            "closes": closes,
        }
    return out


class TimelineShare(Protocol):
    """Where workers leave their timelines for each other (Redis), or just this worker's own."""

    def publish(self, worker_id: str, snapshot: list[dict]) -> None: ...

    def collect(self) -> list[list[dict]]: ...


class LocalShare:
    """One process: the cluster is this worker."""

    def __init__(self, timeline: Timeline):
        self.timeline = timeline

    def publish(self, worker_id: str, snapshot: list[dict]) -> None:
        pass

    def collect(self) -> list[list[dict]]:
        return [self.timeline.snapshot()]
