"""What the SQLite stores (users, history, broadcast log, sign-outs) share: how a file is opened and
held (:class:`SqliteStore`), what a transaction is, and where its checkpoints run.

**Checkpoints run off the event loop.** In WAL mode a commit appends to the
``-wal`` file; now and then the pages must be copied back into the database
and the file synced, and by default the commit that crosses 1,000 pages does
it, on the event loop: measured, one commit of 200 sessions in eight took
6-11 ms instead of ~1, during a connect storm's session writes and again in
the middle of a fan-out. So a commit checkpoints only past a far backstop
(``WAL_BACKSTOP_PAGES``), and one greenlet per process (:func:`start_checkpoints`,
called as the service starts) checkpoints every file open here four times a
second from a thread of gevent's pool (SQLite releases the GIL; the loop goes on). A PASSIVE
checkpoint waits for no one and no writer waits for it. (Once a second was
too slow: the 10,000 sessions written when a storm's clients leave are ~40 MB
of WAL within a second, random keys touching a page each, and reached the
backstop.) With gevent's blocking monitor on (``GEVENT_MONITOR_THREAD_ENABLE=1
GEVENT_MAX_BLOCKING_TIME=0.008``), four 10,000-client fan-out runs reported
the session keeper holding the loop over 8 ms 43 times before, 2 after.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

import gevent
from gevent import get_hub

log = logging.getLogger("relay.sqlite")

WAL_BACKSTOP_PAGES = 10_000  # ~40 MB: a commit checkpoints itself only if the background ones stopped
CHECKPOINT_EVERY_S = 0.25
# The database files open in this process, each with how many stores hold it: checkpoint_forever's
# list. Changed only by greenlets (never from the pool's thread), so it needs no lock.
_opened: Counter[str] = Counter()
_checkpointer: gevent.Greenlet | None = None


P = ParamSpec("P")
R = TypeVar("R")


def errors_become(unavailable: Callable[[str], Exception], what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator for a store's methods: a disk that is full, a file locked past the busy timeout or
    gone, a folder that cannot be made for it, raises ``unavailable("<what>: <the error>")`` (the
    store's own "unavailable": a 503, a close 1013, a refused resume), never a stray sqlite3 or OS
    error (a 500, a 1011)."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @wraps(method)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except (sqlite3.Error, OSError) as problem:
                raise unavailable(f"{what}: {problem}") from None

        return guarded

    return decorate


def open_db(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating its folder and tables) in WAL mode: readers never wait for the writer.

    ``synchronous=NORMAL``: a commit survives the process being killed (it is in
    the WAL); only a power cut can lose the last ones. Autocommit, so that a
    transaction is exactly what :func:`transaction` says. Checkpoints are left
    to :func:`checkpoint_forever` (see the module docstring); close the
    connection with :func:`close_db`, which takes the file off its list.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
    db.executescript(schema)
    _opened[os.path.abspath(path)] += 1
    return db


def close_db(db: sqlite3.Connection, path: str) -> None:
    """Close a connection made by :func:`open_db`; the file is no longer checkpointed once no store holds it."""
    db.close()
    path = os.path.abspath(path)
    _opened[path] -= 1
    if _opened[path] <= 0:
        del _opened[path]


def checkpoint(path: str) -> bool:
    """Copy ``path``'s WAL back into it (PASSIVE: as far as readers allow); runs in any thread.

    Its own short-lived connection, opened read-write only if the file still
    exists: False if it could not be opened (gone, or no descriptor left).
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=0, check_same_thread=False)
    except sqlite3.OperationalError:
        return False
    try:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        db.close()
    return True


def start_checkpoints() -> None:
    """Start this process's one checkpointer (a greenlet running :func:`checkpoint_forever`) unless it runs."""
    global _checkpointer
    if _checkpointer is None or _checkpointer.dead:
        _checkpointer = gevent.spawn(checkpoint_forever)


def checkpoint_forever(every_s: float = CHECKPOINT_EVERY_S) -> None:
    """Checkpoint every open file once per ``every_s``, each in a pool thread (the body of a greenlet).

    Always the pool, never inline as ``offload`` does outside a patched process:
    this runs in a greenlet, so there is a hub, and inline the checkpoints would
    hold the loop. A file deleted under us is dropped from the list here, on
    the loop. The first round runs at once: the pool's thread and what SQLite
    allocates in it (~0.3 MB, kept by the thread's malloc arena) are then part
    of the worker's footprint from the start, not of the first connections'.
    """
    while True:
        for path in sorted(_opened):
            try:
                if not get_hub().threadpool.apply(checkpoint, (path,)) and not os.path.exists(path):
                    _opened.pop(path, None)  # deleted under us (not, say, out of file descriptors)
            except sqlite3.Error as problem:  # busy or failing now: the next round tries again
                log.warning("checkpoint of %s failed: %s", path, problem)
        gevent.sleep(every_s)


class SqliteStore:
    """What every store on a SQLite file holds: its path, one connection opened on first use (with the
    store's ``schema``), the lock each use of it takes (one connection, many greenlets), and ``close``.

    Opening on first use keeps the app factory free of files and connections.
    A store that must write something into a new file (the history's epoch)
    does it in :meth:`_prepare`, which runs once per connection opened.
    """

    schema: str = ""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        """The connection (opened now if need be); call it with ``self._lock`` held."""
        if self._db is None:
            db = open_db(self.path, self.schema)
            try:
                self._prepare(db)
            except BaseException:
                close_db(db, self.path)
                raise
            self._db = db
        return self._db

    def _prepare(self, db: sqlite3.Connection) -> None:
        """Runs once on each connection opened, after the schema."""

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                close_db(self._db, self.path)
                self._db = None


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error).

    In autocommit mode ``with db:`` begins nothing, so a batch would commit row
    by row (measured: 8 us a row in one transaction, 20-60 us row by row).
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
