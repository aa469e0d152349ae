"""This worker's client sessions, kept in the history store so that a client can resume them.

A session is what a resume restores: whose it is and what it was subscribed
to. The protocol only marks a session as changed (an in-memory set: frame
handlers run in event-loop callbacks and must not wait); the keeper's
greenlet writes the changes in batches every ``flush_interval``, and keeps
the live ones from expiring. So:

- a session lives ``window`` after its client left, whatever the reason: a
  network drop, a keep-alive timeout, a drain on SIGHUP or SIGTERM (the drain
  flushes before the worker exits);
- a session of a worker that was killed outright lives at least ``window``
  after the kill, because live sessions are always written to expire
  ``window + refresh`` ahead and refreshed every ``refresh``; only the
  subscription changes of its last ``flush_interval`` are lost (up to
  ``PATIENCE_S`` more while a fan-out was being written, see below), and the
  browser client re-subscribes whatever the restored session lacks.

Deliveries go first, for live sessions. Before each batch of changes to
sessions still open (new ones, SUBSCRIBEs) and of expiry refreshes, the
keeper waits while ``busy()`` says the outbox has sockets to write, for at
most ``PATIENCE_S`` per round: such a session is for a reconnect that has
not happened, a frame is for a client waiting now. Measured in the shared
harness's 10,000 x 10 fan-out: 3,500 sessions of the clients' SUBSCRIBEs
were still being written when the broadcasts began, 25 ms of a 190 ms
fan-out. Sessions that ended, and the deletion of resumed ones, never wait
for the outbox, nor behind such a round (they are written as they come while
it waits; one such write at a time, so that the drain's waits for one under
way): their client may be resuming on another worker right now (which looks for
the session only for a moment, ``Recovery.session_wait``), and a drain
running meanwhile must find nothing held back but live sessions, which its
own closing turns into ended ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import gevent
from gevent.lock import Semaphore

from .clock import drop_older
from .history import History, Session
from .timeslice import pause

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("relay.sessions")
T = TypeVar("T")
BATCH = 200  # rows per write (a few ms; 1,000 blocked the loop 66 ms in a connect storm), then a pause
PATIENCE_S = 1.0  # how long a round of writes may wait for the outbox (see the module docstring)
BUSY_POLL_S = 0.005


def _never_busy() -> bool:
    return False


class SessionKeeper:
    def __init__(
        self,
        store: History,
        *,
        window_ms: int,
        flush_interval: float = 0.25,
        refresh_ms: int | None = None,
        busy: Callable[[], bool] = _never_busy,
    ):
        self.store = store
        self.busy = busy
        self.window_ms = window_ms
        self.refresh_ms = refresh_ms if refresh_ms is not None else max(1000, min(30_000, window_ms // 4))
        self.flush_interval = flush_interval
        self._live: dict[str, Connection] = {}
        self._changed: set[str] = set()
        self._ended: dict[str, Session] = {}
        # When each session in _ended (or being saved) ended, oldest first: past the window there is
        # nothing left to resume, so a store that stays down does not make them pile up.
        self._ended_at: dict[str, float] = {}
        self._saving: list[dict[str, Session]] = []  # ended sessions a flush is writing (pending() sees them)
        self._forget: list[str] = []
        self._writing = 0  # changes a flush has taken and not yet written (status()'s pending counts them)
        self._writing_ended = Semaphore()
        # Restored here (when, time.monotonic(), oldest first), gone for good once their deletion is written.
        self._resumed: dict[str, float] = {}
        self._greenlet: gevent.Greenlet | None = None
        self.errors = 0

    # -- what the protocol tells us (in-memory only: safe from event-loop callbacks) -------------

    def opened(self, conn: Connection) -> None:
        self._live[conn.id] = conn
        self._changed.add(conn.id)

    def changed(self, conn: Connection) -> None:
        if conn.id in self._live:
            self._changed.add(conn.id)

    def closed(self, conn: Connection) -> None:
        if self._live.pop(conn.id, None) is not None:
            self._changed.discard(conn.id)
            self._ended[conn.id] = self._session_of(conn, open=False)
            self._ended_at[conn.id] = time.monotonic()

    def pending(self, client_id: str) -> Session | None:
        """What this worker knows of a session that may not be in the store yet (ended here, or still open)."""
        for ended_here in (self._ended, *self._saving):
            ended = ended_here.get(client_id)
            if ended is not None:
                return ended
        conn = self._live.get(client_id)
        return self._session_of(conn, open=True) if conn is not None else None

    def resumed(self, client_id: str) -> None:
        """A session was restored into a new connection, here or on another worker: it may not be restored
        twice (see :meth:`taken`). If its old socket is still open here, it closes without a session of its
        own to leave behind (the store would offer it again)."""
        if self._live.pop(client_id, None) is not None:
            self._changed.discard(client_id)
        self._ended.pop(client_id, None)
        self._ended_at.pop(client_id, None)
        self._forget.append(client_id)
        self._resumed.pop(client_id, None)  # to the end: the order is the order of the times
        self._resumed[client_id] = time.monotonic()

    def resumed_elsewhere(self, client_id: str, user_id: str) -> None:
        """Another worker restored this session. If this one holds it (its socket still open, or ended and
        not written yet, or being written), it is forgotten as :meth:`resumed`: else its socket's close, or
        the write under way, would put it back in the store after that worker deleted it."""
        held = self.pending(client_id)
        if held is not None and held.user_id == user_id:
            self.resumed(client_id)

    def taken(self, client_id: str) -> bool:
        """Whether the session was restored here already: until its deletion is written, the store
        (and another copy being written) would still offer it."""
        return client_id in self._resumed

    # -- writing ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def flush(self, patient_until: float = 0.0) -> None:
        """Write every pending change (the drain calls this before the worker exits: at once).

        Ended sessions first, then the deletions of resumed ones, neither
        waiting; then the changes to live sessions, each batch of which first
        waits while ``busy()`` until ``patient_until`` (``time.monotonic()``);
        sessions that end meanwhile are written as they come, not after it.
        If the store fails, what was pending stays pending for the next try.
        """
        self._write_ended()
        # Live sessions' changes are taken only now: if the writes above failed, they were never taken.
        changed, self._changed = self._changed, set()
        self._writing += len(changed)
        now = int(time.time() * 1000)
        try:
            for ids in _batches(list(changed), self.busy, patient_until, self._write_ended):
                # Read each batch's connections only when it is written: at the end of a connect
                # storm thousands are pending, and making all their sessions at once held the
                # loop for over 8 ms (gevent's blocking monitor caught it mid-fan-out). One that
                # closed meanwhile is an ended session now, written as the others that end (_write_ended).
                batch = [self._session_of(self._live[c], open=True) for c in ids if c in self._live]
                self.store.save_sessions(batch, now + self.window_ms + 2 * self.refresh_ms)
        except Exception:
            self._changed |= {c for c in changed if c in self._live}
            raise
        finally:
            self._writing -= len(changed)

    def _write_ended(self) -> None:
        """Write the sessions that ended and delete the resumed ones (nothing when there are none). Their
        clients may be resuming on another worker now, which waits for a session only a moment: while a
        round of live changes waits for the outbox (up to ``PATIENCE_S``), these are written as they come.
        A store that fails keeps them pending."""
        if not (self._ended or self._forget or self._saving):
            return
        # One writer at a time: the drain's flush, closing every socket, must wait for a write the keeper's
        # waiting round began (and take back what it could not write), not return while it is under way.
        with self._writing_ended:
            self._write_ended_now()

    def _write_ended_now(self) -> None:
        """:meth:`_write_ended`'s writing, under its lock."""
        if not self._ended and not self._forget:
            return
        now = int(time.time() * 1000)
        ended, self._ended = self._ended, {}
        forget, self._forget = self._forget, []
        self._saving.append(ended)  # until written, a client resuming here still finds them (pending())
        writing = len(ended) + len(forget)
        self._writing += writing
        try:
            for rows in _batches(list(ended.values())):
                self.store.save_sessions(rows, now + self.window_ms)
            self.store.delete_sessions(forget)
            for client_id in forget:
                self._resumed.pop(client_id, None)
            for client_id in ended:
                self._ended_at.pop(client_id, None)
        except Exception:
            ended.update(self._ended)  # those that ended meanwhile are newer (and few: no full copy)
            self._ended = ended
            self._forget = forget + self._forget
            self._drop_expired()
            raise
        finally:
            self._saving = [held for held in self._saving if held is not ended]
            self._writing -= writing

    def _drop_expired(self) -> None:
        """Forget what the store has been down too long to need: ended sessions older than the window,
        and the deletions of sessions restored longer ago than the store keeps a session (a live one's
        expiry is pushed ahead by up to twice the refresh; past that, the store offers it no more)."""
        now = time.monotonic()
        for client_id in drop_older(self._ended_at, now - self.window_ms / 1000):
            self._ended.pop(client_id, None)
        dropped = set(drop_older(self._resumed, now - (self.window_ms + 2 * self.refresh_ms) / 1000))
        if dropped:
            self._forget = [client_id for client_id in self._forget if client_id not in dropped]

    @staticmethod
    def _session_of(conn: Connection, *, open: bool) -> Session:
        return Session(conn.id, str(conn.user_id), tuple(sorted(conn.channels)), open)

    def refresh(self, patient_until: float = 0.0) -> None:
        """Push every live session's expiry ahead (their connections are still open); waits as flush does."""
        expires = int(time.time() * 1000) + self.window_ms + 2 * self.refresh_ms
        for ids in _batches(list(self._live), self.busy, patient_until, self._write_ended):
            # Not one that ended while this waited: written as ended, its expiry is the window's.
            self.store.touch_sessions([c for c in ids if c in self._live], expires)

    def _run(self) -> None:
        next_refresh = time.monotonic() + self.refresh_ms / 1000
        while True:
            gevent.sleep(self.flush_interval)
            try:
                self.flush(time.monotonic() + PATIENCE_S)
                if time.monotonic() >= next_refresh:
                    next_refresh = time.monotonic() + self.refresh_ms / 1000
                    self.refresh(time.monotonic() + PATIENCE_S)
            except Exception as problem:  # the store is down: keep what is pending, try again
                self.errors += 1
                log.warning("sessions not saved yet: %s", problem)

    def status(self) -> dict:
        """``pending``: the changes not written yet, those a flush is writing included."""
        waiting = len(self._changed) + len(self._ended) + len(self._forget) + self._writing
        return {"live": len(self._live), "pending": waiting, "errors": self.errors}


def _batches(
    items: list[T],
    busy: Callable[[], bool] = _never_busy,
    patient_until: float = 0.0,
    meanwhile: Callable[[], None] = lambda: None,
) -> Iterator[list[T]]:
    """``items`` BATCH at a time (the caller writes one per step), with a pause of the event loop after
    each; before each, a wait while ``busy()``, until ``patient_until`` at the latest, calling
    ``meanwhile()`` at every turn of it (what may not wait)."""
    for start in range(0, len(items), BATCH):
        while busy() and time.monotonic() < patient_until:
            meanwhile()
            gevent.sleep(BUSY_POLL_S)
        yield items[start : start + BATCH]
        pause()
