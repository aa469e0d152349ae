"""Channel names and who may read them.

The names are the original ``channels.ts``; :data:`channels` offers the same
builders in Python (``channels.clinic.queue("c-1") == "clinic:c-1:queue"``)
and ``static/js/realtime.js`` the same in the browser.

| channel                         | who may subscribe                  |
|---------------------------------|------------------------------------|
| ``system:announcements``        | any signed-in user                 |
| ``system:maintenance``          | any signed-in user                 |
| ``clinic:{clinicId}:queue``     | staff of that clinic, and admins   |
| ``clinic:{clinicId}:alerts``    | staff of that clinic, and admins   |
| ``user:{userId}:notifications`` | that user only                     |

Anything else is unknown. Ids inside names match :data:`ID_PATTERN`.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Protocol

from .codes import Error

ADMIN_ROLE = "admin"
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}"
MAX_CHANNEL_CHARS = 200

_ID = re.compile(ID_PATTERN)
_ROLE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # one word: "admin " would not be admin
_SYSTEM = frozenset({"system:announcements", "system:maintenance"})
_CLINIC = re.compile(rf"clinic:({ID_PATTERN}):(queue|alerts)")
_USER = re.compile(rf"user:({ID_PATTERN}):notifications")


def _require_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{kind} {value!r} does not match {ID_PATTERN}")
    return value


channels = SimpleNamespace(
    system=SimpleNamespace(
        announcements="system:announcements",
        maintenance="system:maintenance",
    ),
    clinic=SimpleNamespace(
        queue=lambda clinic_id: f"clinic:{_require_id('clinic id', clinic_id)}:queue",
        alerts=lambda clinic_id: f"clinic:{_require_id('clinic id', clinic_id)}:alerts",
    ),
    user=SimpleNamespace(
        notifications=lambda user_id: f"user:{_require_id('user id', user_id)}:notifications",
    ),
)


def is_valid_id(value: str) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def is_valid_role(value: str) -> bool:
    """A role as this service's own users are given one: a word of letters, digits, ``_`` or ``-``."""
    return isinstance(value, str) and _ROLE.fullmatch(value) is not None


class Reader(Protocol):
    """What channel rules need to know about a subscriber (an Identity, or a connection that has one)."""

    @property
    def user_id(self) -> str | None: ...

    @property
    def role(self) -> str | None: ...

    @property
    def clinic_id(self) -> str | None: ...


def refusal(reader: Reader, name: str) -> str | None:
    """Why ``reader`` may not subscribe to ``name`` (an :class:`Error` code), or None."""
    if not isinstance(name, str) or len(name) > MAX_CHANNEL_CHARS:
        return Error.UNKNOWN_CHANNEL
    if name in _SYSTEM:
        return None
    match = _CLINIC.fullmatch(name)
    if match:
        if reader.role == ADMIN_ROLE or reader.clinic_id == match.group(1):
            return None
        return Error.FORBIDDEN_CHANNEL
    match = _USER.fullmatch(name)
    if match:
        return None if reader.user_id == match.group(1) else Error.FORBIDDEN_CHANNEL
    return Error.UNKNOWN_CHANNEL
