"""What the stores kept in Redis share (the history, the sign-in throttle, the sign-outs).

One client that fails fast: 2 s timeouts and no hidden retries, so that an
outage surfaces as the store's own "unavailable" (a 503, a refused resume)
at once, not as a slow request; and every Redis error turned into that
"unavailable", never a stray ``redis`` exception (a 500). The broker keeps
clients of its own: it reports an outage as a state, it does not raise one.

Importing this module needs no ``redis`` package (an optional extra): only
constructing a store does, and only with ``REDIS_URL``, which the settings
check for first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - only with REDIS_URL, which checks for the package first
    pass


class RedisStore:
    """A store's Redis client (``self._client``) and ``_call``; a subclass names its ``unavailable``."""

    unavailable: Callable[[str], Exception] = RuntimeError

    def __init__(self, url: str):
        self._client = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a Redis error raised as ``self.unavailable("Redis is unreachable (...)")``."""
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as problem:
            raise self.unavailable(f"Redis is unreachable ({problem})") from None

    def close(self) -> None:
        self._client.close()
