"""The SQLite identity store when its file cannot be used: DirectoryUnavailable, as the Directory seam promises."""

from __future__ import annotations

import pytest

from relay.directory import DirectoryUnavailable
from relay.sqlite_directory import SqliteDirectory


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.get("u-1"),
        lambda d: d.authenticate("someone@example.org", "a password"),
        lambda d: d.get_many(["u-1", "u-2"]),
        lambda d: d.changes_since(None),
    ],
    ids=["get", "authenticate", "get_many", "changes_since"],
)
def test_a_file_that_cannot_be_opened_is_directory_unavailable_not_a_sqlite_error(tmp_path, call):
    """Callers answer DirectoryUnavailable with 503 or close 1013, and a sign-in it interrupts is not
    counted against anyone; a raw sqlite3 error was a 500 (or 1011), and the sign-in counted."""
    broken = SqliteDirectory(str(tmp_path))  # a folder, not a file
    with pytest.raises(DirectoryUnavailable, match="identity store cannot be used"):
        call(broken)


def test_status_says_degraded_when_the_file_cannot_be_used(tmp_path):
    assert SqliteDirectory(str(tmp_path)).status()["state"] == "degraded"
    working = SqliteDirectory(str(tmp_path / "identity.db"))
    assert working.status()["state"] == "ok"
    working.close()
