"""Create bench users ``bench-user-0`` .. ``bench-user-{N-1}`` in the SQLite identity store.

Used by ``bench/run.py`` and by ``bench/serve.sh`` (the target command for
the shared peers harness, whose load generator connects as those users).
Roles and clinics rotate so that the hub's indexes look like a real chain:
admins, clinic staff of 100 clinics. Users are created without passwords,
so this takes well under a second for 10,000 of them.

    REALTIME_DB=/tmp/bench.db python bench/prepare_users.py 10000
"""

from __future__ import annotations

import os
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relay.sqlite_directory import SCHEMA, _now  # noqa: E402

ROLES = ("sales_staff", "nurse", "sales_staff", "doctor", "admin")


def prepare(db_path: str, count: int) -> None:
    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA)
    now = _now()
    rows = [
        (
            f"bench-user-{i}",
            None,
            f"Bench {i}",
            ROLES[i % len(ROLES)],
            None if ROLES[i % len(ROLES)] == "admin" else f"clinic-{i % 100}",
            1,
            None,
            now,
        )
        for i in range(count)
    ]
    db.executemany("INSERT OR IGNORE INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


if __name__ == "__main__":
    prepare(os.environ.get("REALTIME_DB") or sys.argv[2], int(sys.argv[1]))
