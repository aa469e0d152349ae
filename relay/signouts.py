"""Signed-out sessions: signing out ends the session on the server, not only in the browser.

Flask's session is a signed cookie. Signing out clears it in the browser, but
a copy taken before (a shared workstation's profile backup, a proxy's log, a
stolen laptop) would still be accepted until it expires. So every sign-in
gets a random session id (``sid``, in the cookie), signing out records that
id here for as long as any session could last (``MAX_SESSION_HOURS`` after
its sign-in), and every cookie-authenticated request asks
:meth:`SignoutStore.ended`.

Two stores, one contract (``tests/integration/test_signout_stores.py``):
:class:`SqliteSignouts` in the instance database (``REALTIME_DB``), used
without ``REDIS_URL`` (one worker: the embedded default, or Supabase with a
single worker) and kept across restarts; :class:`RedisSignouts`, shared by
every worker and host once there is Redis, and kept as long as Redis keeps
its data. Either raises :class:`SignoutsUnavailable` when it cannot answer:
the request is then refused with 503 (fail closed), and nobody is signed out
by an outage.

A request asks once (``auth.current_user``): a primary-key read, ~10 us in
SQLite or one round trip to Redis, on the pages and ``/api/ws/auth`` only;
the socket authenticates with its token and never asks.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Protocol

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - only with REDIS_URL, which checks for the package first
    pass

from .sqlite import close_db, errors_become, open_db, transaction


class SignoutsUnavailable(Exception):
    """The store cannot answer now: the request is refused (503), the session is kept."""


class SignoutStore(Protocol):
    name: str

    def end(self, session_id: str, until: float) -> None:
        """Remember that ``session_id`` signed out; it may be forgotten after ``until`` (epoch seconds)."""

    def ended(self, session_id: str, now: float) -> bool:
        """Whether ``session_id`` signed out (and ``now`` is before the ``until`` it was recorded with)."""

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS signouts (
    session_id TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS signouts_until ON signouts (until);
"""


_store_errors = errors_become(SignoutsUnavailable, "the sign-out store cannot be used")


class SqliteSignouts:
    """The instance database's ``signouts`` table; rows past their ``until`` are deleted as new ones arrive."""

    name = "sqlite"

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_db(self.path, SCHEMA)
        return self._db

    @_store_errors
    def end(self, session_id: str, until: float) -> None:
        with self._lock, transaction(self._conn()) as db:
            # Sign-outs are rare (a person clicking a button): sweeping here keeps the table at one
            # session lifetime's worth of rows without a timer of its own.
            db.execute("DELETE FROM signouts WHERE until < ?", (time.time(),))
            db.execute("INSERT OR REPLACE INTO signouts (session_id, until) VALUES (?, ?)", (session_id, until))

    @_store_errors
    def ended(self, session_id: str, now: float) -> bool:
        with self._lock:
            row = self._conn().execute("SELECT until FROM signouts WHERE session_id = ?", (session_id,)).fetchone()
        return row is not None and now < row[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                close_db(self._db, self.path)
                self._db = None


class RedisSignouts:
    """One key per signed-out session, ``<prefix>:signout:<id>``, expiring at its ``until``."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str):
        self.prefix = f"{prefix}:signout:"
        self._client = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )

    def end(self, session_id: str, until: float) -> None:
        # A relative expiry: Redis's clock may differ from this host's.
        ttl_ms = max(1, int((until - time.time()) * 1000))
        try:
            self._client.set(self.prefix + session_id, "1", px=ttl_ms)
        except (redis.RedisError, OSError) as problem:
            raise SignoutsUnavailable(f"Redis is unreachable ({problem})") from None

    def ended(self, session_id: str, now: float) -> bool:
        # Redis drops the key once its time is up; ``now`` is not needed here.
        try:
            return bool(self._client.exists(self.prefix + session_id))
        except (redis.RedisError, OSError) as problem:
            raise SignoutsUnavailable(f"Redis is unreachable ({problem})") from None

    def close(self) -> None:
        self._client.close()
