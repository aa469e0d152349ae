"""SQLite history status (/health's "stream"): the counts are scans, so they are taken at most once a second."""

from __future__ import annotations

import time

import pytest

from relay import sqlite_history
from relay.envelope import Envelope
from relay.history import HistoryUnavailable, Session
from relay.sqlite_history import SqliteHistory


def sessions(n: int, prefix: str) -> list[Session]:
    return [Session(f"{prefix}{i:04x}", f"u{i}", ("system:announcements",)) for i in range(n)]


def test_counts_are_reused_within_a_second_and_taken_again_after(tmp_path, monkeypatch):
    store = SqliteHistory(str(tmp_path / "history.db"), window_ms=60_000, last_value_ttl_ms=60_000)
    expires = int(time.time() * 1000) + 60_000
    store.append(Envelope("ANNOUNCEMENT", {"n": 1}))
    store.save_sessions(sessions(3, "a"), expires)
    first = store.status()
    assert first["retained"] == 1 and first["sessions"] == 3 and first["head"] == 1

    store.append(Envelope("ANNOUNCEMENT", {"n": 2}))
    store.save_sessions(sessions(2, "b"), expires)
    cached = store.status()
    assert cached["head"] == 2 and cached["oldest"]["offset"] == 1  # read every time
    assert cached["retained"] == 1 and cached["sessions"] == 3  # counted a moment ago

    monkeypatch.setattr(sqlite_history, "COUNTS_EVERY_S", 0.0)
    fresh = store.status()
    assert fresh["retained"] == 2 and fresh["sessions"] == 5
    store.close()


def test_an_empty_stream_has_no_oldest(tmp_path):
    store = SqliteHistory(str(tmp_path / "history.db"), window_ms=60_000, last_value_ttl_ms=60_000)
    status = store.status()
    assert status["oldest"] is None and status["retained"] == 0 and status["head"] == 0
    store.close()


def test_a_store_that_cannot_be_opened_is_history_unavailable_so_health_says_degraded(tmp_path):
    """Not a raw sqlite3 error, which /health answered with a 500 (and a load balancer took the worker
    out of rotation while /broadcast correctly said 503)."""
    broken = SqliteHistory(str(tmp_path), window_ms=60_000, last_value_ttl_ms=60_000)  # a folder, not a file
    with pytest.raises(HistoryUnavailable):
        broken.status()
