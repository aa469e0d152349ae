"""The embedded identity directory: one SQLite file in the instance folder.

It is the default so that ``make run`` works on a fresh machine with nothing
else installed. Users are managed with ``flask users ...``; passwords are
stored as Werkzeug hashes (scrypt). Lookups are a primary-key read, tens of
microseconds, so they run inline; password checks cost ~0.1 s of CPU and are
moved off the event loop (see :func:`offload`).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import secrets
import sqlite3
from dataclasses import dataclass

from werkzeug.security import check_password_hash, generate_password_hash

from .channels import ADMIN_ROLE, ID_PATTERN, is_valid_id, is_valid_role
from .directory import AccessTokenOwner, AccessTokensUnsupported, DirectoryUnavailable, Identity
from .sqlite import SqliteStore, errors_become, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id            TEXT PRIMARY KEY,
    email         TEXT UNIQUE COLLATE NOCASE,
    display_name  TEXT,
    role          TEXT NOT NULL,
    clinic_id     TEXT,
    active        INTEGER NOT NULL DEFAULT 1,
    password_hash TEXT,
    created_at    TEXT NOT NULL
);
-- Who changed (role, clinic, state), in order: every worker polls it, so open sockets follow at once.
CREATE TABLE IF NOT EXISTS identity_changes (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    at      TEXT NOT NULL
);
"""
_COLUMNS = "id, email, display_name, role, clinic_id, active"
_INSERT = (
    "INSERT INTO users (id, email, display_name, role, clinic_id, active, password_hash, created_at)"
    " VALUES (?, ?, ?, ?, ?, 1, ?, ?)"
)


@functools.cache
def _dummy_hash() -> str:
    """Checked when a login names no known user, so that "no such user" and
    "wrong password" take the same time."""
    return generate_password_hash(secrets.token_hex(8))


class UserError(ValueError):
    """A user-management request that cannot be applied (message says why)."""


@dataclass(frozen=True)
class DemoUser:
    user_id: str
    email: str
    password: str
    role: str
    clinic_id: str | None


def offload(fn, *args):
    """Run CPU-heavy ``fn`` in gevent's thread pool when the process is gevent-patched.

    scrypt releases the GIL, so a login does not freeze every socket of the
    worker for a tenth of a second. Outside gevent (CLI, unit tests) it just calls.
    """
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a hard dependency
        return fn(*args)
    if monkey.is_module_patched("socket"):
        return get_hub().threadpool.apply(fn, args)
    return fn(*args)


# Who a sign-in name is: an email or an id (authenticate and account_of must find the same row).
_SIGNS_IN = "email = ? OR id = ?"
# A file that cannot be opened or read: DirectoryUnavailable, answered with 503 or close 1013.
_store_errors = errors_become(DirectoryUnavailable, "the embedded identity store cannot be used")


def users_in(path: str) -> int:
    """How many users the store at ``path`` holds, read without creating or changing anything: 0 when it
    does not exist or holds no users table (the production start-up check, in the master)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0  # no such file (read-only mode does not create it)
    try:
        return int(db.execute("SELECT COUNT(*) FROM users").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        db.close()


class SqliteDirectory(SqliteStore):
    """Users in SQLite. Safe to share between greenlets (one connection, one lock)."""

    name = "sqlite"
    schema = SCHEMA
    recheck_batch = 500  # one IN query, a few ms of the worker each, spread over the interval

    # -- the Directory interface ------------------------------------------

    @_store_errors
    def get(self, user_id: str) -> Identity | None:
        row = self._query_one(f"SELECT {_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return _identity(row) if row else None

    @_store_errors
    def authenticate(self, login: str, password: str) -> Identity | None:
        row = self._query_one(f"SELECT {_COLUMNS}, password_hash FROM users WHERE {_SIGNS_IN}", (login, login))
        stored = row[6] if row and row[6] else _dummy_hash()
        ok = offload(check_password_hash, stored, password)
        if not row or not ok or not row[5]:
            return None
        return _identity(row[:6])

    @_store_errors
    def account_of(self, login: str) -> str:
        """A user signs in here by email or by id: both count as the user's id.

        Two namespaces: a name that finds nobody can never be counted as an
        account (typing ``id:carol`` must not reach carol's count, or guessing
        ids would tell which exist by who gets blocked).
        """
        row = self._query_one(f"SELECT id FROM users WHERE {_SIGNS_IN}", (login, login))
        return f"id:{row[0]}" if row else f"name:{login}"

    def user_for_access_token(self, token: str) -> AccessTokenOwner:
        raise AccessTokensUnsupported(
            "bearer access tokens are issued by Supabase; configure SUPABASE_URL to accept them"
        )

    def project_warnings(self) -> list[str]:
        """Nothing to say: its users are those an operator added (``flask users add``); nobody signs up."""
        return []

    def status(self) -> dict:
        try:
            self._query_one("SELECT 1", ())
        except sqlite3.Error as problem:
            return {"kind": self.name, "state": "degraded", "path": self.path, "lastError": str(problem)}
        return {"kind": self.name, "state": "ok", "path": self.path}

    # -- user management (flask users ...) --------------------------------

    def add_user(
        self,
        user_id: str,
        *,
        email: str | None,
        password: str | None,
        role: str,
        clinic_id: str | None = None,
        display_name: str | None = None,
    ) -> Identity:
        _check_user_fields(user_id, role, clinic_id)
        if email is not None and not (_EMAIL.fullmatch(email) and email.isprintable()):
            raise UserError(f"email {email!r} is not an email address")
        if password is not None:
            _check_password(password)
        # A user signs in by email or by id: neither may be the other's of someone else.
        taken = self._query_one("SELECT id FROM users WHERE id = ? OR email = ?", (email, user_id))
        if taken is not None:
            raise UserError(f"{user_id!r} or {email!r} is already another user's id or email (sign-in takes either)")
        hashed = generate_password_hash(password) if password is not None else None
        try:
            self._execute(_INSERT, (user_id, email or None, display_name, role, clinic_id or None, hashed, _now()))
        except sqlite3.IntegrityError:
            raise UserError(f"a user with id {user_id!r} or email {email!r} already exists") from None
        added = self.get(user_id)
        assert added is not None, "a user just inserted is found"
        return added

    def list_users(self) -> list[Identity]:
        with self._lock:
            rows = self._conn().execute(f"SELECT {_COLUMNS} FROM users ORDER BY id").fetchall()
        return [_identity(row) for row in rows]

    def set_role(self, user_id: str, role: str) -> None:
        _check_user_fields(user_id, role, None)
        self._update(user_id, "role = ?", (role,), changes_access=True)

    def set_clinic(self, user_id: str, clinic_id: str | None) -> None:
        if clinic_id and not is_valid_id(clinic_id):
            raise UserError(f"clinic id {clinic_id!r} must match {ID_PATTERN}")
        self._update(user_id, "clinic_id = ?", (clinic_id or None,), changes_access=True)

    def set_active(self, user_id: str, active: bool) -> None:
        self._update(user_id, "active = ?", (1 if active else 0,), changes_access=True)

    # -- live revocation ------------------------------------------------------

    @_store_errors
    def get_many(self, user_ids: list[str]) -> dict[str, Identity | None]:
        """Every one of ``user_ids`` as the store has it now (None: no such user)."""
        found: dict[str, Identity | None] = dict.fromkeys(user_ids)
        for start in range(0, len(user_ids), 500):
            batch = user_ids[start : start + 500]
            marks = ",".join("?" * len(batch))
            with self._lock:
                rows = self._conn().execute(f"SELECT {_COLUMNS} FROM users WHERE id IN ({marks})", batch).fetchall()
            for row in rows:
                found[row[0]] = _identity(row)
        return found

    @_store_errors
    def changes_since(self, cursor: int | None) -> tuple[int, list[str]]:
        """Users whose access changed through this store after ``cursor`` (None: start from now)."""
        with self._lock:
            db = self._conn()
            if cursor is None:
                last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM identity_changes").fetchone()[0]
                return int(last), []
            rows = db.execute(
                "SELECT seq, user_id FROM identity_changes WHERE seq > ? ORDER BY seq LIMIT 1000", (cursor,)
            ).fetchall()
        if not rows:
            return cursor, []
        return int(rows[-1][0]), list(dict.fromkeys(row[1] for row in rows))

    def set_password(self, user_id: str, password: str) -> None:
        _check_password(password)
        self._update(user_id, "password_hash = ?", (generate_password_hash(password),))

    def seed_demo(self, users: list[tuple[str, str, str, str | None]]) -> list[DemoUser]:
        """Create demo users with fresh random passwords, only if there are no users yet.

        ``users`` lists ``(user_id, email, role, clinic_id)``. Returns the users
        created (empty when the table already had users), so that exactly one
        process prints the credentials even when several workers start at once.
        """
        created: list[DemoUser] = []
        with self._lock:
            db = self._conn()
            with transaction(db):
                if db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0:
                    for user_id, email, role, clinic_id in users:
                        password = secrets.token_urlsafe(12)
                        hashed = generate_password_hash(password)
                        db.execute(_INSERT, (user_id, email, user_id, role, clinic_id, hashed, _now()))
                        created.append(DemoUser(user_id, email, password, role, clinic_id))
        return created

    # -- plumbing ---------------------------------------------------------

    def _query_one(self, sql: str, args: tuple) -> tuple | None:
        with self._lock:
            return self._conn().execute(sql, args).fetchone()

    def _execute(self, sql: str, args: tuple) -> int:
        with self._lock:
            return self._conn().execute(sql, args).rowcount

    def _update(self, user_id: str, assignment: str, args: tuple, *, changes_access: bool = False) -> None:
        with self._lock:
            db = self._conn()
            with transaction(db):  # the change and its notice, or neither
                if db.execute(f"UPDATE users SET {assignment} WHERE id = ?", (*args, user_id)).rowcount == 0:
                    raise UserError(f"no user with id {user_id!r}")
                if changes_access:
                    db.execute("INSERT INTO identity_changes (user_id, at) VALUES (?, ?)", (user_id, _now()))
                    db.execute(
                        "DELETE FROM identity_changes WHERE seq <= (SELECT MAX(seq) - 10000 FROM identity_changes)"
                    )


def _identity(row: tuple) -> Identity:
    return Identity(
        user_id=row[0],
        email=row[1],
        display_name=row[2],
        role=row[3],
        clinic_id=row[4],
        active=bool(row[5]),
    )


# No spaces, and (with str.isprintable) no control or format characters: an escape sequence, a
# right-to-left override would reach every log line and page that names the user. The rest is the
# mail server's to judge.
_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}")


def _check_user_fields(user_id: str, role: str, clinic_id: str | None) -> None:
    if not is_valid_id(user_id):
        raise UserError(f"user id {user_id!r} must match {ID_PATTERN}")
    if not is_valid_role(role or ""):
        raise UserError(f"role {role!r} must be one word of letters, digits, _ or -, e.g. admin or sales_staff")
    if role.lower() == ADMIN_ROLE and role != ADMIN_ROLE:  # would look like one, and be nobody's admin
        raise UserError(
            f"role {role!r} is not {ADMIN_ROLE!r}: roles are case-sensitive, and only {ADMIN_ROLE!r} is admin"
        )
    if clinic_id and not is_valid_id(clinic_id):
        raise UserError(f"clinic id {clinic_id!r} must match {ID_PATTERN}")


def _check_password(password: str) -> None:
    if not password:  # nobody could sign in with it (the sign-in form refuses an empty one)
        raise UserError("a password cannot be empty (use --no-password for a user that cannot sign in)")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


DEMO_USERS = [
    ("demo-admin", "admin@demo.clinic", ADMIN_ROLE, None),
    ("demo-staff-1", "staff1@demo.clinic", "sales_staff", "clinic-1"),
    ("demo-staff-2", "staff2@demo.clinic", "sales_staff", "clinic-2"),
]
