"""relay.sqlite: commits do not checkpoint the WAL on the event loop; a pool thread does, four times a second."""

from __future__ import annotations

import os

import gevent

import relay.sqlite
from relay.sqlite import checkpoint, checkpoint_forever, close_db, open_db, start_checkpoints, transaction

SCHEMA = "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"


def write_pages(db, pages: int) -> None:
    """About ``pages`` 4 KB pages of rows, in commits of ~100 pages (as session batches are)."""
    for _ in range(pages // 100):
        with transaction(db):
            db.executemany("INSERT INTO rows (body) VALUES (?)", [("x" * 3800,)] * 100)


def test_commits_leave_the_wal_to_the_checkpointer(tmp_path):
    path = str(tmp_path / "a.db")
    db = open_db(path, SCHEMA)
    assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == relay.sqlite.WAL_BACKSTOP_PAGES
    write_pages(db, 2000)  # twice SQLite's default threshold, at which a commit would have checkpointed
    before = os.path.getsize(path)
    assert before < 100 * 4096  # the rows are all still in the WAL: no commit copied them back
    assert checkpoint(path)
    assert os.path.getsize(path) > 1500 * 4096  # copied into the database by the checkpoint
    assert db.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 2000
    db.close()


def test_a_file_is_checkpointed_while_some_store_holds_it_open(tmp_path):
    path = str(tmp_path / "shared.db")
    first, second = open_db(path, SCHEMA), open_db(path, SCHEMA)
    assert relay.sqlite._opened[path] == 2
    close_db(first, path)
    assert relay.sqlite._opened[path] == 1  # the other store still writes to it
    close_db(second, path)
    assert path not in relay.sqlite._opened


def test_one_checkpointer_per_process_however_many_times_it_is_started():
    try:
        start_checkpoints()
        running = relay.sqlite._checkpointer
        assert running is not None and not running.dead
        start_checkpoints()  # a second service in the process
        assert relay.sqlite._checkpointer is running
        running.kill()
        start_checkpoints()  # a dead one is replaced
        assert relay.sqlite._checkpointer is not running and not relay.sqlite._checkpointer.dead
    finally:
        if relay.sqlite._checkpointer is not None:
            relay.sqlite._checkpointer.kill()


def test_checkpoint_forever_runs_in_a_pool_thread_and_forgets_files_that_are_gone(tmp_path):
    kept, gone = str(tmp_path / "kept.db"), str(tmp_path / "gone.db")
    db = open_db(kept, SCHEMA)
    open_db(gone, SCHEMA).close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(gone + suffix):
            os.remove(gone + suffix)
    write_pages(db, 500)
    worker = gevent.spawn(checkpoint_forever, 0.01)
    try:
        for _ in range(300):  # bounded: ~3 s
            if os.path.getsize(kept) > 400 * 4096 and gone not in relay.sqlite._opened:
                break
            gevent.sleep(0.01)
    finally:
        worker.kill()
    assert os.path.getsize(kept) > 400 * 4096
    assert gone not in relay.sqlite._opened and not os.path.exists(gone)  # not re-created by the checkpointer
    db.close()
