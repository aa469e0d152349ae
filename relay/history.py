"""The history seam: what the delivery guarantee remembers, and where.

One ordered stream per deployment. Every accepted broadcast is appended and
gets an ``offset`` (an integer, strictly increasing across every worker and
host that shares the store) in a stream with an ``epoch`` (a string that
changes only when the stream's history was lost, so a stale offset is never
trusted). Beside the stream the store keeps what recovery needs:

- the **history**: every broadcast of the last ``window`` (with its filter),
  read back by offset when a client resumes or a worker fills a gap;
- **sessions**: which user a client id belonged to and what it was
  subscribed to, kept ``window`` after the client left;
- **idempotency keys**: a producer's retry of a broadcast it already sent gets
  the first answer instead of a second broadcast;
- **last values**: the latest broadcast addressed to each channel, one per
  audience (:attr:`relay.envelope.Filter.audience`), for ``SUBSCRIBE
  {"last": true}``: a broadcast to some of a channel's subscribers (one
  user, one role) does not hide the channel's value from the others.

Two implementations, behind this one interface and one shared conformance
test: :class:`relay.sqlite_history.SqliteHistory` (the embedded default, a
WAL SQLite file in the instance folder) and
:class:`relay.redis_history.RedisHistory` (shared by every worker and host).
Every method may do I/O: never call one from an event-loop callback (see
``relay.connection``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from .envelope import Envelope

# Audiences a channel keeps a last value for; past that, the one broadcast to longest ago is dropped.
# A channel's broadcasts go to a handful (everyone on it, a role, the odd single user).
LAST_AUDIENCES = 16


class HistoryUnavailable(Exception):
    """The store cannot answer (Redis down): nothing was appended; the broadcast gets a 503."""


class IdempotencyConflict(Exception):
    """An idempotency key came back with a different request than the one it was first used for."""


@dataclass(frozen=True)
class Appended:
    """A new broadcast took its place in the stream."""

    epoch: str
    offset: int


@dataclass(frozen=True)
class Previous:
    """The idempotency key was used before: this is what the first request got.

    ``answer`` is the first request's full answer (the ``/broadcast`` JSON body)
    once it completed; None while the first request is still being delivered,
    or if the worker that took it died before it could answer.
    """

    epoch: str
    offset: int
    envelope_id: str
    answer: dict | None


@dataclass(frozen=True)
class Idempotency:
    """A producer's ``Idempotency-Key``, scoped to who sent it, and a digest of what it sent with it."""

    key: str
    digest: str

    @classmethod
    def of(cls, scope: str, key: str, message_type: str, data: object, flt: dict) -> Idempotency:
        body = json.dumps([message_type, data, flt], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return cls(f"{scope}:{key}", hashlib.sha256(body.encode()).hexdigest())


@dataclass(frozen=True)
class Session:
    """A client's session as recovery restores it: whose it is and what it was subscribed to.

    ``open``: its socket was still open when this copy was written. A resume of such a session from
    another worker tells the one holding that socket to close it (a client that came back before the
    server noticed its old connection had died), see ``Realtime._replace``. Kept by a store that
    several workers share (Redis); the embedded one, which one worker uses at a time (and, during a
    reload, a draining one whose sockets are all closed), keeps its schema and answers False, so
    that a release before this one still reads and writes the same file.
    """

    client_id: str
    user_id: str
    channels: tuple[str, ...]
    open: bool = False


class History(Protocol):
    name: str

    def head(self) -> tuple[str, int]:
        """The stream's epoch and its last offset (0 before the first broadcast)."""

    def append(self, envelope: Envelope, *, idempotency: Idempotency | None = None) -> Appended | Previous:
        """Give ``envelope`` the next offset, keep it (and the last value of each of its channels).

        With ``idempotency``: if the key was used within the window, append
        nothing and return :class:`Previous` (raise IdempotencyConflict if
        the digest differs). Raises HistoryUnavailable.
        """

    def complete(self, idempotency: Idempotency, answer: dict) -> None:
        """Record the answer the first request with this key got."""

    def previous(self, idempotency: Idempotency) -> Previous | None:
        """What the key's first request got so far (None if the key is unknown)."""

    def read(self, after: int, limit: int) -> list[Envelope]:
        """Retained broadcasts with offsets above ``after``, in offset order, at most ``limit``."""

    def start_over(self, epoch: str) -> tuple[str, int]:
        """The stream went back in time under ``epoch`` (an older copy of the store came back: Redis
        restarted from a snapshot, a replica that lagged): its next offsets would be ones already
        delivered. If the stream is still ``epoch``, drop its broadcasts and start a new epoch, so
        that every offset of the old one is refused on resume; returns the stream's (epoch, head)."""

    def oldest(self) -> int | None:
        """The offset of the oldest retained broadcast (None when none is retained)."""

    def last_values(self, channels: list[str], max_age_ms: int) -> dict[str, list[Envelope]]:
        """For each channel, the latest broadcast addressed to it for each audience, published within
        ``max_age_ms``, newest first (channels with none are left out). A channel keeps its
        ``LAST_AUDIENCES`` most recent audiences."""

    def save_sessions(self, sessions: list[Session], expires_at_ms: int) -> None:
        """Create or replace these sessions, each kept until ``expires_at_ms`` (``open`` where shared, see Session)."""

    def touch_sessions(self, client_ids: list[str], expires_at_ms: int) -> None:
        """Extend live sessions (their connections are still open)."""

    def load_session(self, client_id: str) -> Session | None:
        """The session, unless it is unknown or expired."""

    def delete_sessions(self, client_ids: list[str]) -> None:
        """Forget sessions (resumed: each is restored at most once)."""

    def trim(self, now_ms: int) -> int:
        """Drop what is older than the window at ``now_ms`` (or by the store's own clock, where hosts
        share it: Redis); returns how many broadcasts were dropped."""

    def status(self) -> dict:
        """For ``/health``: ``{"kind", "epoch", "head", "retained", "oldest": {"offset", "at"} | None}``."""

    def close(self) -> None: ...
