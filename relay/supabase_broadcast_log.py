"""The broadcast log in a Supabase table (``SUPABASE_BROADCAST_LOG_TABLE``, default ``broadcast_log``),
through the official client and the service-role key. The table (README, "Supabase"):

    create table public.broadcast_log (
      id text primary key, stream_offset bigint, at timestamptz not null,
      source text not null, sender text not null, type text not null,
      filter jsonb not null, channels text[] not null default '{}',
      delivered integer not null, size integer not null, preview text not null);
    create index broadcast_log_at on public.broadcast_log (at desc, id desc);

Every call is bounded by ``timeout`` (httpx's timeouts plus a hard
``gevent.Timeout``) and fails as :class:`LogUnavailable`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TypeVar, cast

import gevent

from .broadcast_log import LoggedBroadcast, LogQuery, LogUnavailable
from .broadcast_log import iso as to_iso
from .config import ConfigError

try:
    import httpx
    from postgrest.exceptions import APIError
    from postgrest.types import CountMethod, ReturnMethod
    from supabase import ClientOptions, create_client

    HAVE_SUPABASE = True
except ImportError:  # pragma: no cover - exercised only without the extra installed
    HAVE_SUPABASE = False


def from_iso(text: str) -> int:
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


T = TypeVar("T")
PAGE_ROWS = 1000  # rows asked for at once: Supabase's default max-rows (a smaller one takes more pages)


class SupabaseBroadcastLog:
    name = "supabase"

    def __init__(self, url: str, service_key: str, *, table: str = "broadcast_log", timeout: float = 3.0):
        if not HAVE_SUPABASE:
            raise ConfigError("SUPABASE_URL is set but the supabase package is missing: pip install '.[supabase]'")
        self.table = table
        self.timeout = timeout
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 1.0)))
        options = ClientOptions(
            httpx_client=self._http, postgrest_client_retry=False, auto_refresh_token=False, persist_session=False
        )
        self._client = create_client(url, service_key, options=options)

    def write(self, rows: list[LoggedBroadcast]) -> None:
        # Postgres text and jsonb cannot hold NUL, which JSON (and so a broadcast) can: it would refuse
        # the batch on every retry. Written as U+FFFD, the replacement character, instead.
        docs = _without_nul(
            [
                {
                    "id": r.id,
                    "stream_offset": r.offset,
                    "at": to_iso(r.at),
                    "source": r.source,
                    "sender": r.sender,
                    "type": r.type,
                    "filter": r.filter,
                    "channels": r.channels,
                    "delivered": r.delivered,
                    "size": r.size,
                    "preview": r.preview,
                }
                for r in rows
            ]
        )
        self._run(
            "write",
            lambda: (
                self._client.table(self.table)
                .upsert(docs, on_conflict="id", ignore_duplicates=True, returning=ReturnMethod.minimal)
                .execute()
            ),
        )

    def query(self, query: LogQuery) -> list[LoggedBroadcast]:
        """Read in pages until ``query.limit`` rows or the end: PostgREST cuts every answer to its
        ``max-rows`` (1,000 on Supabase) without saying so, and the CSV export asks for 10,000.

        A row written meanwhile above the rows read so far (a newer one, or one written late) pushes
        them down the order: the next page then begins with a row already read. Rows are kept once
        by id, and reading goes on until the limit or the end.
        """
        rows: dict[str, dict] = {}
        read = 0
        for _ in range(query.limit + 1):  # bounded: each round reads a row at least, or stops
            page = self._page(query, query.offset + read, min(PAGE_ROWS, query.limit - len(rows)))
            read += len(page)
            for row in page:
                rows.setdefault(str(row.get("id")), row)
            if not page or len(rows) >= query.limit:
                break
        return self._parse(list(rows.values()))

    def _page(self, query: LogQuery, start: int, count: int) -> list[dict]:
        def ask():
            request = self._client.table(self.table).select("*")
            if query.type:
                request = request.eq("type", query.type)
            if query.channel:
                request = request.contains("channels", [query.channel])
            if query.sender:
                request = request.eq("sender", query.sender)
            if query.since is not None:
                request = request.gte("at", to_iso(query.since))
            if query.until is not None:
                request = request.lte("at", to_iso(query.until))
            request = request.order("at", desc=True).order("id", desc=True)
            return request.range(start, start + count - 1).execute()

        return list(self._run("read", ask).data)

    def _parse(self, found: list[dict]) -> list[LoggedBroadcast]:
        try:
            return [
                LoggedBroadcast(
                    id=str(row["id"]),
                    offset=row.get("stream_offset"),
                    at=from_iso(str(row["at"])),
                    source=str(row["source"]),
                    sender=str(row["sender"]),
                    type=str(row["type"]),
                    filter=row.get("filter") or {},
                    delivered=int(row["delivered"]),
                    size=int(row["size"]),
                    preview=str(row["preview"]),
                )
                for row in found
            ]
        except (KeyError, TypeError, ValueError) as bad:
            raise LogUnavailable(f"the {self.table} table has an unexpected shape: {bad}") from None

    def trim(self, before_ms: int) -> int:
        done = self._run(
            "trim",
            lambda: (
                self._client.table(self.table)
                .delete(count=CountMethod.exact, returning=ReturnMethod.minimal)
                .lt("at", to_iso(before_ms))
                .execute()
            ),
        )
        return done.count if done.count is not None else -1

    def close(self) -> None:
        self._http.close()

    def _run(self, what: str, call: Callable[[], T]) -> T:
        try:
            with gevent.Timeout(self.timeout, LogUnavailable(f"Supabase did not answer within {self.timeout} s")):
                return call()
        except LogUnavailable:
            raise
        except (APIError, httpx.HTTPError, OSError, ValueError) as problem:
            detail = getattr(problem, "message", None) or str(problem)
            raise LogUnavailable(f"the broadcast log ({self.table}) cannot {what}: {detail}") from None


J = TypeVar("J")


def _without_nul(value: J) -> J:
    """``value`` with every NUL in its strings replaced by U+FFFD (a row is shallow: a filter of lists)."""
    if isinstance(value, str):
        return cast(J, value.replace("\x00", "\ufffd"))
    if isinstance(value, dict):
        return cast(J, {key: _without_nul(item) for key, item in value.items()})
    if isinstance(value, list):
        return cast(J, [_without_nul(item) for item in value])
    return value
