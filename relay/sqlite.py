"""What both SQLite stores (users, history) share: how a file is opened, and what a transaction is."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


def open_db(path: str, schema: str) -> sqlite3.Connection:
    """Open (creating its folder and tables) in WAL mode: readers never wait for the writer.

    ``synchronous=NORMAL``: a commit survives the process being killed (it is in
    the WAL); only a power cut can lose the last ones. Autocommit, so that a
    transaction is exactly what :func:`transaction` says.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db


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
