"""Sign-in throttling: a brute force is slowed to a crawl, a person who mistypes never notices.

Failed sign-ins are counted per account and per client address over a
sliding window (``LOGIN_WINDOW_MS``, 15 min). The first ``free`` failures cost
nothing; each failure from then on blocks further attempts for a back-off
that doubles (30 s, 1 min, 2 min, ... up to 15 min). While blocked, every
attempt is refused with 429 and ``Retry-After``, **the right password
included**: otherwise a guesser would learn which guess was right. A
success clears the account's count (not the address's). Accounts are
independent: hammering one does not lock out another, except through the
address limit, which is higher (a clinic's users share one address).

Two stores behind one small interface: :class:`MemoryThrottleStore` (one
process) and :class:`RedisThrottleStore` (shared by every worker and host).
Keys are hashed: neither store holds an email address.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - only with REDIS_URL, which checks for the package first
    pass


class ThrottleUnavailable(Exception):
    """The throttle's store cannot answer (Redis down): sign-in fails closed, with a 503."""


class ThrottleStore(Protocol):
    def record(self, key: str, now: float, window: float) -> int:
        """Count a failure for ``key`` at ``now``; how many fell within the last ``window`` seconds."""

    def blocked_until(self, key: str) -> float:
        """When ``key`` may try again (0 if it may now)."""

    def block(self, key: str, until: float) -> None: ...

    def reset(self, key: str) -> None:
        """Forget ``key``'s failures and block (a successful sign-in)."""


@dataclass(frozen=True)
class Limit:
    free: int  # failures within the window that cost nothing
    first_wait: float = 30.0  # seconds, for the first failure past ``free``; doubles with each next one
    max_wait: float = 900.0


class LoginThrottle:
    def __init__(
        self,
        store: ThrottleStore,
        *,
        window: float = 900.0,
        account: Limit = Limit(free=5),
        address: Limit = Limit(free=20),
    ):
        self.store = store
        self.window = window
        self.account = account
        self.address = address

    def wait(self, login: str, address: str | None, now: float | None = None) -> float:
        """Seconds before this account may try from this address (0: go ahead)."""
        now = time.time() if now is None else now
        until = max(self.store.blocked_until(key) for key in self._keys(login, address))
        return max(0.0, until - now)

    def failed(self, login: str, address: str | None, now: float | None = None) -> float:
        """Count a failure; returns the wait it earned (0 if none yet)."""
        now = time.time() if now is None else now
        waits = []
        for key, limit in zip(self._keys(login, address), (self.account, self.address), strict=False):
            failures = self.store.record(key, now, self.window)
            if failures >= limit.free:
                wait = min(limit.max_wait, limit.first_wait * 2 ** (failures - limit.free))
                self.store.block(key, now + wait)
                waits.append(wait)
        return max(waits, default=0.0)

    def succeeded(self, login: str) -> None:
        self.store.reset(_key("account", login))

    @staticmethod
    def _keys(login: str, address: str | None) -> list[str]:
        keys = [_key("account", login)]
        if address:
            keys.append(_key("address", address))
        return keys


def _key(kind: str, value: str) -> str:
    digest = hashlib.sha256(value.strip().lower().encode()).hexdigest()[:32]
    return f"{kind}:{digest}"


class MemoryThrottleStore:
    """Per process (one worker). Bounded: the least recently seen keys go first past ``max_keys``."""

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._blocks: dict[str, float] = {}
        self._lock = threading.Lock()

    def record(self, key: str, now: float, window: float) -> int:
        with self._lock:
            recent = [t for t in self._failures.pop(key, []) if t > now - window] + [now]
            self._failures[key] = recent[-1000:]
            while len(self._failures) > self.max_keys:
                old, _ = self._failures.popitem(last=False)
                self._blocks.pop(old, None)
            return len(recent)

    def blocked_until(self, key: str) -> float:
        return self._blocks.get(key, 0.0)

    def block(self, key: str, until: float) -> None:
        self._blocks[key] = until

    def reset(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)
            self._blocks.pop(key, None)


# KEYS: failures (a sorted set of timestamps)   ARGV: now, window start, ttl ms
_RECORD = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1] .. '-' .. redis.call('INCR', KEYS[1] .. ':n'))
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1] .. ':n', ARGV[3])
return redis.call('ZCARD', KEYS[1])
"""


class RedisThrottleStore:
    """Shared by every worker and host: a sorted set of failure times per key, and a block key."""

    def __init__(self, url: str, *, prefix: str):
        self.prefix = f"{prefix}:login:"
        self._client = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        self._record = self._client.register_script(_RECORD)

    def record(self, key: str, now: float, window: float) -> int:
        ttl = int(window * 1000) + 1000
        return int(self._call(self._record, keys=[self.prefix + key], args=[now, now - window, ttl]))

    def blocked_until(self, key: str) -> float:
        raw = self._call(self._client.get, self.prefix + key + ":block")
        return float(raw) if raw else 0.0

    def block(self, key: str, until: float) -> None:
        self._call(self._client.set, self.prefix + key + ":block", until, pxat=int(until * 1000) + 1)

    def reset(self, key: str) -> None:
        self._call(self._client.delete, self.prefix + key, self.prefix + key + ":block", self.prefix + key + ":n")

    @staticmethod
    def _call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as problem:
            raise ThrottleUnavailable(f"Redis is unreachable ({problem})") from None
