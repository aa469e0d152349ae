"""Browsers that have signed in to an account before: the device cookie the sign-in throttle trusts.

Without it, anyone who knows a person's email can keep them from signing in
for good: five wrong passwords block the account, and one more each time the
block ends keeps it blocked (OWASP, "Slow Down Online Guessing Attacks with
Device Cookies"). A browser that signed in to the account before shows a
cookie the server signed, naming that account and a random device id; the
throttle then counts its attempts against that browser alone
(:class:`relay.throttle.LoginThrottle`), so the person signs in from their
usual browser while a guesser elsewhere stays blocked.

The cookie grants nothing else: no session, no access, no password check
skipped. It holds no readable name: per account a digest of the account's
key (:func:`relay.throttle.account_key`) keyed with the secret (a plain
hash would let whoever holds the cookie test guessed emails against it), the
device id and when it was issued; at most :data:`MAX_ACCOUNTS` accounts (a
shared clinic computer), the most recent first. An entry is honoured for
:data:`MAX_AGE_S` after the sign-in that wrote it. A sign-in keeps the id
its browser already holds for the account and dates it anew: the id is the
browser's, so copies of the cookie share one limit, and signing in again
and again gives nobody more guesses. Signed with ``SECRET_KEY`` under a salt
of its own; without a secret (a development server that has not created
its secrets yet) no browser is known.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from itsdangerous import BadSignature, URLSafeSerializer

from .throttle import account_key

COOKIE = "clinic_device"
MAX_AGE_S = 90 * 86_400
MAX_ACCOUNTS = 8
CLOCK_SLACK_S = 300  # an entry written by a host whose clock runs a little ahead is in date
_SALT = "relay.device-cookie"


class KnownDevices:
    """Reads and writes the device cookie (signed with ``secret``); holds nothing itself."""

    def __init__(self, secret: str | None, *, max_age_s: float = MAX_AGE_S):
        self._serializer = URLSafeSerializer(secret, salt=_SALT) if secret else None
        self._digest_key = hashlib.sha256(f"{_SALT}:{secret}".encode()).digest() if secret else b""
        self.max_age_s = max_age_s

    def device_of(self, cookie: str | None, login: str, now: float | None = None) -> str | None:
        """The device id ``cookie`` holds for this account, if it is ours, unaltered and not too old."""
        now = time.time() if now is None else now
        account = self._digest(login)
        return next((device for digest, device, _ in self._entries(cookie, now) if digest == account), None)

    def remember(self, cookie: str | None, login: str, now: float | None = None) -> str:
        """The cookie to set after a sign-in to this account: its entry first, dated now (with the id it
        had, or a new one), the others kept."""
        if self._serializer is None:
            raise RuntimeError("device cookies need SECRET_KEY")
        now = time.time() if now is None else now
        account = self._digest(login)
        entries = self._entries(cookie, now)
        device = next((entry[1] for entry in entries if entry[0] == account), None) or secrets.token_urlsafe(12)
        others = [entry for entry in entries if entry[0] != account]
        return self._serializer.dumps([[account, device, int(now)], *others][:MAX_ACCOUNTS])

    def _digest(self, login: str) -> str:
        return hmac.new(self._digest_key, account_key(login).encode(), hashlib.sha256).hexdigest()[:32]

    def _entries(self, cookie: str | None, now: float) -> list[list]:
        """The cookie's well-formed entries still in date; anything else (not ours, altered, from an
        older format) reads as none."""
        if not cookie or self._serializer is None or len(cookie) > 4096:
            return []
        try:
            entries = self._serializer.loads(cookie)
        except BadSignature:
            return []
        if not isinstance(entries, list):
            return []
        return [
            entry
            for entry in entries[:MAX_ACCOUNTS]
            if isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and now - self.max_age_s < entry[2] <= now + CLOCK_SLACK_S
        ]
