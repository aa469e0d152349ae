"""The realtime service: the core's parts wired together from :class:`Settings`.

One :class:`Realtime` per process. The Flask layer reaches it through
``current_app.extensions["realtime"]`` and calls three things on it: mint a
token, admit a socket, send a broadcast.

Building one has no side effects (no greenlet, no connection): the serving
process calls :meth:`Realtime.start` once, after gevent has patched it
(``post_worker_init`` in ``gunicorn.conf.py``). Commands never start it.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import socket
import time

from . import __version__
from .broadcast import Broadcaster, BroadcastRequest
from .broker import Broker, BrokerUnavailable, Delivery, MemoryBroker
from .codes import Close
from .config import Settings
from .connection import Connection
from .directory import Directory, DirectoryUnavailable
from .envelope import Envelope
from .eventlog import event
from .hub import Hub
from .outbox import Outbox
from .protocol import ClientProtocol, encode
from .sqlite_directory import SqliteDirectory
from .tokens import TokenError, TokenService

log = logging.getLogger("relay.service")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_SUBSCRIPTIONS = 100


class Realtime:
    def __init__(self, settings: Settings, *, directory: Directory | None = None, broker: Broker | None = None):
        self.settings = settings
        self.started_at = time.time()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # None only in a development command run before the server ever started (no secret yet).
        self.tokens = TokenService(settings.token_secret, settings.token_ttl_ms) if settings.token_secret else None
        self.directory = directory or _make_directory(settings)
        self.hub = Hub(max_clients=settings.max_clients, ping_interval=settings.ping_interval_ms / 1000)
        self.outbox = Outbox()
        self.protocol = ClientProtocol(self.hub, max_subscriptions=MAX_SUBSCRIPTIONS)
        self.broker = broker or _make_broker(settings, self.worker_id)
        self.broadcaster = Broadcaster(self.broker)
        self.started = False

    def start(self) -> None:
        """Begin serving: the broker's listener and the keep-alive greenlet. Idempotent."""
        if self.started:
            return
        self.started = True
        self.broker.start(self.hub.deliver, self.hub.stats)
        self.hub.start()

    # -- sockets ------------------------------------------------------------------

    def open_socket(self, sock, token: str | None, remote: str | None = None, pending: bytes = b"") -> Connection:
        """Admit (or refuse) a socket whose upgrade has been answered.

        Returns at once either way: an admitted connection lives on the event
        loop from here; a refused one is closed with a code the browser can
        act on (4401 new token, 4403 give up, 1012/1013 retry, 1011 our bug).
        """
        conn = Connection(
            sock,
            outbox=self.outbox,
            handler=self.protocol,
            max_message=MAX_MESSAGE_BYTES,
            max_queue=self.settings.max_queue_bytes,
            close_timeout=self.settings.close_timeout_ms / 1000,
        )
        try:
            self._admit(conn, token, remote, pending)
        except Exception:
            # The 101 is already on the wire: a bug here must still end in a close code, not a hang.
            log.exception("admitting a socket failed")
            self.hub.remove(conn)
            conn.reject(Close.INTERNAL_ERROR, "internal error")
        return conn

    def _admit(self, conn: Connection, token: str | None, remote: str | None, pending: bytes) -> None:
        if self.hub.draining:
            conn.reject(Close.SERVICE_RESTART, "service restart")
            return
        if self.tokens is None:
            raise RuntimeError("no WS_TOKEN_SECRET: this process cannot verify tokens")
        try:
            user_id = self.tokens.verify(token)
        except TokenError as refused:
            event(
                "ws.auth_failed",
                level="warning",
                reason=refused.reason,
                detail=str(refused),
                userId=refused.user_id,
                remote=remote,
            )
            self.hub.counters["auth_failures"] += 1
            conn.reject(Close.UNAUTHORIZED, f"token {refused.reason.replace('_', ' ')}")
            return
        try:
            identity = self.directory.get(user_id)
        except DirectoryUnavailable as down:
            event(
                "ws.auth_failed",
                level="error",
                reason="directory_unavailable",
                detail=str(down),
                userId=user_id,
                remote=remote,
            )
            conn.reject(Close.TRY_AGAIN_LATER, "identity service unavailable")
            return
        if identity is None or not identity.active:
            reason = "unknown_user" if identity is None else "user_disabled"
            event("ws.auth_failed", level="warning", reason=reason, userId=user_id, remote=remote)
            self.hub.counters["auth_failures"] += 1
            conn.reject(Close.FORBIDDEN, reason.replace("_", " "))
            return
        if self.hub.full:
            event("ws.refused", level="warning", reason="server_full", userId=user_id, clients=len(self.hub))
            conn.reject(Close.TRY_AGAIN_LATER, "server full")
            return

        conn.identify(identity)
        # CONNECTED is queued before the hub can see the connection: it is always the first frame.
        conn.push(encode("CONNECTED", {"clientId": conn.id, "userId": user_id}))
        self.hub.add(conn)
        conn.start(pending)
        event(
            "ws.connect",
            clientId=conn.id,
            userId=user_id,
            role=identity.role,
            clinicId=identity.clinic_id,
            remote=remote,
        )

    def broadcast(self, request: BroadcastRequest, *, source: str) -> tuple[Envelope, Delivery]:
        """Publish a validated broadcast. Raises BrokerUnavailable, also while this worker drains
        (its sockets are closing: the caller should retry, and a load balancer will pick another worker)."""
        if self.hub.draining:
            raise BrokerUnavailable("this worker is restarting; retry in a moment")
        return self.broadcaster.send(request, source=source)

    def drain(self, reason: str = "service restart") -> bool:
        """Close every socket with 1012 and refuse new ones (worker shutdown)."""
        event("drain.start", clients=len(self.hub))
        done = self.hub.drain(Close.SERVICE_RESTART, reason, self.settings.drain_timeout_ms / 1000)
        self.broker.close()  # leave the cluster view at once rather than when the heartbeat expires
        event("drain.done", complete=done, clients=len(self.hub))
        return done

    # -- health ---------------------------------------------------------------------

    def health(self) -> dict:
        """This worker's health plus the cluster's totals (every live worker, every host)."""
        local = self.hub.stats()
        me = {
            **local,
            "worker": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "at": int(time.time() * 1000),
        }
        broker = self.broker.status()
        identity = self.directory.status()
        members = self.broker.members()
        if members is None:
            members = [me]  # the cluster is unknown right now: say what we know
        else:
            # Our own figures are fresher than our last heartbeat.
            members = [m for m in members if m.get("worker") != self.worker_id] + [me]
        if self.hub.draining:
            status = "draining"
        elif broker["state"] != "ok" or identity["state"] != "ok":
            status = "degraded"
        else:
            status = "ok"
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "ok": status == "ok",
            "status": status,
            "uptime": round(time.time() - self.started_at, 3),
            "memory": {"rss": _rss_bytes(), "maxRss": usage.ru_maxrss * 1024},
            **_totals(members),
            "workers": len(members),
            "version": __version__,
            "env": self.settings.app_env,
            "pid": os.getpid(),
            "draining": self.hub.draining,
            "worker": {"id": self.worker_id, "pid": os.getpid(), **local},
            "cluster": [
                {key: m.get(key) for key in ("worker", "host", "pid", "clients", "subscriptions", "at")}
                for m in sorted(members, key=lambda m: str(m.get("worker")))
            ],
            "counters": dict(self.hub.counters),
            "outbox": self.outbox.status(),
            "broker": broker,
            "identity": identity,
        }


def _make_broker(settings: Settings, worker_id: str) -> Broker:
    if not settings.redis_url:
        return MemoryBroker(worker_id)
    from .redis_broker import RedisBroker  # needs the optional redis package

    return RedisBroker(
        settings.redis_url,
        worker_id=worker_id,
        prefix=settings.redis_prefix,
        heartbeat=settings.redis_heartbeat_ms / 1000,
        reply_timeout=settings.redis_reply_timeout_ms / 1000,
    )


def _make_directory(settings: Settings) -> Directory:
    supabase = settings.supabase
    if supabase is None:
        return SqliteDirectory(settings.db_path)
    from .supabase_directory import SupabaseDirectory  # needs the optional supabase package

    return SupabaseDirectory(
        supabase.url,
        supabase.service_key,
        timeout=supabase.timeout_ms / 1000,
        cache_ttl=supabase.cache_ttl_ms / 1000,
        cache_size=supabase.cache_size,
        profiles_table=supabase.profiles_table,
        columns=supabase.columns,
        anon_key=supabase.anon_key,
        jwt_secret=supabase.jwt_secret,
        jwt_audience=supabase.jwt_audience,
    )


def _totals(members: list[dict]) -> dict:
    """Sum the additive figures over workers. ``channels`` and ``users`` are per-worker
    counts summed: a channel or user present on two workers counts twice."""
    counts = dict.fromkeys(("clients", "channels", "subscriptions", "users"), 0)
    groups: dict[str, dict[str, int]] = {"byRole": {}, "byClinic": {}}
    for member in members:
        for key in counts:
            counts[key] += int(member.get(key) or 0)
        for key, group in groups.items():
            for name, count in (member.get(key) or {}).items():
                group[name] = group.get(name, 0) + int(count)
    return {**counts, **groups}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
