"""Signed-out sessions (and disconnected users): signing out ends the session on the server, not only
in the browser.

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

A user can also be signed out everywhere (a password change, a lost laptop,
the "Sign out everywhere" button; ``Realtime.sign_out_everywhere``): the store
then remembers a time, in epoch milliseconds, and every sign-in of that user
that started before it has ended. Times are compared across hosts: their
clocks must agree (NTP), or sign-ins made within the skew of the moment
survive on a host whose clock is ahead.

A request asks once (``auth.current_user``): two primary-key reads in one
statement, ~10 us in SQLite, or one round trip to Redis (``MGET``), on the
pages and ``/api/ws/auth`` only. A socket authenticates with its token and
does not ask when it connects (a read per connect would slow a reconnect
storm): a sign-out everywhere closes the user's sockets, and each worker then
refuses the user's tokens minted before it; the workers that did not hear
that close (a Redis listener reconnecting, a worker started since) learn it
from :meth:`SignoutStore.signed_out_before` at the next identity re-check.
An administrator's disconnect (``Realtime.disconnect_user``) is kept here the
same way, for those workers (:meth:`SignoutStore.disconnected_before`): it
closes the sockets opened before it, and ends no sign-in. Its moment is the
recording host's clock, compared with the time each worker saw a socket
open: the same agreement of clocks is needed.
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

    def end_all(self, user_id: str, before_ms: int, until: float) -> None:
        """End every sign-in of ``user_id`` that started before ``before_ms`` (epoch milliseconds).

        A later call moves that time only forward. It may be forgotten after ``until`` (epoch
        seconds), when every sign-in it ended would have expired anyway.
        """

    def ended(self, session_id: str, user_id: str, started_ms: int, now: float) -> bool:
        """Whether the sign-in ``session_id`` (of ``user_id``, started at ``started_ms``) has ended.

        Either it signed out, or its user was signed out everywhere after it started; ``now`` is
        the time the ``until`` of either is compared with.
        """

    def signed_out_before(self, user_ids: list[str], now: float) -> dict[str, int]:
        """For those of ``user_ids`` signed out everywhere (and still remembered at ``now``), the time
        (epoch ms) every sign-in and connection token of theirs had to start after; the others are absent.

        The socket side (``Realtime``): read for every connected user at each identity re-check,
        and when a worker is told to close a user's sockets.
        """

    def disconnect_all(self, user_id: str, before_ms: int, until: float) -> None:
        """Remember that every socket of ``user_id`` opened before ``before_ms`` (epoch ms) is to be closed:
        an administrator's disconnect, for the workers that did not hear it. Sign-ins are not ended. A
        later call moves that time only forward; it may be forgotten after ``until`` (epoch seconds)."""

    def disconnected_before(self, user_ids: list[str], now: float) -> dict[str, int]:
        """For those of ``user_ids`` disconnected (and still remembered at ``now``), the time (epoch ms)
        their sockets had to be opened after; the others are absent. Read with
        :meth:`signed_out_before`, at each identity re-check."""

    def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS signouts (
    session_id TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS signouts_until ON signouts (until);
CREATE TABLE IF NOT EXISTS user_signouts (
    user_id TEXT PRIMARY KEY,
    ended_before_ms INTEGER NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS user_disconnects (
    user_id TEXT PRIMARY KEY,
    ended_before_ms INTEGER NOT NULL,
    until REAL NOT NULL
);
"""


_BATCH = 500  # users per statement or MGET: under SQLite's 999 parameters, one modest Redis reply
_store_errors = errors_become(SignoutsUnavailable, "the sign-out store cannot be used")


class SqliteSignouts(SqliteStore):
    """The instance database's ``signouts`` (sessions), ``user_signouts`` (users signed out everywhere) and
    ``user_disconnects`` (users disconnected) tables; rows past their ``until`` are deleted as new ones arrive."""

    name = "sqlite"
    schema = SCHEMA

    @_store_errors
    def end(self, session_id: str, until: float) -> None:
        with self._lock, transaction(self._conn()) as db:
            # Sign-outs are rare (a person clicking a button): sweeping here keeps the table at one
            # session lifetime's worth of rows without a timer of its own.
            db.execute("DELETE FROM signouts WHERE until < ?", (time.time(),))
            db.execute("INSERT OR REPLACE INTO signouts (session_id, until) VALUES (?, ?)", (session_id, until))

    def end_all(self, user_id: str, before_ms: int, until: float) -> None:
        self._move_forward("user_signouts", user_id, before_ms, until)

    def disconnect_all(self, user_id: str, before_ms: int, until: float) -> None:
        self._move_forward("user_disconnects", user_id, before_ms, until)

    @_store_errors
    def _move_forward(self, table: str, user_id: str, before_ms: int, until: float) -> None:
        with self._lock, transaction(self._conn()) as db:
            db.execute(f"DELETE FROM {table} WHERE until < ?", (time.time(),))
            db.execute(
                f"INSERT INTO {table} (user_id, ended_before_ms, until) VALUES (?, ?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET"
                " ended_before_ms = MAX(ended_before_ms, excluded.ended_before_ms), until = MAX(until, excluded.until)",
                (user_id, before_ms, until),
            )

    @_store_errors
    def ended(self, session_id: str, user_id: str, started_ms: int, now: float) -> bool:
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT EXISTS (SELECT 1 FROM signouts WHERE session_id = ? AND until > ?)"
                    " OR EXISTS (SELECT 1 FROM user_signouts WHERE user_id = ? AND ended_before_ms > ? AND until > ?)",
                    (session_id, now, user_id, started_ms, now),
                )
                .fetchone()
            )
        return bool(row[0])

    def signed_out_before(self, user_ids: list[str], now: float) -> dict[str, int]:
        return self._times("user_signouts", user_ids, now)

    def disconnected_before(self, user_ids: list[str], now: float) -> dict[str, int]:
        return self._times("user_disconnects", user_ids, now)

    @_store_errors
    def _times(self, table: str, user_ids: list[str], now: float) -> dict[str, int]:
        found: dict[str, int] = {}
        for start in range(0, len(user_ids), _BATCH):
            batch = user_ids[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            with self._lock:
                rows = (
                    self._conn()
                    .execute(
                        f"SELECT user_id, ended_before_ms FROM {table} WHERE until > ? AND user_id IN ({marks})",
                        (now, *batch),
                    )
                    .fetchall()
                )
            found.update(rows)
        return found


class RedisSignouts(RedisStore):
    """One key per signed-out session, ``<prefix>:signout:<id>``, per user signed out everywhere,
    ``<prefix>:signout-user:<id>``, and per user disconnected, ``<prefix>:disconnect-user:<id>`` (the last
    two holding the time in ms), each expiring at its ``until``."""

    name = "redis"
    unavailable = SignoutsUnavailable

    def __init__(self, url: str, *, prefix: str):
        super().__init__(url)
        self.prefix = f"{prefix}:signout:"
        self.user_prefix = f"{prefix}:signout-user:"
        self.disconnect_prefix = f"{prefix}:disconnect-user:"

    def end(self, session_id: str, until: float) -> None:
        self._call(self._client.set, self.prefix + session_id, "1", px=_ttl_ms(until))

    def end_all(self, user_id: str, before_ms: int, until: float) -> None:
        self._move_forward(self.user_prefix + user_id, before_ms, until)

    def disconnect_all(self, user_id: str, before_ms: int, until: float) -> None:
        self._move_forward(self.disconnect_prefix + user_id, before_ms, until)

    def _move_forward(self, key: str, before_ms: int, until: float) -> None:
        # Only forward, in time and in expiry, as SQLite's MAX: one round trip, atomic in Redis.
        self._call(self._client.eval, _MOVE_FORWARD, 1, key, before_ms, _ttl_ms(until))

    def ended(self, session_id: str, user_id: str, started_ms: int, now: float) -> bool:
        # Redis drops each key once its time is up; ``now`` is not needed here.
        signed_out, everywhere_before = self._call(
            self._client.mget, [self.prefix + session_id, self.user_prefix + user_id]
        )
        return signed_out is not None or (everywhere_before is not None and started_ms < int(everywhere_before))

    def signed_out_before(self, user_ids: list[str], now: float) -> dict[str, int]:
        return self._times(self.user_prefix, user_ids)

    def disconnected_before(self, user_ids: list[str], now: float) -> dict[str, int]:
        return self._times(self.disconnect_prefix, user_ids)

    def _times(self, prefix: str, user_ids: list[str]) -> dict[str, int]:
        # Redis drops each key once its time is up: no ``now`` here.
        found: dict[str, int] = {}
        for start in range(0, len(user_ids), _BATCH):
            batch = user_ids[start : start + _BATCH]
            values = self._call(self._client.mget, [prefix + user_id for user_id in batch])
            found.update((user, int(value)) for user, value in zip(batch, values, strict=True) if value is not None)
        return found


def _ttl_ms(until: float) -> int:
    # A relative expiry: Redis's clock may differ from this host's.
    return max(1, int((until - time.time()) * 1000))


_MOVE_FORWARD = """
local value = ARGV[1]
local kept = redis.call('GET', KEYS[1])
if kept and tonumber(kept) > tonumber(value) then
    value = kept
end
local ttl = math.max(tonumber(ARGV[2]), redis.call('PTTL', KEYS[1]))
redis.call('SET', KEYS[1], value, 'PX', ttl)
return 1
"""
