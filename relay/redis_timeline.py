"""Timelines shared through Redis, so that any worker's ``/health?history=1`` is the cluster's.

Each worker writes its last hour (60 small buckets, a few KB of JSON) to
``{prefix}:timeline:{worker}`` every few seconds, and names itself in the
sorted set ``{prefix}:timelines`` (scored by when it last wrote). A worker
that is gone keeps its key for an hour, so a deploy does not erase the
minutes before it; then the key expires and the set forgets it.
"""

from __future__ import annotations

import json
import time

import redis

from .timeline import MINUTES, Timeline

KEEP_S = MINUTES * 60 + 60


class RedisShare:
    def __init__(self, url: str, timeline: Timeline, *, worker_id: str, prefix: str = "relay", timeout: float = 1.0):
        self.timeline = timeline
        self.worker_id = worker_id
        self.index = f"{prefix}:timelines"
        self.prefix = prefix
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def _key(self, worker_id: str) -> str:
        return f"{self.prefix}:timeline:{worker_id}"

    def publish(self, worker_id: str, snapshot: list[dict]) -> None:
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key(worker_id), json.dumps(snapshot, separators=(",", ":")), ex=KEEP_S)
        pipe.zadd(self.index, {worker_id: now})
        pipe.zremrangebyscore(self.index, "-inf", now - KEEP_S)
        pipe.execute()

    def collect(self) -> list[list[dict]]:
        """Every worker's last hour; this worker's own from memory (fresher than what it wrote)."""
        others = [
            w.decode() if isinstance(w, bytes) else str(w)
            for w in self._client.zrangebyscore(self.index, time.time() - KEEP_S, "+inf")
        ]
        others = [w for w in others if w != self.worker_id]
        found = [self.timeline.snapshot()]
        if others:
            for raw in self._client.mget([self._key(w) for w in others]):
                if raw:
                    try:
                        found.append(json.loads(raw))
                    except ValueError:
                        continue
        return found
