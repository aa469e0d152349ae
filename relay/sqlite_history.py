"""SqliteHistory: the delivery guarantee's memory in one SQLite file (the embedded default).

WAL mode with ``synchronous=NORMAL``: a commit survives the process being
killed the next instant (it is in the WAL file), which is the promise for a
broadcast answered 200; only a power cut (or the kernel crashing) can lose
the last commits. One process serves at a time in the embedded mode, plus,
during a reload, the draining one; SQLite's own locking orders their writes.

The epoch is made when the file is: a deleted or replaced file is a new
epoch, so offsets from the old one are never trusted (and ``start_over``
makes a new one in place). Offsets come from an
``AUTOINCREMENT`` key, so they are never reused, even after trimming.

A power cut is the one way the same file comes back older under the same
epoch: its last commits, already delivered, are gone, and the offsets they
had would be handed out again to new broadcasts, which a client that saw the
lost ones would then skip. So the file remembers the kernel's boot id of the
last process that opened it, and the first process of a new boot starts a new
epoch (a clean reboot cannot be told from a power cut here: its clients
resync once, which is the safe side). A file copied from another machine or
restored from a backup gets a new epoch the same way.

Calls are short (tens of microseconds) and run inline in the calling
greenlet: never from an event-loop callback.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time

from . import jsonsafe
from .envelope import Envelope
from .eventlog import event
from .history import (
    LAST_AUDIENCES,
    Appended,
    HistoryUnavailable,
    Idempotency,
    IdempotencyConflict,
    Previous,
    Session,
)
from .sqlite import SqliteStore, errors_become, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    offset   INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    envelope TEXT NOT NULL
);
-- The latest broadcast to each channel, whatever its audience, as releases before kept it (they read
-- only this): still written, for a draining worker of the release before during a reload, or after a
-- rollback; and read, beside audience_values, for what such a worker wrote.
CREATE TABLE IF NOT EXISTS last_values (
    channel  TEXT PRIMARY KEY,
    offset   INTEGER NOT NULL,
    at       INTEGER NOT NULL,
    envelope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audience_values (
    channel  TEXT NOT NULL,
    audience TEXT NOT NULL,  -- Filter.audience
    offset   INTEGER NOT NULL,
    at       INTEGER NOT NULL,
    envelope TEXT NOT NULL,
    PRIMARY KEY (channel, audience)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    envelope_id TEXT NOT NULL,
    offset      INTEGER NOT NULL,
    answer      TEXT,
    expires_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    client_id  TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL,
    channels   TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;  -- keyed by random ids, written in bursts (a reconnect storm): measured 3x cheaper than rowid+index
CREATE INDEX IF NOT EXISTS history_at ON history (at);
"""


COUNTS_EVERY_S = 1.0  # status(): how stale the broadcast and session counts may be

# A full disk, a locked or vanished file: HistoryUnavailable (a 503 for a broadcast, a refused resume).
_store_errors = errors_become(HistoryUnavailable, "the embedded history cannot be used")


def _now_ms() -> int:
    return int(time.time() * 1000)


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This boot of the kernel, whose page cache holds what SQLite has not synced (None where
    there is no such file: not Linux)."""
    try:
        with open(BOOT_ID) as f:
            return f.read().strip() or None
    except OSError:
        return None


class SqliteHistory(SqliteStore):
    """History in SQLite (see the module docstring). Safe to share between greenlets (one connection, one lock)."""

    name = "sqlite"
    schema = SCHEMA

    def __init__(self, path: str, *, window_ms: int, last_value_ttl_ms: int, max_entries: int = 200_000):
        super().__init__(path)
        self.window_ms = window_ms
        self.last_value_ttl_ms = last_value_ttl_ms
        self.max_entries = max_entries
        self._counted: tuple[float, int, int] | None = None  # (when, broadcasts, sessions)
        # Read once: only ``start_over`` changes it, which only a worker whose broker listener came back
        # calls (the Redis broker, whose workers share the Redis history, not this file).
        self._epoch: str | None = None

    # -- the stream ---------------------------------------------------------------------

    @_store_errors
    def head(self) -> tuple[str, int]:
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'history'").fetchone()
            return self._epoch_of(db), int(row[0]) if row else 0

    @_store_errors
    def append(self, envelope: Envelope, *, idempotency: Idempotency | None = None) -> Appended | Previous:
        now = _now_ms()
        stored = jsonsafe.compact(envelope.to_json())
        with self._lock:
            db = self._conn()
            with transaction(db):
                epoch = self._epoch_of(db)
                if idempotency is not None:
                    previous = self._previous(db, idempotency, now)
                    if previous is not None:
                        return previous
                offset = db.execute("INSERT INTO history (at, envelope) VALUES (?, ?)", (envelope.at, stored)).lastrowid
                assert offset is not None
                audience = envelope.filter.audience
                for channel in envelope.filter.channels:
                    db.execute(
                        "INSERT OR REPLACE INTO audience_values (channel, audience, offset, at, envelope)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (channel, audience, offset, envelope.at, stored),
                    )
                    db.execute(  # the channel's LAST_AUDIENCES most recent audiences
                        "DELETE FROM audience_values WHERE channel = ? AND offset <= (SELECT offset"
                        " FROM audience_values WHERE channel = ? ORDER BY offset DESC LIMIT 1 OFFSET ?)",
                        (channel, channel, LAST_AUDIENCES),
                    )
                db.executemany(
                    "INSERT INTO last_values (channel, offset, at, envelope) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (channel) DO UPDATE SET offset = excluded.offset, at = excluded.at,"
                    " envelope = excluded.envelope WHERE excluded.offset > last_values.offset",
                    [(channel, offset, envelope.at, stored) for channel in envelope.filter.channels],
                )
                if idempotency is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO idempotency (key, digest, envelope_id, offset, answer, expires_at)"
                        " VALUES (?, ?, ?, ?, NULL, ?)",
                        (idempotency.key, idempotency.digest, envelope.id, offset, now + self.window_ms),
                    )
        return Appended(epoch, offset)

    @_store_errors
    def start_over(self, epoch: str) -> tuple[str, int]:
        with self._lock:
            db = self._conn()
            with transaction(db):
                current = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
                if current == epoch:
                    current = self._new_epoch(db)
                    # The store went back in time: its last values may be older than what clients were
                    # shown, and a resync must not bring those back as the current state.
                    db.execute("DELETE FROM audience_values")
                    db.execute("DELETE FROM last_values")
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'history'").fetchone()
            self._epoch = current  # once committed
            return current, int(row[0]) if row else 0

    @_store_errors
    def complete(self, idempotency: Idempotency, answer: dict) -> None:
        with self._lock:
            self._conn().execute(
                "UPDATE idempotency SET answer = ? WHERE key = ? AND digest = ?",
                (json.dumps(answer), idempotency.key, idempotency.digest),
            )

    @_store_errors
    def previous(self, idempotency: Idempotency) -> Previous | None:
        with self._lock:
            return self._previous(self._conn(), idempotency, _now_ms())

    @_store_errors
    def read(self, after: int, limit: int) -> list[Envelope]:
        with self._lock:
            db = self._conn()
            epoch = self._epoch_of(db)
            rows = db.execute(
                "SELECT offset, envelope FROM history WHERE offset > ? ORDER BY offset LIMIT ?", (after, limit)
            ).fetchall()
        return [Envelope.from_json(json.loads(text), offset=offset, epoch=epoch) for offset, text in rows]

    @_store_errors
    def oldest(self) -> int | None:
        with self._lock:
            row = self._conn().execute("SELECT MIN(offset) FROM history").fetchone()
        return row[0] if row and row[0] is not None else None

    @_store_errors
    def last_values(self, channels: list[str], max_age_ms: int) -> dict[str, list[Envelope]]:
        if not channels:
            return {}
        marks = ",".join("?" * len(channels))
        with self._lock:
            db = self._conn()
            epoch = self._epoch_of(db)
            rows = db.execute(
                f"SELECT channel, offset, envelope FROM audience_values WHERE channel IN ({marks}) AND at >= ?"
                f" UNION SELECT channel, offset, envelope FROM last_values WHERE channel IN ({marks}) AND at >= ?"
                " ORDER BY offset DESC",
                (*channels, _now_ms() - max_age_ms) * 2,
            ).fetchall()
        found: dict[str, list[Envelope]] = {}
        for channel, offset, text in rows:
            found.setdefault(channel, []).append(Envelope.from_json(json.loads(text), offset=offset, epoch=epoch))
        return found

    # -- sessions -------------------------------------------------------------------------

    @_store_errors
    def save_sessions(self, sessions: list[Session], expires_at_ms: int) -> None:
        if not sessions:
            return
        rows = [(s.client_id, s.user_id, json.dumps(list(s.channels)), expires_at_ms) for s in sessions]
        with self._lock:
            db = self._conn()
            with transaction(db):
                db.executemany(
                    "INSERT OR REPLACE INTO sessions (client_id, user_id, channels, expires_at) VALUES (?, ?, ?, ?)",
                    rows,
                )

    @_store_errors
    def touch_sessions(self, client_ids: list[str], expires_at_ms: int) -> None:
        if not client_ids:
            return
        with self._lock:
            db = self._conn()
            with transaction(db):
                db.executemany(
                    "UPDATE sessions SET expires_at = ? WHERE client_id = ?", [(expires_at_ms, c) for c in client_ids]
                )

    @_store_errors
    def load_session(self, client_id: str) -> Session | None:
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT user_id, channels FROM sessions WHERE client_id = ? AND expires_at > ?",
                    (client_id, _now_ms()),
                )
                .fetchone()
            )
        return Session(client_id, row[0], tuple(json.loads(row[1]))) if row else None

    @_store_errors
    def delete_sessions(self, client_ids: list[str]) -> None:
        if not client_ids:
            return
        with self._lock:
            db = self._conn()
            with transaction(db):
                db.executemany("DELETE FROM sessions WHERE client_id = ?", [(c,) for c in client_ids])

    # -- upkeep -----------------------------------------------------------------------------

    @_store_errors
    def trim(self, now_ms: int) -> int:
        with self._lock:
            db = self._conn()
            with transaction(db):
                # By offset, up to the newest one past the window: a prefix, never a hole in the middle
                # (``at`` is a wall clock that can step back; a resume checks only where the history starts).
                newest_expired = db.execute(
                    "SELECT MAX(offset) FROM history WHERE at < ?", (now_ms - self.window_ms,)
                ).fetchone()[0]
                dropped = 0
                if newest_expired is not None:
                    dropped = db.execute("DELETE FROM history WHERE offset <= ?", (newest_expired,)).rowcount
                head = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'history'").fetchone()
                if head:  # the count bound, whatever the rate
                    dropped += db.execute(
                        "DELETE FROM history WHERE offset <= ?", (head[0] - self.max_entries,)
                    ).rowcount
                db.execute("DELETE FROM audience_values WHERE at < ?", (now_ms - self.last_value_ttl_ms,))
                db.execute("DELETE FROM last_values WHERE at < ?", (now_ms - self.last_value_ttl_ms,))
                db.execute("DELETE FROM idempotency WHERE expires_at < ?", (now_ms,))
                db.execute("DELETE FROM sessions WHERE expires_at < ?", (now_ms,))
        return dropped

    @_store_errors
    def status(self) -> dict:
        with self._lock:
            db = self._conn()
            epoch = self._epoch_of(db)
            oldest = db.execute("SELECT offset, at FROM history ORDER BY offset LIMIT 1").fetchone()
            first, first_at = oldest if oldest else (None, None)
            head = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'history'").fetchone()
            count, sessions = self._counts(db)
        return {
            "kind": self.name,
            "state": "ok",
            "path": self.path,
            "epoch": epoch,
            "head": int(head[0]) if head else 0,
            "retained": count,
            "oldest": {"offset": first, "at": first_at} if first is not None else None,
            "sessions": sessions,
        }

    def _counts(self, db: sqlite3.Connection) -> tuple[int, int]:
        """Broadcasts and sessions kept, counted at most once per COUNTS_EVERY_S (a count is a scan: /health
        may be polled many times a second, and 20,000 sessions took a millisecond of the event loop)."""
        now = time.monotonic()
        if self._counted is None or now - self._counted[0] >= COUNTS_EVERY_S:
            retained = db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
            sessions = db.execute("SELECT COUNT(*) FROM sessions WHERE expires_at > ?", (_now_ms(),)).fetchone()[0]
            self._counted = (now, retained, sessions)
        return self._counted[1], self._counted[2]

    # -- plumbing ---------------------------------------------------------------------------

    def _prepare(self, db: sqlite3.Connection) -> None:
        # One transaction, so that of two processes opening the file at once only the first
        # starts a new epoch: the second finds this boot's id already written.
        with transaction(db):
            # The epoch is born with the file: the first process to get here writes it.
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)", (secrets.token_hex(8),))
            boot = boot_id()
            if boot is None:
                return
            row = db.execute("SELECT value FROM meta WHERE key = 'boot'").fetchone()
            if row is not None and row[0] != boot:
                epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
                fresh = self._new_epoch(db)
                event("history.new_epoch_after_restart", level="warning", path=self.path, epoch=fresh, was=epoch)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('boot', ?)", (boot,))

    @staticmethod
    def _new_epoch(db: sqlite3.Connection) -> str:
        """Drop the stream under a new epoch (inside the caller's transaction). Offsets go on from the
        old head (AUTOINCREMENT). Last values and idempotency keys are left to expire: they carry
        content, not positions. On a new boot (see the module docstring) that keeps the channels'
        values across a clean reboot, at the price of one a second old after a power cut (SQLite's
        last commits); ``start_over``, for a store known to have gone back, drops them."""
        epoch = secrets.token_hex(8)
        db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch,))
        db.execute("DELETE FROM history")
        return epoch

    def _epoch_of(self, db: sqlite3.Connection) -> str:
        if self._epoch is None:
            self._epoch = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        return self._epoch

    def _previous(self, db: sqlite3.Connection, idempotency: Idempotency, now: int) -> Previous | None:
        row = db.execute(
            "SELECT digest, envelope_id, offset, answer FROM idempotency WHERE key = ? AND expires_at > ?",
            (idempotency.key, now),
        ).fetchone()
        if row is None:
            return None
        if row[0] != idempotency.digest:
            raise IdempotencyConflict("this Idempotency-Key was first used with a different broadcast")
        return Previous(self._epoch_of(db), row[2], row[1], json.loads(row[3]) if row[3] else None)
