"""Access follows the user: open sockets are re-checked when an identity changes.

A token is checked once, when a socket opens; after that, who the user is
may change (disabled, moved to another clinic, another role). Two ways of
noticing, in a greenlet of each worker:

- **changes made through this service** (``flask users disable|set-role|set-clinic``,
  writing the SQLite store): the directory keeps a log of them, polled every
  ``poll_interval``, so every worker follows within about a second;
- **changes made elsewhere** (in Supabase, or another program writing the
  SQLite file): every ``recheck_interval`` (``WS_IDENTITY_RECHECK_MS``) the
  identities of every connected user are read again, in batches spread over
  the interval (``Directory.get_many``, each batch the size the directory
  asks for: a SQLite IN list of 500, or for Supabase all of them in one pass
  over its user list, so that a re-check costs a page per thousand users,
  never a call per user or a pass per batch). Each batch is also read from
  the sign-out store (``sign_outs``, :meth:`Realtime.recheck_sign_outs`): a
  sign-out everywhere or an administrator's disconnect whose close a worker
  never heard ends its sockets here.

What a change does (``Realtime.apply_identity``): a disabled or deleted user's
sockets are closed with 4403; a user whose role or clinic changed is moved
in the hub's indexes at once (role and clinic filters use the new values),
and loses every subscription they may no longer hold (an ``ERROR
forbidden_channel`` per channel, then ``UNSUBSCRIBED``). Runs in its own
greenlet: it may wait on the directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent

from .directory import Directory, DirectoryUnavailable, Identity
from .eventlog import event
from .signouts import SignoutsUnavailable

log = logging.getLogger("relay.revocation")


class IdentityWatcher:
    def __init__(
        self,
        directory: Directory,
        users: Callable[[], list[str]],
        apply: Callable[[str, Identity | None], object],
        *,
        recheck_interval: float,
        poll_interval: float = 1.0,
        sign_outs: Callable[[list[str]], object] | None = None,
    ):
        self.directory = directory
        self.users = users
        self.apply = apply
        self.recheck_interval = recheck_interval
        self.poll_interval = poll_interval
        self.sign_outs = sign_outs
        self.rechecks = 0
        self.applied = 0
        self.errors = 0
        self._cursor: int | None = None
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        if not self._greenlets:
            self._greenlets = [gevent.spawn(self._poll_forever), gevent.spawn(self._recheck_forever)]

    def refresh(self, user_ids: list[str]) -> None:
        """Read these users again now and apply what changed (may wait on the directory)."""
        if not user_ids:
            return
        found = self.directory.get_many(user_ids)
        for user_id, identity in found.items():
            self.apply(user_id, identity)
            self.applied += 1

    def _poll_forever(self) -> None:
        while True:
            try:
                cursor, changed = self.directory.changes_since(self._cursor)
                try:
                    if changed:
                        self.refresh(changed)
                except DirectoryUnavailable:
                    raise  # the cursor stays: these changes are read again at the next poll
                except Exception:
                    self.errors += 1  # a bug applying them: go on, or one change would stop every later one
                    log.exception("applying identity changes failed")
                self._cursor = cursor
            except DirectoryUnavailable as down:
                self.errors += 1
                log.warning("identity changes not read: %s", down)
            except Exception:
                self.errors += 1
                log.exception("polling identity changes failed")
            gevent.sleep(self.poll_interval)

    def _recheck_forever(self) -> None:
        started = time.monotonic()
        while True:
            # Every recheck_interval from the start of the last round, not after it: a round spread
            # over half the interval would otherwise stretch the period to one and a half.
            # At least a quarter of it between two rounds, even when a round takes longer than the interval.
            elapsed = time.monotonic() - started
            gevent.sleep(max(self.recheck_interval / 4, self.recheck_interval - elapsed))
            started = time.monotonic()
            users = self.users()
            size = max(1, self.directory.recheck_batch)
            batches = [users[i : i + size] for i in range(0, len(users), size)]
            # Spread the batches over half the interval: a steady trickle, never a burst.
            pause = (self.recheck_interval / 2) / max(1, len(batches))
            for batch in batches:
                self._recheck(batch)
                gevent.sleep(min(pause, 1.0))
            self.rechecks += 1
            # A line every round for each worker that has someone to re-check; an idle one stays quiet.
            level = "info" if users else "debug"
            event("identity.rechecked", level=level, users=len(users), seconds=round(time.monotonic() - started, 3))

    def _recheck(self, batch: list[str]) -> None:
        """One batch of the re-check: the directory, then the sign-outs (either may be down alone)."""
        self._guarded("identity", self.refresh, batch, DirectoryUnavailable)
        if self.sign_outs is not None:
            self._guarded("sign-out", self.sign_outs, batch, SignoutsUnavailable)

    def _guarded(
        self, what: str, check: Callable[[list[str]], object], batch: list[str], unavailable: type[Exception]
    ) -> None:
        """``check(batch)``: its store down is a warning, a bug a logged exception; neither stops the round."""
        try:
            check(batch)
        except unavailable as down:
            self.errors += 1
            log.warning("%s re-check skipped a batch: %s", what, down)
        except Exception:
            self.errors += 1
            log.exception("%s re-check failed", what)

    def status(self) -> dict:
        return {
            "recheckMs": int(self.recheck_interval * 1000),
            "rechecks": self.rechecks,
            "applied": self.applied,
            "errors": self.errors,
        }
