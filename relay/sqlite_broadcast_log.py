"""The broadcast log in the instance SQLite (the identity store's file, ``REALTIME_DB``).

Channels are kept twice: in the filter's JSON, and as ``,a,b,`` so that "sent
to channel X" is one ``instr`` scan over a table bounded by its
retention (30 days of broadcasts is small). Several workers, or hosts sharing
the file, write to it at once; WAL mode lets readers go on meanwhile.
"""

from __future__ import annotations

import json
import sqlite3

from .broadcast_log import LoggedBroadcast, LogQuery, LogUnavailable
from .sqlite import SqliteStore, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS broadcast_log (
    id TEXT PRIMARY KEY,
    stream_offset INTEGER,
    at INTEGER NOT NULL,
    source TEXT NOT NULL,
    sender TEXT NOT NULL,
    type TEXT NOT NULL,
    filter TEXT NOT NULL,
    channels TEXT NOT NULL,
    delivered INTEGER NOT NULL,
    size INTEGER NOT NULL,
    preview TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS broadcast_log_at ON broadcast_log (at DESC, id DESC);
"""


class SqliteBroadcastLog(SqliteStore):
    name = "sqlite"
    schema = SCHEMA

    def write(self, rows: list[LoggedBroadcast]) -> None:
        values = [
            (
                r.id,
                r.offset,
                r.at,
                r.source,
                r.sender,
                r.type,
                json.dumps(r.filter, separators=(",", ":")),
                "," + ",".join(r.channels) + ",",
                r.delivered,
                r.size,
                r.preview,
            )
            for r in rows
        ]
        try:
            with self._lock, transaction(self._conn()) as db:
                db.executemany("INSERT OR IGNORE INTO broadcast_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        except sqlite3.Error as problem:
            raise LogUnavailable(f"the broadcast log ({self.path}) cannot be written: {problem}") from None

    def query(self, query: LogQuery) -> list[LoggedBroadcast]:
        where: list[str] = []
        args: list[object] = []
        if query.type:
            where.append("type = ?")
            args.append(query.type)
        if query.channel:
            where.append("instr(channels, ?) > 0")
            args.append(f",{query.channel},")
        if query.sender:
            where.append("sender = ?")
            args.append(query.sender)
        if query.since is not None:
            where.append("at >= ?")
            args.append(query.since)
        if query.until is not None:
            where.append("at <= ?")
            args.append(query.until)
        sql = (
            "SELECT id, stream_offset, at, source, sender, type, filter, delivered, size, preview FROM broadcast_log"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY at DESC, id DESC LIMIT ? OFFSET ?"
        )
        try:
            with self._lock:
                found = self._conn().execute(sql, [*args, query.limit, query.offset]).fetchall()
        except sqlite3.Error as problem:
            raise LogUnavailable(f"the broadcast log ({self.path}) cannot be read: {problem}") from None
        return [
            LoggedBroadcast(
                id=row[0],
                offset=row[1],
                at=row[2],
                source=row[3],
                sender=row[4],
                type=row[5],
                filter=json.loads(row[6]),
                delivered=row[7],
                size=row[8],
                preview=row[9],
            )
            for row in found
        ]

    def trim(self, before_ms: int) -> int:
        try:
            with self._lock, transaction(self._conn()) as db:
                return db.execute("DELETE FROM broadcast_log WHERE at < ?", (before_ms,)).rowcount
        except sqlite3.Error as problem:
            raise LogUnavailable(f"the broadcast log ({self.path}) cannot be trimmed: {problem}") from None
