"""The identity directory seam: who is user X?

Two implementations answer it: :class:`relay.sqlite_directory.SqliteDirectory`
(the embedded default, managed with ``flask users ...``) and, when Supabase is
configured, a Supabase-backed one. The socket handshake, the login page and
``/api/ws/auth`` only ever see this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    email: str | None
    display_name: str | None
    role: str
    clinic_id: str | None
    active: bool = True

    @property
    def is_admin(self) -> bool:
        from .channels import ADMIN_ROLE

        return self.role == ADMIN_ROLE

    def public(self) -> dict:
        """The identity as JSON for pages and APIs (no secrets in it to begin with)."""
        return {
            "userId": self.user_id,
            "email": self.email,
            "displayName": self.display_name,
            "role": self.role,
            "clinicId": self.clinic_id,
        }


@dataclass(frozen=True, slots=True)
class AccessTokenOwner:
    """Whom a front end's access token names, and when it was issued (its ``iat``, in epoch ms; None
    when it carries none): a token issued before its user was signed out everywhere mints nothing."""

    user_id: str
    issued_ms: int | None


class DirectoryUnavailable(Exception):
    """The identity source cannot answer right now (network, timeout, 5xx).

    Callers must not treat this as "unknown user": a socket gets close 1013
    (try again later), not 4403.
    """


class AccessTokenInvalid(Exception):
    """A bearer access token was refused (expired, forged, unknown user)."""


class AccessTokensUnsupported(Exception):
    """This directory cannot vouch for bearer access tokens (only Supabase can)."""


class Directory(Protocol):
    """Looks users up. Implementations must be safe to call from many greenlets."""

    name: str
    # How many users one ``get_many`` of the periodic re-check should ask for: what is cheapest
    # for the source (a SQLite IN list; for Supabase, everyone at once: one pass over its user list).
    recheck_batch: int

    def get(self, user_id: str) -> Identity | None:
        """The user, or None if there is no such user. Raises DirectoryUnavailable."""

    def authenticate(self, login: str, password: str) -> Identity | None:
        """The active user with these credentials, or None. Raises DirectoryUnavailable."""

    def account_of(self, login: str) -> str:
        """What the sign-in throttle counts an attempt with ``login`` against.

        The same (compared case-insensitively) for every name that signs one
        account in, so that typing it another way buys no more guesses; for a
        name that signs nobody in, anything stable. Raises DirectoryUnavailable.
        """

    def user_for_access_token(self, token: str) -> AccessTokenOwner:
        """The user a front end's access token belongs to, and when it was issued.

        Raises AccessTokenInvalid, AccessTokensUnsupported or DirectoryUnavailable.
        """

    def get_many(self, user_ids: list[str]) -> dict[str, Identity | None]:
        """Each user as the source has it *now* (no cache), for re-checking open sockets in batches.

        Raises DirectoryUnavailable.
        """

    def changes_since(self, cursor: int | None) -> tuple[int, list[str]]:
        """Users whose access changed through this directory after ``cursor``: ``(new cursor, user ids)``.

        ``None`` starts from now. A source changed elsewhere (Supabase) reports
        none; the periodic re-check finds those changes.
        """

    def project_warnings(self) -> list[str]:
        """What in the source's own settings lets people connect who should not (a Supabase project open
        to sign-ups), in sentences for an operator; empty when nothing is to be said. Said by ``flask ws
        identity check`` and once as each worker starts. Raises DirectoryUnavailable."""

    def status(self) -> dict:
        """A small JSON-able description for ``/health`` (kind, state, last error)."""
