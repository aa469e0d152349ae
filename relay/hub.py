"""The hub: who is connected, what they subscribed to, and fan-out.

Indexes by channel, user, role and clinic make a broadcast cost
O(recipients), not O(clients x filter fields). Every change to the indexes
happens under one lock and no I/O is ever done while holding it: fan-out
snapshots its recipients under the lock, releases it, then queues the
broadcast's one pre-encoded frame on each (a list append; the outbox writes).

In-process only: with several workers, a broker delivers each broadcast to
every worker's hub (see ``relay.broker``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import gevent
import gevent.lock

from .connection import CLOSED, Connection, push_all
from .directory import Identity
from .envelope import Envelope, Filter
from .timeslice import CHECK_EVERY, TimeSlice

log = logging.getLogger("relay.hub")


class Hub:
    def __init__(
        self,
        *,
        max_clients: int,
        ping_interval: float,
        push_all: Callable[[list, bytes], int] = push_all,
    ):
        """``push_all(conns, frame)`` queues a frame on many connections (the connection module's
        fast loop); tests of the hub alone give one that calls their fakes' ``push``."""
        self.max_clients = max_clients
        self.ping_interval = ping_interval
        self._push_all = push_all
        self.draining = False
        # Every one from the start, at 0: /health shows them all (a reader looking one up must find it).
        self.counters: Counter[str] = Counter(
            dict.fromkeys(("connections", "broadcasts", "messages", "auth_failures"), 0)
        )
        self._lock = threading.Lock()
        # Held for a whole fan-out, which yields to the event loop every few milliseconds
        # (relay.timeslice): the next broadcast waits, so no client sees two out of order.
        # A gevent lock, because its holder yields (a plain lock would block the thread).
        self._delivering = gevent.lock.Semaphore()
        self._sending: list | None = None  # the recipients of the fan-out under way (see sending_to)
        self._sending_set: set | None = None
        self._clients: set = set()
        self._by_channel: dict[str, set] = {}
        self._by_user: dict[str, set] = {}
        self._by_role: dict[str, set] = {}
        self._by_clinic: dict[str, set] = {}
        self._keepalive: gevent.Greenlet | None = None

    # -- membership -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, conn: Connection) -> None:
        assert conn.user_id is not None and conn.role is not None, "only admitted connections enter the hub"
        with self._lock:
            self._clients.add(conn)
            _index(self._by_user, conn.user_id, conn)
            _index(self._by_role, conn.role, conn)
            if conn.clinic_id:
                _index(self._by_clinic, conn.clinic_id, conn)
        self.counters["connections"] += 1

    def remove(self, conn: Connection) -> None:
        """Forget ``conn`` everywhere. Safe to call twice."""
        with self._lock:
            if conn not in self._clients:
                return
            self._clients.discard(conn)
            assert conn.user_id is not None and conn.role is not None  # it was admitted (see add)
            _unindex(self._by_user, conn.user_id, conn)
            _unindex(self._by_role, conn.role, conn)
            if conn.clinic_id:
                _unindex(self._by_clinic, conn.clinic_id, conn)
            for name in conn.channels:
                _unindex(self._by_channel, name, conn)

    def reidentify(self, conn: Connection, identity: Identity) -> None:
        """The user's role or clinic changed: move the connection in the indexes at once."""
        with self._lock:
            present = conn in self._clients
            if present:
                assert conn.role is not None  # it was admitted (see add)
                _unindex(self._by_role, conn.role, conn)
                if conn.clinic_id:
                    _unindex(self._by_clinic, conn.clinic_id, conn)
            conn.identify(identity)
            if present:
                _index(self._by_role, identity.role, conn)
                if conn.clinic_id:
                    _index(self._by_clinic, conn.clinic_id, conn)

    def connections_of(self, user_id: str) -> list:
        with self._lock:
            return list(self._by_user.get(user_id, ()))

    def user_ids(self) -> list[str]:
        """Every user with an open connection here."""
        with self._lock:
            return list(self._by_user)

    def connection(self, user_id: str, client_id: object) -> Connection | None:
        """The user's connection with this id, if it is here."""
        with self._lock:
            for conn in self._by_user.get(user_id, ()):
                if conn.id == client_id:
                    return conn
        return None

    def connection_count(self, user_id: str) -> int:
        with self._lock:
            return len(self._by_user.get(user_id, ()))

    def busy_users(self, limit: int = 2000) -> dict[str, int]:
        """The ``limit`` users with most connections here, and how many (for the cluster-wide per-user cap).

        Every connected user counts, one socket too: a cap of 4 split 3 + 1
        across two workers must be seen as 4 by both. Past ``limit`` users the
        ones left out hold the fewest sockets, so the cap errs by little.
        """
        with self._lock:
            busy = [(len(conns), user) for user, conns in self._by_user.items()]
        busy.sort(reverse=True)
        return {user: count for count, user in busy[:limit]}

    def subscribe(self, conn: Connection, names: list[str], limit: int) -> tuple[list[str], list[str]]:
        """Subscribe to already-authorized ``names``; returns (in effect, over the limit)."""
        taken: list[str] = []
        refused: list[str] = []
        with self._lock:
            if conn not in self._clients:
                return taken, list(names)
            for name in names:
                if name in conn.channels:
                    taken.append(name)
                elif len(conn.channels) >= limit:
                    refused.append(name)
                else:
                    conn.channels.add(name)
                    _index(self._by_channel, name, conn)
                    taken.append(name)
        return taken, refused

    def unsubscribe(self, conn: Connection, names: list[str]) -> list[str]:
        removed = []
        with self._lock:
            for name in names:
                if name in conn.channels:
                    conn.channels.discard(name)
                    _unindex(self._by_channel, name, conn)
                    removed.append(name)
        return removed

    # -- fan-out ----------------------------------------------------------------

    def recipients(self, flt: Filter) -> list:
        """Snapshot of the connections a filter selects (see :class:`Filter`)."""
        with self._lock:
            if flt.everyone:
                return list(self._clients)
            # Start from the given field whose index yields the fewest candidates,
            # then check the other given fields on each candidate.
            fields = [
                (index, keys)
                for index, keys in (
                    (self._by_channel, flt.channels),
                    (self._by_user, flt.user_ids),
                    (self._by_clinic, flt.clinic_ids),
                    (self._by_role, flt.roles),
                )
                if keys
            ]
            index, keys = min(fields, key=lambda f: sum(len(f[0].get(k, ())) for k in f[1]))
            sets = [index[k] for k in keys if k in index]
            if not sets:
                return []
            candidates = sets[0] if len(sets) == 1 else set().union(*sets)
            if len(fields) == 1:
                return list(candidates)
            return [conn for conn in candidates if _matches(conn, flt)]

    def deliver(self, envelope: Envelope) -> int:
        """Queue ``envelope`` on every matching open connection; returns how many took it.

        The recipients are snapshotted before the first pause, so a connection
        added while this fan-out pauses does not get it (the sequencer relies on
        that: see ``relay.sequencer``).

        A fan-out to 10,000 clients takes milliseconds of CPU: it pauses once
        per time slice (``relay.timeslice``) so that /health and other requests
        are served meanwhile.
        """
        frame = envelope.frame()
        delivered = 0
        with self._delivering:
            slice_ = TimeSlice()
            recipients = self._sending = self.recipients(envelope.filter)
            try:
                for start in range(0, len(recipients), CHECK_EVERY):
                    delivered += self._push_all(recipients[start : start + CHECK_EVERY], frame)
                    slice_.check()
            finally:
                self._sending = self._sending_set = None
        self.counters["broadcasts"] += 1
        self.counters["messages"] += delivered
        return delivered

    def sending_to(self, conn: Connection) -> bool | None:
        """While a fan-out pauses: whether ``conn`` is among its recipients (it gets that broadcast, live).
        None when no fan-out is under way. (A set of them is made once per fan-out, for the first asker.)"""
        if self._sending is None:
            return None
        if self._sending_set is None:
            self._sending_set = set(self._sending)
        return conn in self._sending_set

    # -- observation ------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            return {
                "clients": len(self._clients),
                "byRole": {role: len(conns) for role, conns in self._by_role.items()},
                "byClinic": {clinic: len(conns) for clinic, conns in self._by_clinic.items()},
                "channels": len(self._by_channel),
                "subscriptions": sum(len(conns) for conns in self._by_channel.values()),
                "users": len(self._by_user),
            }

    # -- background work ------------------------------------------------------

    def start(self) -> None:
        """Start the keep-alive greenlet (idempotent; call from the serving process)."""
        if self._keepalive is None:
            self._keepalive = gevent.spawn(self._keepalive_loop)

    def _keepalive_loop(self) -> None:
        while True:
            gevent.sleep(self.ping_interval)
            with self._lock:
                conns = list(self._clients)
            slice_ = TimeSlice()
            for count, conn in enumerate(conns, 1):
                try:
                    conn.keepalive()
                except Exception:
                    log.exception("keep-alive failed for %r", conn)
                    try:
                        conn.abort("keepalive_error")
                    except Exception:  # nor may one that cannot even be dropped stop every other's pings
                        log.exception("dropping %r failed", conn)
                if count % CHECK_EVERY == 0:
                    slice_.check()

    def close_all(self, code: int, reason: str) -> list:
        """Close every connection with ``code`` (without draining: newcomers are still welcome)."""
        with self._lock:
            conns = list(self._clients)
        slice_ = TimeSlice()
        for count, conn in enumerate(conns, 1):
            conn.close(code, reason)
            if count % CHECK_EVERY == 0:
                slice_.check()
        return conns

    def drain(self, code: int, reason: str, timeout: float, closing: Callable[[], None] | None = None) -> bool:
        """Close every connection with ``code`` and wait until they are gone.

        From the first call on, ``draining`` is true and new sockets are
        refused with the same code. ``closing()`` runs once every close frame
        is queued, before the wait. Returns True if every socket closed in time.
        """
        self.draining = True
        conns = self.close_all(code, reason)
        if closing is not None:
            closing()
        # Closing takes the connection out of the indexes at once; wait for the
        # sockets themselves, so that every close frame is on the wire before exit.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conns = [conn for conn in conns if conn.state is not CLOSED]
            if not conns:
                return True
            gevent.sleep(0.05)
        return False


def _index(index: dict[str, set], key: str, conn: Connection) -> None:
    members = index.get(key)
    if members is None:
        index[key] = {conn}
    else:
        members.add(conn)


def _unindex(index: dict[str, set], key: str, conn: Connection) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(conn)
        if not members:
            del index[key]


def _matches(conn: Connection, flt: Filter) -> bool:
    return flt.admits(conn.user_id, conn.role, conn.clinic_id, conn.channels)
