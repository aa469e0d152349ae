"""RedisBroker: every broadcast reaches every worker on every host through Redis.

How one broadcast travels (the same on one host or ten):

1. The worker that took ``POST /broadcast`` PUBLISHes the envelope once on
   ``{prefix}:broadcast``, tagged with its worker id. Redis answers with the
   number of subscribers that received it: exactly the number of live workers.
   If that fails, nothing was delivered anywhere and the caller gets a 503.
2. The sender then delivers to its own clients at once, through its hub. Every
   other worker's listener greenlet hands the envelope to its own hub (the same
   ``deliver`` path) and PUBLISHes its count on the sender's reply channel; a
   listener ignores what its own worker sent.
3. The sender waits (bounded by ``reply_timeout``) for as many replies as there
   were other receivers and answers ``delivered`` = its own count plus theirs,
   with ``workers`` that reported and ``missing`` ones that did not.

Each worker also writes its hub statistics to ``{prefix}:worker:{id}`` every
heartbeat, with an expiry, and its id to the set ``{prefix}:workers``, so any
worker can answer ``/health`` for the whole cluster in three round trips
(never a scan of the keyspace, which holds a session per client). Workers
that Redis no longer sees connected are left out at once; an id whose record
has expired is taken out of the set by the next reader.

Pub/sub is at-most-once: what is published while a worker's listener is
reconnecting does not reach that worker's listener (the sender reports it as
``missing``). With recovery on (the default), every broadcast is in the history
before it is published, and each worker's sequencer fills what its listener
missed from there, in order (``relay.sequencer``): the worker's clients still
get it, a little late. Only with recovery off is that gap a loss.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import NoReturn

import gevent
from gevent.event import Event

from .broker import BrokerUnavailable, Control, Deliver, Delivery, Pending, Resync, Stats
from .config import ConfigError, redacted, url_hint
from .envelope import Envelope
from .eventlog import event

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.client import PubSub
    from redis.retry import Retry

    HAVE_REDIS = True
except ImportError:  # pragma: no cover - exercised only without the extra installed
    HAVE_REDIS = False

log = logging.getLogger("relay.redis")


def _require_redis() -> None:
    if not HAVE_REDIS:
        raise ConfigError("REDIS_URL is set but the redis package is missing: pip install '.[redis]'")


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """PING Redis once; raise ConfigError naming REDIS_URL if that fails (start-up check)."""
    _require_redis()
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )
        client.ping()
        client.close()
    except ValueError:
        # Not its message: redis-py quotes the part it could not read, which may be the password's start.
        raise ConfigError(f"REDIS_URL={redacted(url)} is not a URL redis-py can read: {url_hint(url)}") from None
    except (redis.RedisError, OSError) as problem:
        raise ConfigError(f"Redis at REDIS_URL={redacted(url)} is unreachable: {problem}") from None


def _not_started(envelope: Envelope) -> NoReturn:
    raise BrokerUnavailable("the broker has not been started")


class _Waiter:
    """Collects the per-worker counts of one broadcast."""

    __slots__ = ("expected", "total", "replies", "done")

    def __init__(self) -> None:
        self.expected: int | None = None
        self.total = 0
        self.replies = 0
        self.done = Event()

    def add(self, delivered: int) -> None:
        self.total += delivered
        self.replies += 1
        self._check()

    def expect(self, count: int) -> None:
        self.expected = count
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.replies >= self.expected:
            self.done.set()


class RedisBroker:
    """Delivers through Redis pub/sub; reports exact cluster-wide counts. See the module docstring."""

    name = "redis"

    def __init__(
        self, url: str, *, worker_id: str, prefix: str = "relay", heartbeat: float = 1.0, reply_timeout: float = 1.0
    ):
        _require_redis()
        self.url = url
        self.worker_id = worker_id
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.reply_timeout = reply_timeout
        self.channel = f"{prefix}:broadcast"
        self.control_channel = f"{prefix}:control"
        self.reply_channel = f"{prefix}:reply:{worker_id}"
        self.stats_key = self._record_key(worker_id)
        self.workers_key = f"{prefix}:workers"
        self.client_name = f"{prefix}-worker:{worker_id}"
        # No hidden retries: an outage must surface at once as a 503, not as a slow request.
        options = dict(socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis.from_url(url, socket_timeout=2.0, **options)
        self._subscriber = redis.Redis.from_url(url, socket_timeout=None, client_name=self.client_name, **options)
        self._deliver: Deliver = _not_started
        self._stats: Stats = dict
        self._resync: Resync | None = None
        self._control: Control | None = None
        self._elsewhere: dict[str, int] = {}  # user -> connections on the other workers, as of the last beat
        self._waiters: dict[str, _Waiter] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self._stopped = False
        self._listening = False
        self._heartbeat_ok = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._receivers: int | None = None  # how many listeners Redis counted at the last publish

    # -- the Broker interface ---------------------------------------------------------

    def start(
        self, deliver: Deliver, stats: Stats, resync: Resync | None = None, control: Control | None = None
    ) -> None:
        self._deliver, self._stats, self._resync, self._control = deliver, stats, resync, control
        self._greenlets = [gevent.spawn(self._listen), gevent.spawn(self._beat)]

    def publish(self, envelope: Envelope) -> Delivery:
        payload = json.dumps(
            {"envelope": envelope.to_json(), "replyTo": self.reply_channel, "from": self.worker_id},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        waiter = self._waiters[envelope.id] = _Waiter()
        try:
            listening = self._listening  # is our own listener among the receivers Redis will count?
            try:
                receivers = self._client.publish(self.channel, payload)
            except (redis.RedisError, OSError) as problem:
                self._failed(problem)
                if envelope.offset is None:
                    raise BrokerUnavailable(f"Redis is unreachable ({problem})") from None
                return self._stored_not_published(envelope, listening, problem)
            self._receivers = receivers
            pending = self._deliver(envelope)
            others = max(0, receivers - (1 if listening else 0))
            waiter.expect(others)
            if others:
                waiter.done.wait(self.reply_timeout)
            try:  # usually done already; else it waits (bounded) for the broadcasts before it to arrive
                local = pending.get(timeout=self.reply_timeout)
            except gevent.Timeout:
                local = 0
            return Delivery(delivered=local + waiter.total, workers=1 + waiter.replies, missing=others - waiter.replies)
        finally:
            del self._waiters[envelope.id]

    def _stored_not_published(self, envelope: Envelope, listening: bool, problem: Exception) -> Delivery:
        """The history took the broadcast (it is appended first) but PUBLISH failed: a 503 would make the
        caller send it again under a new id, and it is in the stream already. Deliver it here; the other
        workers read it from the history (their next gap fill, or ``Realtime._follow_forever``), and
        count as missing: those listening at the last publish (one if there was none yet)."""
        log.warning("broadcast %s stored at offset %s but not published: %s", envelope.id, envelope.offset, problem)
        try:
            local = self._deliver(envelope).get(timeout=self.reply_timeout)
        except gevent.Timeout:
            local = 0
        others = 1 if self._receivers is None else max(0, self._receivers - (1 if listening else 0))
        return Delivery(delivered=local, workers=1, missing=others)

    def control(self, message: dict) -> Delivery:
        """Run ``message`` on every worker (this one included); the total of what each handler returned."""
        message_id = uuid.uuid4().hex
        waiter = self._waiters[message_id] = _Waiter()
        try:
            listening = self._listening
            receivers, local = self._run_everywhere(message, id=message_id, replyTo=self.reply_channel)
            # Redis counts only the listeners subscribed at this instant: a worker whose listener is
            # reconnecting is not among them, and would never run this (control messages are not
            # kept). Its heartbeat record still says it is alive: count it as missing, so that the
            # caller is told to try again instead of "done".
            others = max(receivers - (1 if listening else 0), self._other_records(), 0)
            waiter.expect(others)
            if others:
                waiter.done.wait(self.reply_timeout)
            return Delivery(delivered=local + waiter.total, workers=1 + waiter.replies, missing=others - waiter.replies)
        finally:
            del self._waiters[message_id]

    def notify(self, message: dict) -> None:
        """Run ``message`` on every worker (this one included), waiting for none: no id, no ``replyTo``."""
        self._run_everywhere(message)

    def _run_everywhere(self, message: dict, **reply: str) -> tuple[int, int]:
        """Publish a control message (with ``reply``'s ``id`` and ``replyTo`` if answers are wanted), then
        run it here: how many listeners Redis handed it to, and what it returned here."""
        try:
            receivers = self._client.publish(
                self.control_channel, json.dumps({"control": message, **reply, "from": self.worker_id})
            )
        except (redis.RedisError, OSError) as problem:
            self._failed(problem)
            raise BrokerUnavailable(f"Redis is unreachable ({problem})") from None
        return receivers, self._control(message) if self._control is not None else 0

    def connections_elsewhere(self, user_id: str) -> int:
        """This user's connections on the other workers, as their last heartbeats said (best effort)."""
        return self._elsewhere.get(user_id, 0)

    def status(self) -> dict:
        return {
            "kind": self.name,
            "state": self.state,
            "url": redacted(self.url),
            "worker": self.worker_id,
            "lastError": self.last_error,
            "lastErrorAt": self.last_error_at,
        }

    @property
    def state(self) -> str:
        if self._stopped:
            return "stopped"
        return "ok" if self._listening and self._heartbeat_ok else "degraded"

    def members(self) -> list[dict] | None:
        """Every live worker's last heartbeat, or None when Redis cannot say."""
        try:
            ids, values = self._records()
            gone = [i for i, raw in zip(ids, values, strict=True) if raw is None]
            if gone:  # their records expired: workers that stopped without leaving (killed)
                self._client.srem(self.workers_key, *gone)
            live = self._connected_names()
        except (redis.RedisError, OSError) as problem:
            self._failed(problem)
            return None
        members = []
        for raw in values:
            try:
                member = json.loads(raw) if raw else None
            except ValueError:
                continue
            # A worker killed by the OS drops its Redis connections at once; its key would linger.
            if member and (live is None or f"{self.prefix}-worker:{member.get('worker')}" in live):
                members.append(member)
        return members

    def close(self) -> None:
        """Leave the cluster: stop listening and beating, and withdraw this worker's stats."""
        self._stopped = True
        gevent.killall(self._greenlets, block=False)
        try:
            leaving = self._client.pipeline(transaction=False)
            leaving.srem(self.workers_key, self.worker_id)
            leaving.delete(self.stats_key)
            leaving.execute()
        except (redis.RedisError, OSError):
            pass

    # -- background greenlets --------------------------------------------------------------

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stopped:
            pubsub = self._subscriber.pubsub()
            try:
                pubsub.subscribe(self.channel, self.reply_channel, self.control_channel)
                self._await_subscribed(pubsub)
                if not self._listening:
                    event("redis.listening", channel=self.channel, worker=self.worker_id)
                    if self._resync is not None:
                        gevent.spawn(self._resync)  # what was published while we were away
                self._listening, backoff = True, 0.1
                self._pump(pubsub)
            except (redis.RedisError, OSError) as problem:
                if self._listening:
                    event("redis.listener_lost", level="error", error=str(problem), worker=self.worker_id)
                self._listening = False
                self._failed(problem)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # the connection may already be gone
                    pass

    def _await_subscribed(self, pubsub: PubSub) -> None:
        confirmed = 0
        deadline = time.monotonic() + 5
        while confirmed < 3:
            if time.monotonic() > deadline:
                raise redis.TimeoutError("no subscribe confirmation from Redis")
            message = pubsub.get_message(timeout=1.0)
            if message and message["type"] == "subscribe":
                confirmed += 1

    def _pump(self, pubsub: PubSub) -> None:
        quiet_since = time.monotonic()
        ping_sent = None
        while not self._stopped:
            message = pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is None:
                # A silent socket may be a dead one: ask, and give up if nothing answers.
                if ping_sent is not None and now - ping_sent > 5:
                    raise redis.TimeoutError("Redis did not answer PING within 5 s")
                if ping_sent is None and now - quiet_since > 5:
                    pubsub.ping()
                    ping_sent = now
                continue
            quiet_since, ping_sent = now, None
            if message["type"] == "message":
                try:
                    self._on_message(message["channel"], message["data"])
                except Exception:  # a bug with one message must not silence the listener (and /health with it)
                    log.exception("handling a message from %s failed", message["channel"])

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            doc = json.loads(data)
            if channel.decode() == self.reply_channel:
                waiter = self._waiters.get(doc["id"])
                if waiter is not None:
                    waiter.add(int(doc["delivered"]))
                return
            if doc.get("from") == self.worker_id:
                return  # our own: the sender already handled it here
            if "control" in doc:
                if self._control is not None:
                    done = self._control(doc["control"])
                    if "replyTo" in doc:  # not from notify(), whose sender waits for nobody
                        self._reply(doc["replyTo"], doc["id"], done)
                return
            reply_to = doc["replyTo"]
            envelope = Envelope.from_json(doc["envelope"])
        except (ValueError, KeyError, TypeError, AttributeError) as problem:
            log.warning("ignored a malformed message on %s: %s", channel, problem)
            return
        pending = self._deliver(envelope)
        if pending.ready():
            self._reply(reply_to, envelope.id, pending.get())
        else:  # waiting for the broadcasts before it: answer when it is out, without holding up the listener
            gevent.spawn(self._reply_when_delivered, reply_to, envelope.id, pending)

    def _reply_when_delivered(self, reply_to: str, envelope_id: str, pending: Pending) -> None:
        try:
            delivered = pending.get(timeout=self.reply_timeout)
        except gevent.Timeout:
            return  # the sender has stopped waiting: it counts this worker as missing
        self._reply(reply_to, envelope_id, delivered)

    def _reply(self, reply_to: str, envelope_id: str, delivered: int) -> None:
        doc = json.dumps({"id": envelope_id, "worker": self.worker_id, "delivered": delivered})
        try:
            self._client.publish(reply_to, doc)
        except (redis.RedisError, OSError) as problem:
            self._failed(problem)  # the sender will count this worker as missing

    def _beat(self) -> None:
        host = socket.gethostname()
        ttl_ms = int(self.heartbeat * 2500)
        while not self._stopped:
            record = {
                **self._stats(),
                "worker": self.worker_id,
                "host": host,
                "pid": os.getpid(),
                "at": int(time.time() * 1000),
            }
            try:
                beat = self._client.pipeline(transaction=False)  # one round trip
                beat.set(self.stats_key, json.dumps(record), px=ttl_ms)
                beat.sadd(self.workers_key, self.worker_id)
                beat.execute()
                self._heartbeat_ok = True
            except (redis.RedisError, OSError) as problem:
                self._heartbeat_ok = False
                self._failed(problem)
            self._count_elsewhere()
            gevent.sleep(self.heartbeat)

    def _count_elsewhere(self) -> None:
        """Sum the other workers' busy users (for WS_MAX_CONNECTIONS_PER_USER across the cluster)."""
        members = self.members()
        if members is None:
            return  # keep the last view rather than forget it during a blip
        elsewhere: dict[str, int] = {}
        for member in members:
            if member.get("worker") == self.worker_id:
                continue
            for user, count in (member.get("busyUsers") or {}).items():
                elsewhere[user] = elsewhere.get(user, 0) + int(count)
        self._elsewhere = elsewhere

    # -- helpers --------------------------------------------------------------------------------

    def _records(self) -> tuple[list[str], list]:
        """The workers in the set, sorted, and each one's heartbeat record (None once it expired)."""
        ids = sorted(i.decode() if isinstance(i, bytes) else str(i) for i in self._client.smembers(self.workers_key))
        return ids, (self._client.mget([self._record_key(i) for i in ids]) if ids else [])

    def _other_records(self) -> int:
        """How many other workers have a heartbeat record that has not expired (0 if Redis cannot say)."""
        try:
            ids, values = self._records()
        except (redis.RedisError, OSError):
            return 0
        return sum(raw is not None for i, raw in zip(ids, values, strict=True) if i != self.worker_id)

    def _record_key(self, worker_id: str) -> str:
        """Where a worker's heartbeat record (its hub statistics) is kept."""
        return f"{self.prefix}:worker:{worker_id}"

    def _connected_names(self) -> set[str] | None:
        try:
            clients = self._client.client_list(_type="pubsub")
        except redis.ResponseError:
            return None  # CLIENT LIST is disabled on some managed Redis: fall back to key expiry
        return {str(c.get("name")) for c in clients}

    def _failed(self, problem: Exception) -> None:
        self.last_error = f"{type(problem).__name__}: {problem}"
        self.last_error_at = time.time()
