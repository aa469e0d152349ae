"""RedisHistory: the delivery guarantee's memory in Redis, shared by every worker and host.

Keys (all under ``{prefix}:``):

- ``stream:meta``: a hash, ``epoch`` and ``head`` (the last offset);
- ``stream``: a Redis Stream, one entry per broadcast, ID ``<offset>-0``,
  fields ``at`` and ``e`` (the envelope); trimmed to the window by time, and
  to ``max_entries`` whatever the rate;
- ``values:<channel>``: a hash, per audience (``Filter.audience``, "" for
  every subscriber) ``<epoch> <offset> <at> <envelope>`` of the latest
  broadcast to that channel for it, the ``LAST_AUDIENCES`` most recent
  audiences, expiring after the last-value TTL. A value of another epoch is
  not offered: after a ``start_over`` it may be older than what clients were
  shown (Redis back from a snapshot), and after the meta hash was lost its
  offset no longer orders it. ``last:<channel>``: ``<offset> <at> <envelope>``
  of the latest broadcast to the channel, whatever its audience, as releases
  before kept it: still written, for their workers during a rolling deploy or
  after a rollback, and read for what they wrote, unless it is from before the
  epoch began (the meta hash's ``began``, by Redis's clock, against the
  broadcast's ``at``: such a key has no epoch of its own);
- ``idem:<key>``: the first request's place (and, once known, its answer),
  expiring after the window;
- ``session:<client id>``: ``{"user", "channels"}`` (and ``"open": true``
  while its socket is open), expiring the window after the client left.

An append is one Lua script, so the offset is assigned, the entry written,
the last values and the idempotency key set atomically: a broadcast answered
200 is in the stream even if its worker dies the next instant. When the meta
hash is gone (Redis flushed, restarted without persistence), the script
starts a new epoch, and every offset of the old one is refused on resume.
When Redis comes back with an older copy (a snapshot, a replica that
lagged), the workers notice that the stream went back and ``start_over``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from . import jsonsafe
from .envelope import Envelope
from .history import (
    LAST_AUDIENCES,
    Appended,
    HistoryUnavailable,
    Idempotency,
    IdempotencyConflict,
    Previous,
    Session,
)
from .redis_store import RedisStore

# Every script that needs the time takes Redis's (one clock for every host: see trim), as ``now`` in ms.
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# KEYS: meta, stream, idem ('' for none)   ARGV: new_epoch, at, envelope, maxlen, values_prefix, last_ttl_ms,
#       idem_ttl_ms, digest, envelope_id, audience, audiences kept, last_prefix, channel...
_APPEND = (
    _NOW
    + """
local meta, stream, idem = KEYS[1], KEYS[2], KEYS[3]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'head', 0, 'began', now)
end
if idem ~= '' then
  local previous = redis.call('GET', idem)
  if previous then return {'previous', epoch, previous} end
end
local offset = redis.call('HINCRBY', meta, 'head', 1)
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[4], offset .. '-0', 'at', now, 'e', ARGV[3])
for i = 13, #ARGV do
  local values = ARGV[5] .. ARGV[i]
  redis.call('HSET', values, ARGV[10], epoch .. ' ' .. offset .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
  redis.call('PEXPIRE', values, ARGV[6])
  if redis.call('HLEN', values) > tonumber(ARGV[11]) then
    -- Over the cap: drop every value of another epoch (never offered again), else the audience
    -- broadcast to longest ago.
    local all, oldest, oldest_offset, dropped = redis.call('HGETALL', values), nil, nil, 0
    for j = 1, #all, 2 do
      local of, kept = string.match(all[j + 1], '^(%S+) (%d+)')
      if of ~= epoch then
        redis.call('HDEL', values, all[j])
        dropped = dropped + 1
      elseif oldest_offset == nil or tonumber(kept) < oldest_offset then
        oldest, oldest_offset = all[j], tonumber(kept)
      end
    end
    if dropped == 0 then redis.call('HDEL', values, oldest) end
  end
  -- The value as releases before keep it (one per channel), for workers of the release before
  -- that share this Redis during a rolling deploy or after a rollback.
  redis.call('SET', ARGV[12] .. ARGV[i], offset .. ' ' .. ARGV[2] .. ' ' .. ARGV[3], 'PX', ARGV[6])
end
if idem ~= '' then
  redis.call('SET', idem, '{"digest":"' .. ARGV[8] .. '","id":"' .. ARGV[9] .. '","offset":' .. offset .. '}',
             'PX', ARGV[7])
end
return {'appended', epoch, tostring(offset)}
"""
)

# KEYS: meta, stream   ARGV: new_epoch. The stream's epoch, claimed if there is none; a stream without
# one (its meta hash lost: evicted, deleted) is dropped, or its entries would pass as the new epoch's.
_CLAIM = (
    _NOW
    + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'head', 0, 'began', now)
end
return {epoch, redis.call('HGET', KEYS[1], 'head')}
"""
)

# KEYS: meta, stream   ARGV: old_epoch, new_epoch. Start over if the stream is still old_epoch (or has
# no epoch at all). Offsets go on from the head, as in SQLite: last values and idempotency keys, left
# to expire, keep offsets that no broadcast of the new epoch will take.
_START_OVER = (
    _NOW
    + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch == ARGV[1] or not epoch then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  redis.call('HSETNX', KEYS[1], 'head', 0)
  redis.call('HSET', KEYS[1], 'began', now)
end
return {redis.call('HGET', KEYS[1], 'epoch'), redis.call('HGET', KEYS[1], 'head')}
"""
)

# KEYS: stream   ARGV: window_ms, count. Drop the leading entries older than the window by Redis's clock,
# up to count of them; returns how many. Only a leading run, never a hole: an entry is kept while one
# before it is.
_TRIM = (
    _NOW
    + """
local cutoff = now - tonumber(ARGV[1])
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[2])
local expired = 0
for _, entry in ipairs(entries) do
  local fields, at = entry[2], nil
  for i = 1, #fields, 2 do
    if fields[i] == 'at' then at = tonumber(fields[i + 1]) end
  end
  if at == nil or at >= cutoff then break end
  expired = expired + 1
end
if expired == 0 then return 0 end
local last = tonumber(string.match(entries[expired][1], '^%d+'))
redis.call('XTRIM', KEYS[1], 'MINID', (last + 1) .. '-0')
return expired
"""
)

# KEYS: idem   ARGV: digest, answer json, ttl_ms
_COMPLETE = """
local previous = redis.call('GET', KEYS[1])
if not previous then return 0 end
local record = cjson.decode(previous)
if record['digest'] ~= ARGV[1] then return 0 end
record['answer'] = cjson.decode(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(record), 'KEEPTTL')
return 1
"""


class RedisHistory(RedisStore):
    """History in Redis (see the module docstring). Every call is one or a few round trips."""

    name = "redis"
    unavailable = HistoryUnavailable

    def __init__(self, url: str, *, prefix: str, window_ms: int, last_value_ttl_ms: int, max_entries: int = 200_000):
        self.window_ms = window_ms
        self.last_value_ttl_ms = last_value_ttl_ms
        self.max_entries = max_entries
        self.meta = f"{prefix}:stream:meta"
        self.stream = f"{prefix}:stream"
        self.values_prefix = f"{prefix}:values:"
        self.last_prefix = f"{prefix}:last:"  # as releases before kept them (see the module docstring)
        self.idem_prefix = f"{prefix}:idem:"
        self.session_prefix = f"{prefix}:session:"
        super().__init__(url)
        self._append = self._client.register_script(_APPEND)
        self._complete = self._client.register_script(_COMPLETE)
        self._claim = self._client.register_script(_CLAIM)
        self._start_over = self._client.register_script(_START_OVER)
        self._trim = self._client.register_script(_TRIM)

    # -- the stream ---------------------------------------------------------------------

    def head(self) -> tuple[str, int]:
        epoch, head = self._call(self._client.hmget, self.meta, "epoch", "head")
        if epoch is None:
            # Nothing appended yet in this Redis: claim the epoch now so that CONNECTED can name it.
            epoch, head = self._call(self._claim, keys=[self.meta, self.stream], args=[secrets.token_hex(8)])
        return epoch.decode(), int(head or 0)

    def start_over(self, epoch: str) -> tuple[str, int]:
        keys, args = [self.meta, self.stream], [epoch, secrets.token_hex(8)]
        new_epoch, head = self._call(self._start_over, keys=keys, args=args)
        return new_epoch.decode(), int(head or 0)

    def append(self, envelope: Envelope, *, idempotency: Idempotency | None = None) -> Appended | Previous:
        stored = jsonsafe.compact(envelope.to_json())
        keys = [self.meta, self.stream, self.idem_prefix + idempotency.key if idempotency else ""]
        args = [
            secrets.token_hex(8),
            envelope.at,
            stored,
            self.max_entries,
            self.values_prefix,
            self.last_value_ttl_ms,
            self.window_ms,
            idempotency.digest if idempotency else "",
            envelope.id,
            envelope.filter.audience,
            LAST_AUDIENCES,
            self.last_prefix,
            *sorted(envelope.filter.channels),
        ]
        kind, epoch, value = self._call(self._append, keys=keys, args=args)
        if kind == b"previous":
            assert idempotency is not None
            return self._previous_of(epoch.decode(), value, idempotency)
        return Appended(epoch.decode(), int(value))

    def complete(self, idempotency: Idempotency, answer: dict) -> None:
        self._call(
            self._complete, keys=[self.idem_prefix + idempotency.key], args=[idempotency.digest, json.dumps(answer)]
        )

    def previous(self, idempotency: Idempotency) -> Previous | None:
        epoch, (raw,) = self._with_epoch(lambda pipe: pipe.get(self.idem_prefix + idempotency.key))
        if raw is None:
            return None
        return self._previous_of(epoch, raw, idempotency)

    def read(self, after: int, limit: int) -> list[Envelope]:
        epoch, (entries,) = self._with_epoch(lambda pipe: pipe.xrange(self.stream, f"{after + 1}-0", "+", count=limit))
        return [
            Envelope.from_json(json.loads(fields[b"e"]), offset=int(entry_id.split(b"-")[0]), epoch=epoch)
            for entry_id, fields in entries
        ]

    def _with_epoch(self, command: Callable[[Any], object]) -> tuple[str, list[Any]]:
        """The stream's epoch and the answers to the commands ``command(pipeline)`` queued, read in one
        transaction (MULTI/EXEC): with two round trips a store that started over between them would
        label the new stream's entries with the old stream's epoch, and a resume would replay them as
        what it missed."""
        for _ in range(2):
            pipe = self._client.pipeline(transaction=True)
            pipe.hget(self.meta, "epoch")
            command(pipe)
            epoch, *answers = self._call(pipe.execute)
            if epoch is not None:
                return epoch.decode(), answers
            # Nothing appended yet in this Redis, or its meta hash was lost (evicted, deleted): claim an
            # epoch (head() does; that drops a stream without one) and read again, as what was just read
            # belonged to no epoch and must not pass for the new one's.
            self.head()
        raise HistoryUnavailable("the history's epoch keeps vanishing from Redis (evicted? see README)")

    def oldest(self) -> int | None:
        first = self._call(self._client.xrange, self.stream, "-", "+", count=1)
        return int(first[0][0].split(b"-")[0]) if first else None

    def last_values(self, channels: list[str], max_age_ms: int) -> dict[str, list[Envelope]]:
        if not channels:
            return {}

        def reads(pipe: Any) -> None:
            pipe.hget(self.meta, "began")
            for channel in channels:
                pipe.hvals(self.values_prefix + channel)
            pipe.mget([self.last_prefix + channel for channel in channels])

        epoch, (began, *per_channel, legacy) = self._with_epoch(reads)
        began = int(began or 0)  # a Redis whose epoch was claimed by a release before: no such field
        oldest = int(time.time() * 1000) - max_age_ms
        found: dict[str, list[Envelope]] = {}
        for channel, values, before in zip(channels, per_channel, legacy, strict=True):
            kept = [value.split(b" ", 3) for value in values]
            fields = [(offset, at, text) for of, offset, at, text in kept if of.decode() == epoch]
            if before is not None:  # see the module docstring
                offset, at, text = before.split(b" ", 2)
                if int(at) > began and offset not in {field[0] for field in fields}:
                    fields.append((offset, at, text))
            for offset, at, text in fields:
                if int(at) >= oldest:
                    envelope = Envelope.from_json(json.loads(text), offset=int(offset), epoch=epoch)
                    found.setdefault(channel, []).append(envelope)
        for values in found.values():
            values.sort(key=lambda envelope: envelope.offset or 0, reverse=True)
        return found

    # -- sessions -------------------------------------------------------------------------

    def save_sessions(self, sessions: list[Session], expires_at_ms: int) -> None:
        if not sessions:
            return
        pipe = self._client.pipeline(transaction=False)
        for session in sessions:
            doc: dict = {"user": session.user_id, "channels": list(session.channels)}
            if session.open:
                doc["open"] = True
            pipe.set(self.session_prefix + session.client_id, json.dumps(doc), px=_ms_until(expires_at_ms))
        self._call(pipe.execute)

    def touch_sessions(self, client_ids: list[str], expires_at_ms: int) -> None:
        if not client_ids:
            return
        pipe = self._client.pipeline(transaction=False)
        for client_id in client_ids:
            pipe.pexpire(self.session_prefix + client_id, _ms_until(expires_at_ms))
        self._call(pipe.execute)

    def load_session(self, client_id: str) -> Session | None:
        raw = self._call(self._client.get, self.session_prefix + client_id)
        if raw is None:
            return None
        doc = json.loads(raw)
        return Session(client_id, doc["user"], tuple(doc["channels"]), bool(doc.get("open")))

    def delete_sessions(self, client_ids: list[str]) -> None:
        if client_ids:
            self._call(self._client.delete, *(self.session_prefix + c for c in client_ids))

    # -- upkeep -----------------------------------------------------------------------------

    def trim(self, now_ms: int) -> int:
        """Drop stream entries older than the window, a few hundred at a time (keys expire on their own).

        By Redis's clock, not ``now_ms``: the entries are stamped with it (``_APPEND``), so hosts whose
        clocks disagree neither trim what is still in the window nor keep what is not."""
        dropped = 0
        for _ in range(20):  # bounded: at most 20 x 500 entries per call; the next call goes on
            expired = int(self._call(self._trim, keys=[self.stream], args=[self.window_ms, 500]))
            dropped += expired
            if expired < 500:
                break
        return dropped

    def status(self) -> dict:
        epoch, head = self.head()
        retained = self._call(self._client.xlen, self.stream)
        first = self._call(self._client.xrange, self.stream, "-", "+", count=1)
        oldest = {"offset": int(first[0][0].split(b"-")[0]), "at": int(first[0][1][b"at"])} if first else None
        return {"kind": self.name, "state": "ok", "epoch": epoch, "head": head, "retained": retained, "oldest": oldest}

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _previous_of(epoch: str, raw: bytes, idempotency: Idempotency) -> Previous:
        record = json.loads(raw)
        if record["digest"] != idempotency.digest:
            raise IdempotencyConflict("this Idempotency-Key was first used with a different broadcast")
        return Previous(epoch, int(record["offset"]), record["id"], record.get("answer"))


def _ms_until(at_ms: int) -> int:
    """Milliseconds from now to ``at_ms`` (at least 1), both by this host's clock: Redis is given the
    duration, not the moment, as its clock may disagree with ours."""
    return max(1, at_ms - int(time.time() * 1000))
