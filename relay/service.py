"""The realtime service: the core's parts wired together from :class:`Settings`.

One :class:`Realtime` per process. The Flask layer reaches it through
``current_app.extensions["realtime"]`` and calls three things on it: mint a
token, admit (or resume) a socket, send a broadcast.

With recovery on (``WS_RECOVERY_WINDOW_MS`` > 0, the default) a broadcast
goes: Broadcaster → History (its offset) → Broker → Sequencer (offset order)
→ Hub; a resume goes through Recovery (``relay.recovery``); sessions are kept
by the SessionKeeper. With it off, the Broker hands envelopes to the Hub
directly, as before offsets existed.

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
from typing import Any, cast

import gevent
from gevent.event import AsyncResult

from . import __version__
from . import channels as channel_rules
from .broadcast import Broadcaster, BroadcastRequest, Receipt
from .broadcast_log import BroadcastLog, LogWriter
from .broker import Broker, BrokerUnavailable, Delivery, MemoryBroker, Pending
from .clock import drop_older, now_ms
from .codes import Close, Error
from .config import MAX_SESSION_HOURS, Settings
from .connection import OPEN, Connection
from .devices import KnownDevices
from .directory import Directory, DirectoryUnavailable, Identity
from .envelope import Envelope
from .eventlog import event
from .history import History, HistoryUnavailable
from .hub import Hub
from .lastvalues import LastValues, newest_for
from .outbox import Outbox
from .protocol import ClientProtocol, encode
from .recovery import Prepared, Recovery, ResumeRequest, split_by_refusal
from .revocation import IdentityWatcher
from .sequencer import Sequencer
from .sessions import SessionKeeper
from .signouts import SignoutStore, SignoutsUnavailable, SqliteSignouts
from .sqlite import start_checkpoints
from .sqlite_broadcast_log import SqliteBroadcastLog
from .sqlite_directory import SqliteDirectory
from .sqlite_history import SqliteHistory
from .telemetry import Telemetry
from .throttle import LoginThrottle, MemoryThrottleStore, ThrottleStore
from .timeline import LocalShare, Timeline, TimelineShare, history_json, merge
from .tokens import TokenError, TokenService

log = logging.getLogger("relay.service")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_SUBSCRIPTIONS = 100
TRIM_INTERVAL = 5.0  # seconds between history trims
FOLLOW_INTERVAL = 2.0  # seconds between checks that this worker delivered what the stream holds
SAMPLE_INTERVAL = 1.0  # seconds between gauge samples (and, every other one, timeline shares)
# How long a disconnect is remembered for the workers that did not hear it: longer than any worker can be
# cut off from Redis and still hold sockets worth closing.
DISCONNECT_KEPT_S = 24 * 3600


class _OnItsWay:
    """A socket past its token and not yet in the hub, which may wait meanwhile (the user's lookup,
    the session, the missed broadcasts). An identity change or an administrator's disconnect for its
    user in that time is noted here, and applied to it before it joins (``Realtime._caught_up``); and
    the limits count the sockets on their way ahead of it, not only those in the hub."""

    __slots__ = ("user_id", "changed", "identity", "disconnected", "joining")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id  # the key it is listed under in Realtime._on_the_way
        self.changed = False
        self.identity: Identity | None = None
        self.disconnected = False
        self.joining = False  # past the capacity checks: counted in Realtime._joining until it is in


REPLACED = "resumed on another socket"  # the reason of a 4409 (see Realtime._replace)


def _disconnect(conn: Connection) -> None:
    event("ws.revoked", level="warning", clientId=conn.id, userId=conn.user_id, reason="disconnected")
    conn.close(Close.FORBIDDEN, "disconnected by an administrator")


class Realtime:
    def __init__(
        self,
        settings: Settings,
        *,
        directory: Directory | None = None,
        broker: Broker | None = None,
        history: History | None = None,
        broadcast_log: BroadcastLog | None = None,
    ):
        self.settings = settings
        self.started_at = time.time()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # None only in a development command run before the server ever started (no secret yet).
        self.tokens = (
            TokenService(settings.token_secret, settings.token_ttl_ms, settings.token_secret_previous)
            if settings.token_secret
            else None
        )
        self.directory = directory or _make_directory(settings)
        self.telemetry = Telemetry()
        self.timelines = _make_timeline_share(settings, self.telemetry.timeline, self.worker_id)
        self.broadcast_log = LogWriter(
            broadcast_log or _make_broadcast_log(settings), retention_days=settings.broadcast_log_days
        )
        self.hub = Hub(max_clients=settings.max_clients, ping_interval=settings.ping_interval_ms / 1000)
        self.outbox = Outbox()
        self.history = history or (_make_history(settings) if settings.recovery else None)
        self.sequencer = Sequencer(
            self.hub.deliver,
            self._fetch,
            on_reset=self._stream_reset,
            on_gap=self._stream_gap,
            on_went_back=self._stream_reused,
        )
        self._starting_over: str | None = None  # the epoch a greenlet is starting over (once at a time)
        self.sessions: SessionKeeper | None = None
        last_values: LastValues | None = None
        if self.history is not None:
            self.sessions = SessionKeeper(
                self.history, window_ms=settings.recovery_window_ms, busy=lambda: self.outbox.busy
            )
            last_values = LastValues(self.history, self.sequencer, ttl_ms=settings.last_value_ttl_ms)
        self.recovery = Recovery(
            self.history, self.sequencer, self.sessions, max_messages=settings.recovery_max_messages
        )
        self.protocol = ClientProtocol(
            self.hub,
            max_subscriptions=MAX_SUBSCRIPTIONS,
            sessions=self.sessions,
            last_values=last_values,
            telemetry=self.telemetry,
            stream=self.sequencer if self.history is not None else None,
            max_replay=settings.recovery_max_messages,
        )
        self.broker = broker or _make_broker(settings, self.worker_id)
        self.broadcaster = Broadcaster(self.broker, self.history, telemetry=self.telemetry, log=self.broadcast_log)
        self.throttle = LoginThrottle(_make_throttle_store(settings))
        self.devices = KnownDevices(settings.secret_key)
        self.signouts = _make_signout_store(settings)
        self.identities = IdentityWatcher(
            self.directory,
            self.hub.user_ids,
            self.apply_identity,
            recheck_interval=settings.identity_recheck_ms / 1000,
            sign_outs=self.recheck_sign_outs,
        )
        self.started = False
        self._greenlets: list[gevent.Greenlet] = []
        # Sockets past their token, not yet in the hub, by user; and how many of them are past the
        # capacity checks (WS_MAX_CLIENTS counts them): see _OnItsWay.
        self._on_the_way: dict[str, list[_OnItsWay]] = {}
        self._joining = 0
        # Users signed out everywhere, by the source's spelling: a token minted before that time (ms) is
        # refused here (4401). Kept while such a token could still be in date (see apply_sign_outs).
        self._signed_out: dict[str, int] = {}
        # user id -> the newest disconnect (epoch ms) whose close this worker heard and applied: its record
        # is not applied again (a clock behind the recorder's would close sockets opened just after it).
        # Oldest first, kept DISCONNECT_KEPT_S (see _heard_disconnect).
        self._heard_disconnects: dict[str, int] = {}
        self._page_prime_at = float("-inf")  # when a page last tried to read the stream (see stream_position)

    def start(self) -> None:
        """Begin serving: the broker's listener, the keep-alive, the session keeper, the trimmer. Idempotent."""
        if self.started:
            return
        self.started = True
        self._prime()
        self.broker.start(self._deliver, self._heartbeat, self._resync, self._on_control)
        self.hub.start()
        self.identities.start()
        self.broadcast_log.start()
        self.sample_gauges()
        self._greenlets.append(gevent.spawn(self._sample_forever))
        start_checkpoints()  # SQLite's WAL, off the event loop (one checkpointer per process)
        if self.sessions is not None:
            self.sessions.start()
            self._greenlets.append(gevent.spawn(self._trim_forever))
            self._greenlets.append(gevent.spawn(self._follow_forever))
        self._greenlets.append(gevent.spawn(self._warn_about_the_project))

    def _warn_about_the_project(self) -> None:
        """Once a worker starts: what in the identity source's settings lets people connect who should not
        (a Supabase project open to sign-ups), for operators who never run ``flask ws identity check``. A
        greenlet of its own: it asks over HTTP. Unreadable settings are not reported here (the check command
        says why; the identity source's health is ``identity.unavailable``'s)."""
        try:
            warnings = self.directory.project_warnings()
        except DirectoryUnavailable:
            return
        for warning in warnings:
            event("identity.project_warning", level="warning", message=warning)

    # -- access that follows the user --------------------------------------------------------

    def apply_identity(self, user_id: str, identity: Identity | None) -> int:
        """Make this worker's sockets of ``user_id`` match who the user is now; returns how many it touched.

        Disabled or gone: closed with 4403. Role or clinic changed: re-indexed at once, and every
        subscription the user may no longer hold is dropped, with ERROR forbidden_channel and
        UNSUBSCRIBED. Called by the IdentityWatcher (its own greenlet).
        """
        for arriving in self._on_the_way.get(user_id, ()):
            arriving.identity, arriving.changed = identity, True
        conns = self.hub.connections_of(user_id)
        for conn in conns:
            if identity is None or not identity.active:
                event("ws.revoked", level="warning", clientId=conn.id, userId=user_id, reason="user_disabled")
                conn.close(Close.FORBIDDEN, "user disabled")
                continue
            if (conn.role, conn.clinic_id) == (identity.role, identity.clinic_id):
                conn.identify(identity)  # e.g. a new display name: nothing to re-index
                continue
            self.hub.reidentify(conn, identity)
            lost = [name for name in sorted(conn.channels) if channel_rules.refusal(conn, name) is not None]
            removed = self.hub.unsubscribe(conn, lost)
            for name in removed:
                self.protocol.error(
                    conn, Error.FORBIDDEN_CHANNEL, f"you may no longer subscribe to {name!r}", channel=name, now=False
                )
            if removed:
                conn.send_now(encode("UNSUBSCRIBED", {"channels": removed}))
                if self.sessions is not None:
                    self.sessions.changed(conn)
            event(
                "ws.identity_changed",
                clientId=conn.id,
                userId=user_id,
                role=identity.role,
                clinicId=identity.clinic_id,
                dropped=removed,
            )
        return len(conns)

    def recheck_sign_outs(self, user_ids: list[str]) -> int:
        """Read from the sign-out store whether these users were signed out everywhere or disconnected,
        and apply it (:meth:`apply_sign_outs`, :meth:`apply_disconnects`); may wait on the store, and
        raises ``SignoutsUnavailable``. Returns how many sockets it closed.

        The backstop of :meth:`sign_out_everywhere` and :meth:`disconnect_user`: their close reaches
        the workers listening at that moment (a worker whose Redis listener was reconnecting never
        hears it), and a token minted before a sign-out still opens a socket until it expires. The
        identity re-check reads every connected user here (``WS_IDENTITY_RECHECK_MS``); a worker told
        to close a user's sockets reads that user at once.
        """
        now = time.time()
        closed = self.apply_sign_outs(self.signouts.signed_out_before(user_ids, now))
        return closed + self.apply_disconnects(self.signouts.disconnected_before(user_ids, now))

    def apply_sign_outs(self, signed_out: dict[str, int]) -> int:
        """Users signed out everywhere, each with the time (epoch ms) their tokens had to be minted after:
        this worker refuses older tokens from now on, and closes the sockets opened with one (4403,
        as the sign-out's own close). Returns how many it closed."""
        horizon = now_ms() - self.settings.token_ttl_ms  # a token minted before this has expired
        for user_id, before in signed_out.items():
            if before > max(horizon, self._signed_out.get(user_id, 0)):
                self._signed_out[user_id] = before
        for user_id in [user_id for user_id, before in self._signed_out.items() if before <= horizon]:
            del self._signed_out[user_id]
        closed = 0
        for user_id, before in signed_out.items():
            for conn in self.hub.connections_of(user_id):
                if conn.token_ms < before:
                    event("ws.revoked", level="warning", clientId=conn.id, userId=user_id, reason="signed_out")
                    conn.close(Close.FORBIDDEN, "signed out everywhere")
                    closed += 1
        return closed

    def apply_disconnects(self, disconnected: dict[str, int]) -> int:
        """Users an administrator disconnected, each with the moment (epoch ms): their sockets here that
        were opened before it are closed (4403, as the disconnect's own close); those opened since (the
        person came back) stay. Returns how many it closed."""
        if not disconnected:
            return 0
        wall, monotonic = now_ms(), time.monotonic()
        closed = 0
        for user_id, before in disconnected.items():
            if self._heard_disconnects.get(user_id, 0) >= before:
                continue  # closed here when it was sent
            for conn in self.hub.connections_of(user_id):
                if conn.state is OPEN and wall - (monotonic - conn.opened_at) * 1000 < before:
                    _disconnect(conn)
                    closed += 1
        return closed

    def _heard_disconnect(self, user_id: str, before: int) -> None:
        """Remember that this worker heard (and applied) a disconnect of ``user_id`` at ``before`` (epoch ms),
        as long as its record lives. Oldest first, and pruned here: a sign-out everywhere sends one too,
        and a worker that never re-checks a disconnect record would otherwise keep one per such user."""
        heard = self._heard_disconnects
        if before <= heard.get(user_id, 0):
            return
        heard.pop(user_id, None)  # to the end: newest last
        heard[user_id] = before
        drop_older(heard, now_ms() - DISCONNECT_KEPT_S * 1000)

    def spelled_by_source(self, user_id: str) -> tuple[str, bool | None]:
        """The id as the identity source spells it (a Supabase id typed in capitals is the same user,
        and its sockets and sign-outs are keyed by the source's spelling), and whether the source knows
        the user: None when it could not be asked (then the id as given)."""
        try:
            user = self.directory.get(user_id)
        except DirectoryUnavailable:
            return user_id, None
        return (user.user_id, True) if user is not None else (user_id, False)

    def disconnect_user(self, user_id: str) -> Delivery:
        """Close the user's sockets on every worker and host (an incident); ``delivered`` counts them.

        Recorded first in the sign-out store, for a worker that does not hear the close (its Redis
        listener reconnecting): it closes them at its next identity re-check (:meth:`recheck_sign_outs`).
        That store down, the close is sent all the same (and the record's loss logged).
        """
        try:
            before = self.record_disconnect(user_id)
        except SignoutsUnavailable as down:
            before = now_ms()
            event("ws.disconnect_unrecorded", level="error", userId=user_id, error=str(down))
        return self._close_everywhere(user_id, before)

    def _close_everywhere(self, user_id: str, before: int) -> Delivery:
        """Close the user's sockets on every worker listening (4403); ``before`` (epoch ms) is the moment
        recorded for the others, which the ones that heard it then do not apply again."""
        return self.broker.control({"kind": "disconnect", "userId": user_id, "before": before})

    def record_disconnect(self, user_id: str) -> int:
        """Record in the sign-out store that the user's sockets opened before now are to close: every
        worker closes them at its next identity re-check. Returns that moment (epoch ms); raises
        :class:`relay.signouts.SignoutsUnavailable` when it could not be recorded."""
        now = time.time()
        before = int(now * 1000)
        self.signouts.disconnect_all(user_id, before, now + DISCONNECT_KEPT_S)
        return before

    def end_sign_ins(self, user_id: str, *, by: str) -> int:
        """End every sign-in of the user: each session cookie of theirs that started before this
        millisecond is refused from now on, on every host that shares the sign-out store. Sockets
        are not touched (:meth:`sign_out_everywhere` closes them too). ``by`` (``button``, ``api``,
        ``cli``) goes into the log line. Returns that moment (epoch ms). Raises
        :class:`relay.signouts.SignoutsUnavailable` when the store cannot record it: then nothing was done.
        """
        now = time.time()
        before = int(now * 1000)
        self.signouts.end_all(user_id, before, now + MAX_SESSION_HOURS * 3600)
        event("logout.everywhere", level="warning", userId=user_id, by=by)
        return before

    def sign_out_everywhere(self, user_id: str, *, by: str) -> Delivery | None:
        """:meth:`end_sign_ins`, then close the user's sockets on every worker and host (4403, as
        :meth:`disconnect_user`): a password change, a lost laptop. Returns that delivery, or None
        when the broker could not carry it (the sign-ins have ended regardless). Each worker that
        closes them refuses from then on the user's connection tokens minted before (4401); one that
        did not hear it learns it at its next identity re-check (:meth:`recheck_sign_outs`).
        """
        before = self.end_sign_ins(user_id, by=by)
        try:
            # Not a disconnect record besides: the sign-out's own is the backstop (its tokens, its sockets).
            return self._close_everywhere(user_id, before)
        except BrokerUnavailable as down:
            event("logout.everywhere_sockets_open", level="error", userId=user_id, error=str(down))
            return None

    def identity_changed(self, user_id: str) -> Delivery:
        """Tell every worker to read the user again now (a change made outside the change log)."""
        return self.broker.control({"kind": "identity", "userId": user_id})

    def _on_control(self, message: dict) -> int:
        """A control message from any worker (see Broker.control); runs in the listener's greenlet."""
        kind, user_id = message.get("kind"), message.get("userId")
        if not isinstance(user_id, str):
            return 0
        if kind == "disconnect":
            before = message.get("before")
            if isinstance(before, int):
                self._heard_disconnect(user_id, before)  # its record, read at the re-check, is done here
            for arriving in self._on_the_way.get(user_id, ()):
                arriving.disconnected = True
            conns = self.hub.connections_of(user_id)
            for conn in conns:
                _disconnect(conn)
            # Maybe a sign-out everywhere: its tokens handed out before are refused from now on.
            gevent.spawn(self._read_sign_out, user_id)  # may wait on the store: not here
            return len(conns)
        if kind == "identity":
            gevent.spawn(self.identities.refresh, [user_id])  # may wait on the directory: not here
            return len(self.hub.connections_of(user_id))
        if kind == "replaced":  # see _replace
            client_id = message.get("clientId")
            if self.sessions is not None and isinstance(client_id, str):
                self.sessions.resumed_elsewhere(client_id, user_id)  # its socket open, or closed a moment ago
            replaced = self.hub.connection(user_id, client_id)
            if replaced is None:
                return 0
            replaced.close(Close.REPLACED, REPLACED)
            return 1
        return 0

    def _read_sign_out(self, user_id: str) -> None:
        try:
            self.recheck_sign_outs([user_id])
        except SignoutsUnavailable as down:  # the identity re-check reads it again
            log.warning("sign-out of %s not read: %s", user_id, down)

    def _heartbeat(self) -> dict:
        """What this worker publishes for the cluster: the hub's figures, and who holds several sockets here."""
        return {**self.hub.stats(), "busyUsers": self.hub.busy_users()}

    # -- the stream ---------------------------------------------------------------------

    def stream_position(self) -> tuple[str, int] | None:
        """(epoch, offset) of the last broadcast whose fan-out finished here, for a page to render and
        subscribe ``since`` (see ``blueprints.pages``); None without a history, or while the store cannot
        be read. May wait on the store (a request's greenlet only): a stream not read yet (the store was
        down when the worker started) is read now, or a page rendered as it came back would carry no
        position, and a broadcast before its socket subscribed would reach it neither live nor replayed."""
        if self.history is None:
            return None
        if not self.sequencer.primed:
            # Each try may wait on a store that is down, and every page asks: once a second at most.
            if time.monotonic() - self._page_prime_at < 1.0:
                return None
            self._page_prime_at = time.monotonic()
            self._prime()
        if self.sequencer.epoch is None:
            return None
        return self.sequencer.epoch, self.sequencer.delivered

    def _prime(self) -> bool:
        """Start the sequencer at the stream's head (once; while the store is down, retried by the next
        admission, a page (at most once a second: see stream_position) and the follower's rounds)."""
        if self.history is None or self.sequencer.primed:
            return True
        try:
            epoch, head = self.history.head()
        except HistoryUnavailable as down:
            log.warning("the history is unavailable, the stream is not read yet: %s", down)
            return False
        if not self.sequencer.primed:  # a broadcast that arrived while the store answered started it already
            self.sequencer.prime(epoch, head)
        return True

    def _deliver(self, envelope: Envelope) -> Pending:
        """The broker's way in: through the sequencer when the envelope has a place in the stream."""
        if envelope.offset is not None:
            return self.sequencer.offer(envelope)
        done = AsyncResult()
        done.set(self.hub.deliver(envelope))
        return done

    def _fetch(self, after: int, limit: int) -> list[Envelope]:
        return self.history.read(after, limit) if self.history is not None else []

    def _resync(self) -> None:
        """A listener is back after an outage: deliver what it missed, from the history.

        The store it was away from may itself have come back older (Redis restarted from a
        snapshot, a replica that lagged): the same epoch, but not what this worker delivered. Its
        next offsets would be ones delivered already, and every worker would drop them as
        duplicates. Then the stream starts over (a new epoch): every socket is closed 1012, and
        each client is told on resume that it was not recovered, instead of missing them silently.
        """
        if self.history is None:
            return
        try:
            # Taken before the store is asked: broadcasts delivered while it answers are past its head.
            delivered_epoch, position = self.sequencer.epoch, self.sequencer.position
            epoch, head = self.history.head()
            # Behind what this worker delivered, or at an epoch it left for a newer one: an older copy.
            went_back = epoch == delivered_epoch == self.sequencer.epoch and self._went_back(head, position)
            if went_back or self.sequencer.left(epoch):
                event("stream.went_back", level="error", epoch=epoch, head=head, delivered=position)
                epoch, head = self.history.start_over(epoch)
            # Only if nothing moved it meanwhile: an offer of a newer stream's broadcast may have.
            if epoch != self.sequencer.epoch and self.sequencer.epoch == delivered_epoch:
                self.sequencer.restart(epoch, head)
            self.sequencer.catch_up()
        except HistoryUnavailable as down:
            log.warning("catch-up after a listener outage failed: %s", down)

    def _went_back(self, head: int, position: int) -> bool:
        """Whether the stream (at ``head``) no longer holds what this worker had delivered up to
        ``position`` before asking (see ``_resync``): every offset delivered was stored first."""
        assert self.history is not None
        if head < position:
            return True
        delivered = self.sequencer.delivered_id(position)
        if delivered is None:  # nothing delivered here yet, or long enough ago to be out of the window
            return False
        stored = self.history.read(position - 1, 1)  # new broadcasts may have passed the old head already
        return bool(stored) and stored[0].offset == position and stored[0].id != delivered

    def _stream_reused(self, epoch: str, offset: int) -> None:
        """The sequencer was offered a second broadcast at an offset it delivered (called in an offer: must
        not wait). The store went back and hands out offsets again, which every worker drops as duplicates:
        start the stream over, as ``_resync`` does when it notices."""
        if self.history is None or self._starting_over == epoch:
            return
        self._starting_over = epoch
        event("stream.went_back", level="error", epoch=epoch, reused=offset, delivered=self.sequencer.position)
        gevent.spawn(self._start_over, epoch)

    def _start_over(self, epoch: str) -> None:
        """Until it is done: no reused offset may be offered again to say so (new broadcasts pass them)."""
        assert self.history is not None
        try:
            for wait in (0.5, 1, 2, 4, 8, 15, 30, 60):  # about two minutes, then the follower's checks
                try:
                    new_epoch, head = self.history.start_over(epoch)
                except HistoryUnavailable as down:
                    log.warning("cannot start the stream over yet: %s", down)
                    gevent.sleep(wait)
                    continue
                if self.sequencer.epoch == epoch:  # unless a broadcast of the new stream got here first
                    self.sequencer.restart(new_epoch, head)
                return
        finally:
            self._starting_over = None

    def _stream_gap(self, after: int, upto: int) -> None:
        """Broadcasts after ``after`` up to ``upto`` were never delivered here and the history lost them:
        every client here missed them. Close every socket 1012, so each resumes and is told
        ``history_gone`` (the replay cannot be whole), and refetches."""
        closed = self.hub.close_all(Close.SERVICE_RESTART, "stream gap")
        event("stream.gap", level="error", after=after, upto=upto, clients=len(closed))

    def _stream_reset(self, epoch: str) -> None:
        """The stream's history was lost: no position a client holds is valid any more; let them all resync."""
        closed = self.hub.close_all(Close.SERVICE_RESTART, "stream reset")
        event("stream.reset", level="error", epoch=epoch, clients=len(closed))

    def sample_gauges(self) -> None:
        """Set the gauges that are read rather than counted (each second, at start, before a scrape)."""
        self.telemetry.sample(
            connections=len(self.hub),
            subscriptions=self.hub.stats()["subscriptions"],
            broker_up=self.broker.status()["state"] == "ok",
            identity_up=self.directory.status()["state"] == "ok",
        )

    def _sample_forever(self) -> None:
        """The gauges every second; this worker's last hour for the others every other second."""
        beat = 0
        while True:
            gevent.sleep(SAMPLE_INTERVAL)
            beat += 1
            try:
                self.sample_gauges()
                if beat % 2:
                    self.timelines.publish(self.worker_id, self.telemetry.timeline.snapshot())
            except Exception as problem:  # Redis away: the next beat tries again
                log.warning("sampling or sharing the timeline failed: %s", problem)

    def _trim_forever(self) -> None:
        while True:
            gevent.sleep(TRIM_INTERVAL)
            try:
                assert self.history is not None
                self.history.trim(int(time.time() * 1000))
            except Exception as problem:
                log.warning("trimming the history failed: %s", problem)

    def _follow_forever(self) -> None:
        """Deliver what the stream holds but never reached this worker: a broadcast stored whose publish
        failed, or whose worker was killed between the two. The next broadcast's gap fill would read it;
        this covers a stream that goes quiet after it. Deliveries take milliseconds, so a head this worker
        has not reached one interval after it was seen is caught up."""
        assert self.history is not None
        seen: tuple[str, int, int] | None = None  # (epoch, head, this worker's position) one interval ago
        failing = False
        while True:
            gevent.sleep(FOLLOW_INTERVAL)
            try:
                # Stuck, not merely behind: a fan-out to many sockets can take seconds per broadcast.
                if seen is not None and seen[0] == self.sequencer.epoch and seen[2] == self.sequencer.position:
                    log.warning("offsets up to %s never reached this worker: reading them", seen[1])
                    self.sequencer.catch_up()
                position = self.sequencer.position  # before the store is asked, as in _resync
                epoch, head = self.history.head()
                # The store at another epoch (one this worker left: it went back; a new one: it started
                # over, and no broadcast of it reached here yet) or behind what this worker delivered:
                # what _resync checks when the listener comes back, in case that check failed or never ran.
                if epoch != self.sequencer.epoch or head < position:
                    self._resync()
                    seen = None
                else:
                    seen = (epoch, head, position) if head > position else None
                failing = False
            except Exception as problem:  # the store is away: said once, not every round
                if not failing:
                    log.warning("following the stream failed: %s", problem)
                failing, seen = True, None

    # -- sockets ------------------------------------------------------------------

    def open_socket(
        self,
        sock: socket.socket,
        token: str | None,
        remote: str | None = None,
        pending: bytes = b"",
        resume: ResumeRequest | str | None = None,
    ) -> Connection:
        """Admit (or refuse) a socket whose upgrade has been answered; ``resume`` restores a session.

        Runs in the upgrade request's greenlet, so it may wait (the identity
        lookup, the session and the missed broadcasts). An admitted connection
        lives on the event loop from here; a refused one is closed with a code
        the browser can act on (4401 new token, 4403 give up, 1012/1013 retry,
        1011 our bug).
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
            self._admit(conn, token, remote, pending, resume)
        except Exception:
            # The 101 is already on the wire: a bug here must still end in a close code, not a hang.
            log.exception("admitting a socket failed")
            self.hub.remove(conn)
            conn.reject(Close.INTERNAL_ERROR, "internal error")
        return conn

    def _admit(
        self,
        conn: Connection,
        token: str | None,
        remote: str | None,
        pending: bytes,
        resume: ResumeRequest | str | None,
    ) -> None:
        if self._refused_while_draining(conn):
            return
        if self.tokens is None:
            raise RuntimeError("no WS_TOKEN_SECRET: this process cannot verify tokens")
        try:
            user_id, issued_ms = self.tokens.claims(token)
        except TokenError as refused:
            message = f"token {refused.reason.replace('_', ' ')}"
            self._refuse(
                conn,
                Close.UNAUTHORIZED,
                reason=refused.reason,
                message=message,
                user_id=refused.user_id,
                remote=remote,
                detail=str(refused),
            )
            return
        arriving = _OnItsWay(user_id)
        self._on_the_way.setdefault(user_id, []).append(arriving)
        try:
            conn.token_ms = issued_ms
            self._admit_user(conn, user_id, arriving, remote, pending, resume)
        finally:
            self._off_the_way(arriving)
            if arriving.joining:
                self._joining -= 1

    def _admit_user(
        self,
        conn: Connection,
        user_id: str,
        arriving: _OnItsWay,
        remote: str | None,
        pending: bytes,
        resume: ResumeRequest | str | None,
    ) -> None:
        try:
            identity = self.directory.get(user_id)
        except DirectoryUnavailable as down:
            self._refuse(
                conn,
                Close.TRY_AGAIN_LATER,
                reason="directory_unavailable",
                message="identity service unavailable",
                user_id=user_id,
                remote=remote,
                level="error",
                detail=str(down),
            )
            return
        if identity is None or not identity.active:
            reason = "unknown_user" if identity is None else "user_disabled"
            self._refuse(
                conn, Close.FORBIDDEN, reason=reason, message=reason.replace("_", " "), user_id=user_id, remote=remote
            )
            return
        if identity.user_id != user_id:
            # The token spells the id otherwise (a Supabase id in capitals): from here the source's
            # spelling, under which the hub counts the user's sockets and disconnects name them.
            self._off_the_way(arriving)
            user_id = arriving.user_id = identity.user_id
            self._on_the_way.setdefault(user_id, []).append(arriving)
        if self._refused_signed_out(conn, user_id, remote):
            return
        # The socket a resume comes back from, if it is still open here: it is on its way out (_replace),
        # so it is not counted against this one.
        replacing = self.hub.connection(user_id, resume.client_id) if isinstance(resume, ResumeRequest) else None
        leaving = 0 if replacing is None else 1
        # Counting those admitted ahead of it that have not joined yet (they may wait, see _OnItsWay).
        if len(self.hub) + self._joining - leaving >= self.hub.max_clients:
            event("ws.refused", level="warning", reason="server_full", userId=user_id, clients=len(self.hub))
            self.telemetry.refused("server_full")
            conn.reject(Close.TRY_AGAIN_LATER, "server full")
            return
        # Those of the user's sockets ahead of this one on their way in count too: a resume may wait
        # after this check (for its session, up to half a second), and a burst of them would
        # otherwise all pass it before the first joined the hub.
        ahead = self._on_the_way[user_id].index(arriving)
        held = self.hub.connection_count(user_id) - leaving + ahead + self.broker.connections_elsewhere(user_id)
        open_elsewhere = False
        if held >= self.settings.max_connections_per_user and replacing is None and isinstance(resume, ResumeRequest):
            # At the limit, a socket the user left open on another worker would keep them out until its
            # keep-alive ends it (a minute): that worker is told to close it (_replace), so it is not counted.
            open_elsewhere = self._stored_open(user_id, resume.client_id)
            held -= 1 if open_elsewhere else 0
        if held >= self.settings.max_connections_per_user:
            event("ws.refused", level="warning", reason="too_many_connections", userId=user_id, held=held)
            self.telemetry.refused("too_many_connections")
            conn.reject(Close.TOO_MANY_CONNECTIONS, "too many connections for this user")
            return
        arriving.joining = True
        self._joining += 1

        if self.history is not None and not self._prime():
            self.telemetry.refused("history_unavailable")
            conn.reject(Close.TRY_AGAIN_LATER, "history unavailable")
            return
        conn.identify(identity)
        outcome = self._prepare_resume(conn, resume) if resume is not None else None

        # From here to conn.start(): no pause, so the replay ends exactly where live delivery begins.
        # A drain may have begun while this admission waited (the directory, the session, the
        # history): it closed the sockets it had, not this one, which would stay open past it.
        if self._refused_while_draining(conn):
            return
        # Or a re-check learnt that the user was signed out everywhere.
        if self._refused_signed_out(conn, user_id, remote):
            return
        # So may the user have changed (disabled, moved, disconnected): the socket joins as who they
        # are now, and a resume replays only what that user may read.
        if arriving.disconnected or arriving.changed:
            if not self._caught_up(conn, arriving, outcome, remote):
                return
        replay: list[Envelope] = []
        if isinstance(outcome, Prepared):
            restored = outcome.channels
            settled = outcome.replay(
                self.sequencer,
                lambda flt: flt.admits(conn.user_id, conn.role, conn.clinic_id, restored),
                self.settings.recovery_max_messages,
            )
            if isinstance(settled, str):
                outcome = settled
            else:
                replay = settled
        hello: dict = {"clientId": conn.id, "userId": user_id}
        if self.history is not None:
            conn.sent_after = self.sequencer.position
            hello.update(epoch=self.sequencer.epoch, offset=conn.sent_after)
        if isinstance(outcome, Prepared):
            hello.update(recovered=True, channels=outcome.channels)
            # The replay sent everything after the client's position for the restored channels (and the
            # user, role, clinic): a channel the session lacked (subscribed just before the socket ended,
            # its change not saved yet), asked ``since`` that position, is replayed only what it adds.
            conn.sent_after = outcome.after
            if outcome.refused:  # told here too, so a client knows them before it decides what to refetch
                hello["refused"] = [name for name, _ in outcome.refused]
        elif outcome is not None:
            hello.update(recovered=False, reason=outcome)
        # CONNECTED is queued before the hub can see the connection: it is always the first frame.
        conn.push(encode("CONNECTED", hello))
        self.hub.add(conn)
        self.telemetry.connected()
        if isinstance(outcome, Prepared):
            for name, code in outcome.refused:
                self.protocol.error(conn, code, f"you may no longer subscribe to {name!r}", channel=name, now=False)
            self.hub.subscribe(conn, outcome.channels, MAX_SUBSCRIPTIONS)
            conn.push_owed([envelope.frame() for envelope in replay])
        if self.sessions is not None:
            self.sessions.opened(conn)
            if isinstance(outcome, Prepared):
                self.sessions.resumed(outcome.session.client_id)
        conn.start(pending)
        if isinstance(outcome, Prepared) and outcome.session.open:
            open_elsewhere = True
        self._replace(user_id, resume, replacing, open_elsewhere)
        resumed: dict[str, object] = {}
        if resume is not None:
            resumed.update(recovered=isinstance(outcome, Prepared), replayed=len(replay))
        if resume is not None and not isinstance(outcome, Prepared):
            resumed["reason"] = outcome
        event(
            "ws.connect",
            clientId=conn.id,
            userId=user_id,
            role=identity.role,
            clinicId=identity.clinic_id,
            remote=remote,
            **cast(dict[str, Any], resumed),  # cast: mypy cannot tell these keys from event()'s "level"
        )
        if resume is not None:
            self.recovery.count(outcome)
            self.telemetry.recovery(isinstance(outcome, Prepared))

    def _refused_signed_out(self, conn: Connection, user_id: str, remote: str | None) -> bool:
        """Refuse (4401) a socket whose token was minted before its user was signed out everywhere: the
        browser asks for a new one, which only a sign-in since can get (a copy of a session cookie from
        before cannot)."""
        if conn.token_ms >= self._signed_out.get(user_id, 0):
            return False
        self._refuse(
            conn, Close.UNAUTHORIZED, reason="signed_out", message="token signed out", user_id=user_id, remote=remote
        )
        return True

    def _refuse(
        self,
        conn: Connection,
        close: Close,
        *,
        reason: str,
        message: str,
        user_id: str | None,
        remote: str | None,
        level: str = "warning",
        detail: str | None = None,
    ) -> None:
        """Close ``conn`` with ``close`` for its token or its user: one ``ws.auth_failed`` line, and one
        count under ``reason`` in the metric, the dashboard's minutes and ``/health``'s counters alike."""
        fields = {} if detail is None else {"detail": detail}
        event("ws.auth_failed", level=level, reason=reason, userId=user_id, remote=remote, **fields)
        self.hub.counters["auth_failures"] += 1
        self.telemetry.auth_failed(reason)
        conn.reject(close, message)

    def _off_the_way(self, arriving: _OnItsWay) -> None:
        on_the_way = self._on_the_way[arriving.user_id]
        on_the_way.remove(arriving)
        if not on_the_way:
            del self._on_the_way[arriving.user_id]

    def _caught_up(
        self, conn: Connection, arriving: _OnItsWay, outcome: Prepared | str | None, remote: str | None
    ) -> bool:
        """Apply to ``conn`` what reached its user while it was on its way (its lookup may predate it):
        False if it is closed for it (4403), else True with ``conn`` and a resume's channels as of now."""
        identity = arriving.identity
        if arriving.disconnected or (arriving.changed and (identity is None or not identity.active)):
            reason = "disconnected" if arriving.disconnected else "user_disabled"
            message = "disconnected by an administrator" if arriving.disconnected else "user disabled"
            self._refuse(conn, Close.FORBIDDEN, reason=reason, message=message, user_id=conn.user_id, remote=remote)
            return False
        assert identity is not None
        conn.identify(identity)
        if isinstance(outcome, Prepared):
            outcome.channels, refused = split_by_refusal(
                outcome.channels, lambda name: channel_rules.refusal(conn, name)
            )
            outcome.refused += refused
        return True

    def _replace(
        self, user_id: str, resume: ResumeRequest | str | None, replacing: Connection | None, open_elsewhere: bool
    ) -> None:
        """Close the socket a resume came back from, on whichever worker still holds it (4409).

        A client whose network died reconnects before the server notices (the
        keep-alive takes up to two ping intervals): until then its old socket
        counts toward the user's sockets and is written to for nobody. Here,
        it is closed whether or not the resume was honoured (its client moved
        on). The other workers are told (``open_elsewhere``) of a session
        stored open that was restored, or that let the resume in at the
        user's limit; not after a drain, whose sockets all closed before their
        sessions were written. Without waiting for them: a worker killed with
        its sockets open leaves every session open, and its clients' resumes
        must not each wait for its answer.
        """
        if replacing is not None:
            replacing.close(Close.REPLACED, REPLACED)
        elif open_elsewhere and isinstance(resume, ResumeRequest):
            gevent.spawn(self._replace_elsewhere, user_id, resume.client_id)

    def _stored_open(self, user_id: str, client_id: str) -> bool:
        """Whether the user's session ``client_id`` was stored with its socket open on another worker (may wait)."""
        if self.history is None or not self.broker.connections_elsewhere(user_id):
            return False
        try:
            session = self.history.load_session(client_id)
        except Exception:  # a store that does not answer: the socket is counted, as it always was
            return False
        return session is not None and session.user_id == user_id and session.open

    def _replace_elsewhere(self, user_id: str, client_id: str) -> None:
        try:
            self.broker.notify({"kind": "replaced", "userId": user_id, "clientId": client_id})
        except BrokerUnavailable as down:  # the old socket stays until the keep-alive ends it, as before
            event("ws.replace_undelivered", level="warning", clientId=client_id, userId=user_id, error=str(down))

    def _refused_while_draining(self, conn: Connection) -> bool:
        """Close ``conn`` with 1012 if this worker drains (the client comes back to another worker)."""
        if not self.hub.draining:
            return False
        self.telemetry.refused("draining")
        conn.reject(Close.SERVICE_RESTART, "service restart")
        return True

    def _prepare_resume(self, conn: Connection, resume: ResumeRequest | str) -> Prepared | str:
        if isinstance(resume, str):
            return resume
        return self.recovery.prepare(
            resume,
            str(conn.user_id),
            refusal=lambda name: channel_rules.refusal(conn, name),
            admits=lambda flt, names: flt.admits(conn.user_id, conn.role, conn.clinic_id, names),
        )

    def broadcast(self, request: BroadcastRequest, *, source: str, scope: str, key: str | None = None) -> Receipt:
        """Publish a validated broadcast. Raises BrokerUnavailable, also while this worker drains
        (its sockets are closing: the caller should retry, and a load balancer will pick another worker),
        and IdempotencyConflict."""
        if self.hub.draining:
            raise BrokerUnavailable("this worker is restarting; retry in a moment")
        return self.broadcaster.send(request, source=source, scope=scope, key=key)

    def latest(self, wanted: dict[str, str | None], identity: Identity) -> dict[str, Envelope]:
        """Per channel of ``wanted``, the latest broadcast to it meant for ``identity``, of the type given
        (for pages that render it at once: the queue page shows a QUEUE_UPDATE, not a smoke test's
        message; None: any); a channel with none is absent. One read of the store for all of them."""
        if self.history is None or not wanted:
            return {}
        try:
            stored = self.history.last_values(list(wanted), self.settings.last_value_ttl_ms)
        except HistoryUnavailable:
            return {}
        who = (identity.user_id, identity.role, identity.clinic_id)
        found = {}
        for channel, message_type in wanted.items():
            values = [e for e in stored.get(channel, []) if message_type is None or e.type == message_type]
            best = newest_for(values, who, channel)
            if best is not None:
                found[channel] = best
        return found

    def drain(self, reason: str = "service restart") -> bool:
        """Close every socket with 1012 and refuse new ones (worker shutdown); sessions are saved first."""
        event("drain.start", clients=len(self.hub))
        done = self.hub.drain(
            Close.SERVICE_RESTART, reason, self.settings.drain_timeout_ms / 1000, closing=self._save_sessions
        )
        self.broker.close()  # leave the cluster view at once rather than when the heartbeat expires
        if not self.broadcast_log.flush(deadline=2.0):
            log.error("the broadcast log could not be written before exit: %s", self.broadcast_log.status())
        event("drain.done", complete=done, clients=len(self.hub))
        return done

    def _save_sessions(self) -> None:
        """Write every session now, so that a client reconnecting to the next worker can resume."""
        if self.sessions is None:
            return
        try:
            self.sessions.flush()
        except Exception as problem:
            log.error("sessions could not be saved before exit: %s", problem)

    # -- health ---------------------------------------------------------------------

    def health(self, *, full: bool = True, history: bool = False) -> dict:
        """This worker's health plus the cluster's totals (every live worker, every host).

        ``full=False``: the summary anyone may read in production (:data:`HEALTH_SUMMARY`: the
        original server's fields, the status and whether this worker drains); the full report
        names hosts, pids, files and errors. ``history``: also the last hour by minute and the
        error rates, merged over every worker that shared its timeline (Redis), or this worker's own.
        """
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
        # Not while the broker's own heartbeat fails: a Redis that hangs would hold /health for its
        # socket timeout (2 s), long enough for a load balancer to take a working worker out.
        members = self.broker.members() if broker["state"] == "ok" else None
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
        out = {
            "ok": status == "ok",
            "status": status,
            "uptime": round(time.time() - self.started_at, 3),
            "memory": {"rss": _rss_bytes(), "maxRss": usage.ru_maxrss * 1024},
            **_totals(members),
            "draining": self.hub.draining,
        }
        if not full:
            return {**{key: out[key] for key in HEALTH_SUMMARY}, "report": "summary"}
        out.update(
            {
                "report": "full",
                "workers": len(members),
                "version": __version__,
                "env": self.settings.app_env,
                "pid": os.getpid(),
                "worker": {"id": self.worker_id, "pid": os.getpid(), **local},
                "cluster": [
                    {key: m.get(key) for key in ("worker", "host", "pid", "clients", "subscriptions", "at")}
                    for m in sorted(members, key=lambda m: str(m.get("worker")))
                ],
                "counters": dict(self.hub.counters),
                "outbox": self.outbox.status(),
                "broker": broker,
                "identity": identity,
                "stream": self._stream_status(),
                "identityWatch": self.identities.status(),
                "recoveries": self.recovery.status(),
                "broadcastLog": self.broadcast_log.status(),
            }
        )
        if history:
            out.update(self.last_hour())
        return out

    def last_hour(self) -> dict:
        """``history`` (the last hour by minute), ``errorRates`` and ``historyScope``, as /health's ``history=1``."""
        scope = "worker" if isinstance(self.timelines, LocalShare) else "cluster"
        try:
            shared = self.timelines.collect()
        except Exception as problem:  # Redis away: this worker's own hour, and say so
            log.warning("reading the cluster's timelines failed: %s", problem)
            shared, scope = [self.telemetry.timeline.snapshot()], "worker"
        return {**history_json(merge(shared, time.time())), "historyScope": scope}

    def _stream_status(self) -> dict:
        """The stream as /health shows it: the store's view, and how far this worker has delivered."""
        if self.history is None:
            return {"enabled": False}
        try:
            stored = self.history.status()
        except HistoryUnavailable as down:
            stored = {"kind": self.history.name, "state": "degraded", "lastError": str(down)}
        keeper = self.sessions.status() if self.sessions is not None else {}
        return {
            "enabled": True,
            **stored,
            "delivered": self.sequencer.delivered,
            "skipped": self.sequencer.skipped,
            "windowMs": self.settings.recovery_window_ms,
            "sessions": {"stored": stored.get("sessions"), **keeper},
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
        allowed_roles=supabase.allowed_roles,
    )


# What /health tells anyone in production: the original server's fields, the status, and whether
# this worker drains (a load balancer's question). The rest names hosts, pids, files and errors.
HEALTH_SUMMARY = ("ok", "status", "uptime", "memory", "clients", "byRole", "byClinic", "draining")


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


def _make_history(settings: Settings) -> History:
    if not settings.redis_url:
        return SqliteHistory(
            settings.history_db_path,
            window_ms=settings.recovery_window_ms,
            last_value_ttl_ms=settings.last_value_ttl_ms,
        )
    from .redis_history import RedisHistory  # needs the optional redis package

    return RedisHistory(
        settings.redis_url,
        prefix=settings.redis_prefix,
        window_ms=settings.recovery_window_ms,
        last_value_ttl_ms=settings.last_value_ttl_ms,
    )


def _make_timeline_share(settings: Settings, timeline: Timeline, worker_id: str) -> TimelineShare:
    if not settings.redis_url:
        return LocalShare(timeline)
    from .redis_timeline import RedisShare  # needs the optional redis package

    return RedisShare(settings.redis_url, timeline, worker_id=worker_id, prefix=settings.redis_prefix)


def _make_broadcast_log(settings: Settings) -> BroadcastLog:
    """Where the identity lives: the instance SQLite, or the Supabase project."""
    supabase = settings.supabase
    if supabase is None:
        return SqliteBroadcastLog(settings.db_path)
    from .supabase_broadcast_log import SupabaseBroadcastLog

    return SupabaseBroadcastLog(
        supabase.url, supabase.service_key, table=supabase.broadcast_log_table, timeout=supabase.timeout_ms / 1000
    )


def _make_signout_store(settings: Settings) -> SignoutStore:
    if not settings.redis_url:
        return SqliteSignouts(settings.db_path)
    from .signouts import RedisSignouts

    return RedisSignouts(settings.redis_url, prefix=settings.redis_prefix)


def _make_throttle_store(settings: Settings) -> ThrottleStore:
    if not settings.redis_url:
        return MemoryThrottleStore()
    from .throttle import RedisThrottleStore

    return RedisThrottleStore(settings.redis_url, prefix=settings.redis_prefix)
