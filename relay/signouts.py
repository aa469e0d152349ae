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

import time
from typing import Protocol

from .redis_store import RedisStore
from .sqlite import SqliteStore, errors_become, transaction


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


class SqliteSignouts(SqliteStore):
    """The instance database's ``signouts`` table; rows past their ``until`` are deleted as new ones arrive."""

    name = "sqlite"
    schema = SCHEMA

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


class RedisSignouts(RedisStore):
    """One key per signed-out session, ``<prefix>:signout:<id>``, expiring at its ``until``."""

    name = "redis"
    unavailable = SignoutsUnavailable

    def __init__(self, url: str, *, prefix: str):
        super().__init__(url)
        self.prefix = f"{prefix}:signout:"

    def end(self, session_id: str, until: float) -> None:
        # A relative expiry: Redis's clock may differ from this host's.
        ttl_ms = max(1, int((until - time.time()) * 1000))
        self._call(self._client.set, self.prefix + session_id, "1", px=ttl_ms)

    def ended(self, session_id: str, now: float) -> bool:
        # Redis drops the key once its time is up; ``now`` is not needed here.
        return bool(self._call(self._client.exists, self.prefix + session_id))
