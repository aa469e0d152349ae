"""Connection tokens: the exact wire format other services already mint.

A token is ``base64(JSON {"userId", "timestamp", "signature"})`` where
``signature = hex(HMAC-SHA256(secret, f"{userId}:{timestamp}"))`` and
``timestamp`` is milliseconds since the epoch. Both base64 alphabets are
accepted, padded or not, because the original server's callers were not
consistent about it.

Verification checks size and shape before it computes anything, the
signature (in constant time) before it trusts any claim, and freshness last.
Every rejection carries its own reason so the logs say *why* a browser was
sent away, without ever containing the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import NamedTuple

from .clock import now_ms
from .jsonsafe import encodable

MAX_TOKEN_CHARS = 2048
MAX_FUTURE_MS = 30_000
MAX_USER_ID_CHARS = 256


class TokenError(Exception):
    """A token was refused. ``reason`` is a stable, loggable word."""

    def __init__(self, reason: str, detail: str, user_id: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.user_id = user_id  # set only once the signature has been verified


class Claims(NamedTuple):
    """What a verified token says: whose it is, and when it was minted (ms since the epoch)."""

    user_id: str
    issued_ms: int


class TokenService:
    """Mints with ``secret``; verifies with ``secret`` or, during a key rotation, ``previous``.

    To rotate: move the old secret to WS_TOKEN_SECRET_PREVIOUS and set a new
    WS_TOKEN_SECRET; tokens already handed out stay valid until they expire
    (one WS_TOKEN_TTL_MS), new ones are signed with the new key; then drop
    the previous one.
    """

    def __init__(self, secret: str, ttl_ms: int, previous: str | None = None):
        if not secret:
            raise ValueError("a token secret is required")
        keys = (secret,) if not previous else (secret, previous)
        # Each key's HMAC state, keyed once: a signature copies it (OpenSSL sets a key up
        # in about half the time of the whole HMAC, and every connect verifies a token).
        self._macs = tuple(hmac.new(key.encode(), digestmod=hashlib.sha256) for key in keys)
        self.ttl_ms = ttl_ms

    def sign(self, user_id: str, timestamp: int) -> str:
        """The signature of ``user_id`` at ``timestamp`` with the current secret."""
        return _signature(self._macs[0], user_id, timestamp)

    def mint(self, user_id: str, timestamp: int | None = None) -> str:
        """A token for ``user_id``, as ``/api/ws/auth`` hands it to browsers."""
        ts = now_ms() if timestamp is None else timestamp
        payload = {"userId": user_id, "timestamp": ts, "signature": self.sign(user_id, ts)}
        return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()

    def verify(self, token: str | None, now: int | None = None) -> str:
        """Return the token's user id, or raise :class:`TokenError`."""
        return self.claims(token, now).user_id

    def claims(self, token: str | None, now: int | None = None) -> Claims:
        """Return the token's user id and minting time, or raise :class:`TokenError`."""
        if not token:
            raise TokenError("missing", "no token was given")
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenError("too_long", f"the token is longer than {MAX_TOKEN_CHARS} characters")
        raw = _b64decode(token)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise TokenError("not_json", "the token does not decode to JSON") from None
        if not isinstance(payload, dict):
            raise TokenError("not_object", "the token's JSON is not an object")

        user_id = payload.get("userId")
        timestamp = payload.get("timestamp")
        signature = payload.get("signature")
        for name, value in (("userId", user_id), ("timestamp", timestamp), ("signature", signature)):
            if value is None:
                raise TokenError("missing_field", f"the token has no {name}")
        if not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_ID_CHARS:
            raise TokenError("bad_field", "userId must be a non-empty string")
        if not encodable(user_id):  # "\ud800" parses, but cannot be encoded to be signed (one per connect)
            raise TokenError("bad_field", "userId is not valid Unicode")
        # bool is an int in Python; JSON true is not a timestamp.
        if not isinstance(timestamp, int) or isinstance(timestamp, bool):
            raise TokenError("bad_field", "timestamp must be an integer (ms since the epoch)")
        if not isinstance(signature, str):
            raise TokenError("bad_field", "signature must be a hex string")

        # Encode before comparing: compare_digest refuses non-ASCII str. Every key is tried (no early exit),
        # so the time taken does not say which one matched.
        given = signature.encode("utf-8", "replace")
        matches = [hmac.compare_digest(given, _signature(mac, user_id, timestamp).encode()) for mac in self._macs]
        if not any(matches):
            raise TokenError("bad_signature", "the token's signature does not match")

        current = now_ms() if now is None else now
        age = current - timestamp
        if age > self.ttl_ms:
            raise TokenError("expired", f"the token expired {age - self.ttl_ms} ms ago", user_id)
        if -age > MAX_FUTURE_MS:
            raise TokenError("future", f"the token is dated {-age} ms in the future", user_id)
        return Claims(user_id, timestamp)


def _signature(keyed: hmac.HMAC, user_id: str, timestamp: int) -> str:
    mac = keyed.copy()  # the keyed state itself is never updated
    mac.update(f"{user_id}:{timestamp}".encode())
    return mac.hexdigest()


def _b64decode(token: str) -> bytes:
    # A '+' in an unencoded query string arrives as a space.
    text = token.strip().replace(" ", "+").replace("-", "+").replace("_", "/").rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TokenError("not_base64", "the token is not base64") from None
