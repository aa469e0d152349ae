"""The broadcast log: who sent what, to whom, when, and how many received it.

Every broadcast this service publishes becomes one :class:`LoggedBroadcast`,
kept where the identity lives (the instance SQLite, or a Supabase table) for
``BROADCAST_LOG_DAYS``, and readable from any worker or host. Two stores
implement :class:`BroadcastLog` (``relay.sqlite_broadcast_log``,
``relay.supabase_broadcast_log``); one conformance test checks both.

Writing never holds up a broadcast: :class:`LogWriter` queues the record and
writes batches from its own greenlet every fraction of a second, retries a
store that is down (the queue is bounded: past 10,000 waiting records, or
64 MiB of them, the oldest are dropped and counted, loudly), and flushes what
is left when the worker stops.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import gevent
from gevent.event import Event

from . import jsonsafe
from .clock import now_ms
from .envelope import TYPE_PATTERN
from .eventlog import event

log = logging.getLogger("relay.broadcast_log")
PREVIEW_CHARS = 200
PAGE_MAX = 500
QUEUE_BYTES = 64 << 20
# What one queued record holds besides its filter (the dataclass, its strings, the preview), and
# what each value of its filter adds (a str in a list of a dict): a broadcast to 1,000 user ids
# holds ~100 KB here, so a queue bounded by count alone held up to ~1 GB while its store was down.
RECORD_BYTES = 1200
LOGGED_VALUE_BYTES = 100


class LogUnavailable(Exception):
    """The store did not answer; the message says why."""


@dataclass(frozen=True)
class LoggedBroadcast:
    id: str
    at: int  # ms since the epoch, when it was accepted
    source: str  # "api" (a service with the admin secret) or "admin" (a signed-in admin)
    sender: str  # "service", or the admin's user id
    type: str
    filter: dict  # as the request gave it (normalized)
    delivered: int
    size: int  # bytes of its data as JSON
    preview: str  # the first 200 characters of its data as JSON
    offset: int | None = None  # its place in the stream (None with recovery off)

    @property
    def channels(self) -> list[str]:
        return list(self.filter.get("channels") or [])

    @property
    def weight(self) -> int:
        """Roughly what this record holds in memory (the writer's queue is bounded by it)."""
        values = sum(len(v) for v in self.filter.values() if isinstance(v, list))
        return RECORD_BYTES + LOGGED_VALUE_BYTES * values

    @property
    def whole(self) -> bool:
        """Whether ``preview`` is all of the data (it was no longer than 200 characters)."""
        return self.size == len(self.preview.encode())

    @property
    def text(self) -> str:
        """What a person reads: the data's ``"message"`` when there is one (and all of it is here), else the JSON."""
        if self.whole:
            try:
                data = json.loads(self.preview)
            except ValueError:
                return self.preview
            if isinstance(data, dict) and isinstance(data.get("message"), str):
                return data["message"]
        return self.preview

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "offset": self.offset,
            "at": self.at,
            "source": self.source,
            "sender": self.sender,
            "type": self.type,
            "filter": self.filter,
            "delivered": self.delivered,
            "size": self.size,
            "preview": self.preview,
        }


def source_kind(source: str) -> str:
    """``api`` for a service with the admin secret; ``admin`` for a signed-in admin (API or form)."""
    return "api" if source == "api" else "admin"


def record_of(
    *,
    envelope_id: str,
    offset: int | None,
    at: int,
    source: str,
    type_: str,
    data: object,
    filter_: dict,
    delivered: int,
) -> LoggedBroadcast:
    """Build the record of a published broadcast. ``source`` is the Broadcaster's: ``api``,
    ``admin:<user id>`` (the admin API) or ``admin-page:<user id>`` (the form)."""
    _, _, who = source.partition(":")
    text = jsonsafe.compact(data)
    return LoggedBroadcast(
        id=envelope_id,
        offset=offset,
        at=at,
        source=source_kind(source),
        sender=who or "service",
        type=type_,
        filter=filter_,
        delivered=delivered,
        size=len(text.encode()),
        preview=text[:PREVIEW_CHARS],
    )


@dataclass(frozen=True)
class LogQuery:
    """Newest first. Every field narrows; ``offset`` rows are skipped, then up to ``limit`` returned."""

    type: str | None = None
    channel: str | None = None
    sender: str | None = None
    since: int | None = None  # ms, inclusive
    until: int | None = None  # ms, inclusive
    offset: int = 0
    limit: int = 50

    def __post_init__(self) -> None:
        """Refuse (ValueError, with a message to show) a filter no broadcast could match."""
        for name in ("type", "channel", "sender"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) > 256:
                raise ValueError(f"{name} is longer than 256 characters")
            if not value.isprintable():  # a NUL cannot even be asked of Postgres (Supabase's store)
                raise ValueError(f"{name} may not contain control characters")
        if self.channel is not None and "," in self.channel:  # no channel name has one; a store could split it
            raise ValueError("channel names one channel (no commas)")
        if self.type is not None and not TYPE_PATTERN.fullmatch(self.type):
            hint = f": did you mean {self.type.upper()}?" if TYPE_PATTERN.fullmatch(self.type.upper()) else ""
            raise ValueError(
                f"type {self.type[:64]!r} is no message type (they are upper case, e.g. ANNOUNCEMENT){hint}"
            )
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since is after until: no broadcast can be in that window")


CSV_COLUMNS = ("at", "id", "offset", "source", "sender", "type", "channels", "filter", "delivered", "size", "preview")
_RELATIVE = re.compile(r"(\d{1,6})\s*([smhd])")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_LATEST_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time iso() can write


def parse_when(text: str, now: int) -> int:
    """A time as a person types it: ``90m``, ``1h``, ``2d`` ago, or ISO 8601 (no zone means UTC).

    Returns ms since the epoch; raises ValueError with a message to show. Ago reaches back
    to 1970 at most (``999999d`` is "everything"); a time must lie between 1970 and 9999, the
    range every store can be asked about (Supabase is asked in ISO 8601 text).
    """
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return max(0, now - int(relative.group(1)) * _UNIT_MS[relative.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not a time: use 30m, 2h, 7d, or 2026-12-01T09:30") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    ms = int(when.timestamp() * 1000)
    if not 0 <= ms <= _LATEST_MS:
        raise ValueError(f"{text[:40]!r} is out of range: use a time from 1970 to 9999")
    return ms


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def csv_text(rows: list[LoggedBroadcast]) -> str:
    """Rows as CSV with a header (spreadsheet-safe: a cell starting with = + - @ is quoted with a ')."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        cells = [
            iso(r.at),
            r.id,
            "" if r.offset is None else r.offset,
            r.source,
            r.sender,
            r.type,
            " ".join(r.channels),
            json.dumps(r.filter, separators=(",", ":")),
            r.delivered,
            r.size,
            r.preview,
        ]
        writer.writerow([_safe_cell(c) for c in cells])
    return out.getvalue()


def _safe_cell(value: object) -> object:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value  # a spreadsheet would run it as a formula
    return value


class BroadcastLog(Protocol):
    name: str

    def write(self, rows: list[LoggedBroadcast]) -> None:
        """Store ``rows`` (an id already stored is left as it is). Raises LogUnavailable."""
        ...

    def query(self, query: LogQuery) -> list[LoggedBroadcast]:
        """Up to ``query.limit`` rows, newest first (ties by id). Raises LogUnavailable."""
        ...

    def trim(self, before_ms: int) -> int:
        """Delete rows accepted before ``before_ms``; returns how many (or -1 when the store cannot say)."""
        ...

    def close(self) -> None:
        """Let go of the file or the HTTP connections."""
        ...


class LogWriter:
    """Queues records and writes them in batches from one greenlet (see the module docstring)."""

    def __init__(
        self,
        store: BroadcastLog,
        *,
        retention_days: int,
        interval: float = 0.2,
        batch: int = 200,
        limit: int = 10_000,
        limit_bytes: int = QUEUE_BYTES,
    ):
        self.store = store
        self.retention_ms = retention_days * 86_400_000
        self.interval = interval
        self.batch = batch
        self._queue: deque[LoggedBroadcast] = deque()
        self._in_flight = 0  # rows taken out of the queue whose write has not answered yet
        self._limit, self._limit_bytes = limit, limit_bytes
        self._queued_bytes = 0  # the weight of what is in _queue
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        self._trimmer: gevent.Greenlet | None = None
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
            self._trimmer = gevent.spawn(self._trim_forever)

    def record(self, row: LoggedBroadcast) -> None:
        """Queue ``row`` (never waits)."""
        self._queue.append(row)
        self._queued_bytes += row.weight
        self._keep_within_bounds()
        if self._greenlet is None:
            self._write_some()  # not started (a command, a test of the core): write now
        elif len(self._queue) >= self.batch:
            self._wake.set()

    def flush(self, deadline: float = 5.0) -> bool:
        """Write everything queued, and wait for a batch the writer has in flight (a stopping worker);
        False if the store would not take it all in time."""
        ends = time.monotonic() + deadline
        while time.monotonic() < ends:
            if self._queue:
                if not self._write_some():
                    gevent.sleep(0.2)
            elif self._in_flight:
                gevent.sleep(0.05)  # the writer's batch is in flight; it may yet come back
            else:
                return True
        return not self._queue and not self._in_flight

    def status(self) -> dict:
        return {
            "store": self.store.name,
            # In flight counts: a batch waiting on a store that is down is still unwritten.
            "queued": len(self._queue) + self._in_flight,
            "written": self.written,
            "dropped": self.dropped,
            "lastError": self.last_error,
            "retentionDays": self.retention_ms // 86_400_000,
        }

    def _run(self) -> None:
        backoff = self.interval
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            backoff = self.interval if self._write_some() else min(backoff * 2, 30.0)

    def _write_some(self) -> bool:
        """One batch; True if it was written (or there was none)."""
        if not self._queue:
            return True
        # Taken out before the write waits: a flush (an admin page, the drain) may write meanwhile,
        # and each writer must write, and remove, rows of its own.
        rows = [self._queue.popleft() for _ in range(min(self.batch, len(self._queue)))]
        self._queued_bytes -= sum(r.weight for r in rows)
        self._in_flight += len(rows)
        try:
            return self._write_batch(rows)
        finally:
            self._in_flight -= len(rows)

    def _write_batch(self, rows: list[LoggedBroadcast]) -> bool:
        try:
            self.store.write(rows)
        except LogUnavailable as down:
            self._put_back(rows, down)
            return False
        except Exception:
            # Not the store being down: something in these rows it cannot take. One at a time, so that
            # a bad row costs only itself, and the writer (the only one) lives on.
            log.exception("the broadcast log could not write a batch; writing its rows one by one")
            return self._write_one_by_one(rows)
        self.written += len(rows)
        if self.last_error is not None:
            event("broadcast_log.recovered", store=self.store.name, queued=len(self._queue))
            self.last_error = None
        return True

    def _write_one_by_one(self, rows: list[LoggedBroadcast]) -> bool:
        for index, row in enumerate(rows):
            try:
                self.store.write([row])
            except LogUnavailable as down:
                self._put_back(rows[index:], down)
                return False
            except Exception:
                log.exception("broadcast %s could not be logged; it is dropped", row.id)
                self.dropped += 1
            else:
                self.written += 1
        return True

    def _put_back(self, rows: list[LoggedBroadcast], down: LogUnavailable) -> None:
        self._queue.extendleft(reversed(rows))  # first again, in their order
        self._queued_bytes += sum(r.weight for r in rows)
        self._keep_within_bounds()
        if self.last_error is None:
            event("broadcast_log.unavailable", level="error", store=self.store.name, error=str(down))
        self.last_error = str(down)

    def _keep_within_bounds(self) -> None:
        """Drop the oldest until the queue is within its count and its bytes (the newest always stays)."""
        while len(self._queue) > 1 and (len(self._queue) > self._limit or self._queued_bytes > self._limit_bytes):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        self._queued_bytes -= self._queue.popleft().weight
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            event("broadcast_log.dropped", level="error", dropped=self.dropped, store=self.store.name)

    def _trim_forever(self) -> None:
        while True:
            try:
                removed = self.store.trim(now_ms() - self.retention_ms)
                if removed:
                    log.info("broadcast log: %s rows past %s days removed", removed, self.retention_ms // 86_400_000)
            except LogUnavailable as down:
                log.warning("trimming the broadcast log failed: %s", down)
            gevent.sleep(3600)
