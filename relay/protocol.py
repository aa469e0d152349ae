"""The client protocol: what the server does with each frame a client sends.

Client -> server (JSON text frames)::

    {"type": "PING"}                                      -> PONG {timestamp[, epoch, offset]}
    {"type": "SUBSCRIBE",   "data": {"channels": [...]}}  -> ERROR per refused channel, then SUBSCRIBED {channels}
    {"type": "SUBSCRIBE",   "data": {"channels": [...], "last": true}}
                                                          -> ... and each channel's last value, before SUBSCRIBED
    {"type": "SUBSCRIBE",   "data": {"channels": [...], "since": {"epoch": E, "offset": N}}}
                                                          -> ... and what these channels add that was
                                                             broadcast after N, before SUBSCRIBED {recovered}
    {"type": "UNSUBSCRIBE", "data": {"channels": [...]}}  -> UNSUBSCRIBED {channels}

A connection's messages are answered in the order they came: while one waits
for the store (``last``, or a ``since`` from before this worker's recent
window), the ones behind it wait too.

Server -> client: ``CONNECTED {clientId, userId, epoch, offset}`` first, then
replies, broadcasts ``{type, data, id, offset}``, and ``ERROR {code, message[, channel]}``
(codes in :class:`relay.codes.Error`). Nothing a client sends can crash the
worker: every failure becomes an ERROR frame or, for abuse, a close code.

Everything here runs inside an event-loop callback (the connection's read
watcher), so nothing here may block: no sleep, no lock that waits, no network
or disk I/O. Work that must wait is handed to ``conn.defer`` and answers
through the connection (see ``relay.connection`` and ``docs/architecture.md``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from . import channels as channel_rules
from . import frames, jsonsafe
from .codes import Close, Error
from .connection import Connection
from .envelope import Envelope
from .eventlog import event
from .hub import Hub
from .lastvalues import LastValues
from .recovery import Reason
from .sequencer import Sequencer
from .sessions import SessionKeeper
from .telemetry import Telemetry

log = logging.getLogger("relay.protocol")

MAX_BACKLOG = 64  # messages held behind one still being answered (a SUBSCRIBE with last, or since)
MAX_BACKLOG_CHARS = 256 * 1024  # and their size: 64 of 64 KiB would be 4 MiB a socket while the store is slow
MAX_CHANNELS_PER_REQUEST = 200
LOGGED_REFUSALS = 10  # names a ws.subscribe_denied line shows (it counts them all)
# A SUBSCRIBE since looks through the recent broadcasts after it: ~0.15-0.2 us each, 0.6-0.9 ms for a window of
# 4,096, where a plain SUBSCRIBE costs ~16 us. It counts as one more message per this many, at most
# SINCE_MOST_MESSAGES more: a page's first two SUBSCRIBEs (plain, and with last) fit in the burst of 40
# with room to spare, one that sends since again and again is slowed down.
SINCE_SCANNED_PER_MESSAGE = 512
SINCE_MOST_MESSAGES = 8


def encode(message_type: str, data: object) -> bytes:
    """A server message as a ready-to-send text frame."""
    payload = jsonsafe.compact({"type": message_type, "data": data})
    return frames.text(payload.encode())


def _since(value: object) -> tuple[str, int] | None:
    """A SUBSCRIBE's ``since`` as (epoch, offset), None when absent; ValueError when malformed."""
    if value is None:
        return None
    epoch, offset = (value.get("epoch"), value.get("offset")) if isinstance(value, dict) else (None, None)
    if not isinstance(epoch, str) or not 0 < len(epoch) <= 64:
        raise ValueError("since.epoch")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError("since.offset")
    return epoch, offset


def error_frame(code: str, message: str, **extra: object) -> bytes:
    return encode("ERROR", {"code": code, "message": message, **extra})


def _sent_everything_after(conn: Connection, new: list[str], offset: int, *, held_too: bool) -> None:
    """Record that the channels just taken (``new``) were sent every broadcast after ``offset`` (with
    ``held_too``, a replay since ``offset``: those held already too), for a later SUBSCRIBE since to tell
    what it must replay (see ``Connection.sent_after`` and ``Connection.late``)."""
    if held_too and offset <= conn.sent_after:
        conn.sent_after, conn.late = offset, None
        return
    late = conn.late or {}
    if held_too:
        late = {name: min(after, offset) for name, after in late.items()}
    late = {**late, **dict.fromkeys(new, offset)}
    conn.late = {name: after for name, after in late.items() if after > conn.sent_after} or None


class ClientProtocol:
    """The connection handler for admitted sockets (see ``relay.connection.Handler``).

    Every method here runs inside an event-loop callback and must never block
    (``relay.connection`` says why); work that has to wait goes through
    ``conn.defer``. All of it is in-memory: the hub's indexes and the
    connection's own queue.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        max_subscriptions: int = 100,
        rate_burst: int = 40,
        rate_per_second: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        sessions: SessionKeeper | None = None,
        last_values: LastValues | None = None,
        telemetry: Telemetry | None = None,
        stream: Sequencer | None = None,
        max_replay: int = 1000,
    ):
        self.hub = hub
        # The stream's position (PONG and SUBSCRIBED tell it) and its recent broadcasts (what a
        # SUBSCRIBE ``since`` replays). None without a history (no offsets anywhere).
        self.stream = stream
        self.max_replay = max_replay
        self.telemetry = telemetry
        self.max_subscriptions = max_subscriptions
        self.rate_burst = rate_burst
        self.rate_per_second = rate_per_second
        self.clock = clock
        self.sessions = sessions
        self.last_values = last_values
        self._handlers = {
            "PING": self._ping,
            "SUBSCRIBE": self._subscribe,
            "UNSUBSCRIBE": self._unsubscribe,
        }

    # -- Handler interface ------------------------------------------------------

    def on_text(self, conn: Connection, text: str) -> None:
        if not self._within_rate(conn):
            return
        if conn.backlog is not None:  # an earlier message of this connection is still being answered
            waiting = conn.backlog
            # A slow store must not make a socket hoard megabytes: bounded in count and in size.
            if len(waiting) >= MAX_BACKLOG or sum(map(len, waiting)) + len(text) > MAX_BACKLOG_CHARS:
                self._rate_limited(conn, "too many messages waiting for an answer; slow down", waiting=len(waiting))
                return
            conn.backlog.append(text)
            return
        self._handle(conn, text)

    def _handle(self, conn: Connection, text: str) -> None:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            self.error(conn, Error.INVALID_JSON, "the message is not valid JSON")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.error(conn, Error.INVALID_MESSAGE, 'a message is a JSON object with a string "type"')
            return
        handler = self._handlers.get(message["type"])
        if handler is None:
            self.error(
                conn,
                Error.UNKNOWN_TYPE,
                f"unknown message type {message['type'][:64]!r}; expected PING, SUBSCRIBE or UNSUBSCRIBE",
            )
            return
        handler(conn, message.get("data"))

    def on_binary(self, conn: Connection, data: bytes) -> None:
        if self._within_rate(conn):
            self.error(conn, Error.BINARY_NOT_SUPPORTED, "send JSON text frames, not binary")

    def on_control(self, conn: Connection) -> bool:
        # A ping or a pong counts as a message: clients send one every few seconds at most.
        return self._within_rate(conn)

    def on_closing(self, conn: Connection) -> None:
        self.hub.remove(conn)
        if self.sessions is not None and conn.admitted:
            self.sessions.closed(conn)  # its channels are final: nothing is subscribed once it is not open

    def on_closed(self, conn: Connection) -> None:
        if not conn.admitted:
            return  # the refusal was logged already
        if self.telemetry is not None:
            self.telemetry.disconnected(conn.close_code, slow=conn.overflowed)
        event(
            "ws.disconnect",
            clientId=conn.id,
            userId=conn.user_id,
            durationMs=int((time.monotonic() - conn.opened_at) * 1000),
            code=conn.close_code,
            reason=conn.close_reason,
        )

    # -- messages ------------------------------------------------------------------

    def _ping(self, conn: Connection, data: object) -> None:
        """PONG, with the stream's position when there is one: every broadcast up to ``offset`` that this
        connection is to get is queued ahead of this PONG (its fan-out finished), so a client whose
        channels are quiet may resume from there, not from an offset the history has dropped since."""
        answer: dict = {"timestamp": int(time.time() * 1000)}
        self._tell_position(answer)
        conn.send_now(encode("PONG", answer))

    def _tell_position(self, answer: dict) -> None:
        """Add the stream's ``epoch`` and ``offset`` (``Sequencer.delivered``) to a PONG or SUBSCRIBED:
        every broadcast up to it that this connection is to get is queued ahead of the answer."""
        stream = self.stream
        if stream is not None and stream.epoch is not None:
            answer.update(epoch=stream.epoch, offset=stream.delivered)

    def _subscribe(self, conn: Connection, data: object) -> None:
        names = self._channel_list(conn, data)
        if names is None:
            return
        assert isinstance(data, dict)  # _channel_list answered anything else with an ERROR
        last = data.get("last", False)
        if not isinstance(last, bool):
            self.error(conn, Error.INVALID_DATA, '"last" must be true or false')
            return
        try:
            since = _since(data.get("since"))
        except ValueError:
            self.error(conn, Error.INVALID_DATA, '"since" must be {"epoch": string, "offset": integer >= 0}')
            return
        allowed, denied = [], []
        for name in names:
            refusal = channel_rules.refusal(conn, name)
            if refusal is None:
                allowed.append(name)
                continue
            shown = name[: channel_rules.MAX_CHANNEL_CHARS]  # a refused name may be 64 KiB long
            text = (
                f"no channel is named {shown!r}"
                if refusal == Error.UNKNOWN_CHANNEL
                else f"you may not subscribe to {shown!r}"
            )
            self.error(conn, refusal, text, channel=name, now=False)
            denied.append((shown, refusal))
        if denied:
            # One line per SUBSCRIBE, not per channel: a client may ask for 200 a message, 20 messages
            # a second, and each line is a write to stderr from the event loop.
            event(
                "ws.subscribe_denied",
                level="warning",
                clientId=conn.id,
                userId=conn.user_id,
                channel=denied[0][0],
                code=denied[0][1],
                refused=len(denied),
                channels=[name for name, _ in denied[:LOGGED_REFUSALS]],
            )
        wants_last = last and self.last_values is not None
        # From before this worker's recent window (it started after the page was rendered: a deploy),
        # but not by more than its size: the broadcasts after ``since`` are read back from the store.
        stream = self.stream
        backfill = (
            since is not None and stream is not None and since[0] == stream.epoch and stream.can_backfill(since[1])
        )
        if wants_last or backfill:
            # What the answer needs is in the store: read it in a greenlet, and hold this
            # connection's later messages until this one is answered.
            conn.backlog = []
            conn.defer(self._subscribe_from_store, conn, allowed, since, backfill, wants_last)
            return
        self._take(conn, allowed, {}, since)

    def _subscribe_from_store(
        self, conn: Connection, names: list[str], since: tuple[str, int] | None, backfill: bool, last: bool
    ) -> None:
        """Deferred (may wait): extend the recent window back to ``since`` if ``backfill``, fetch each
        channel's last value if ``last``, then subscribe and answer."""
        found = None
        if last:
            assert self.last_values is not None
            found = self.last_values.fetch(names)  # waits on the store
        if backfill:
            # Last, with no other wait before the answer: a broadcast in between could trim what was read
            # back (the window is past its size for a moment).
            assert self.stream is not None and since is not None
            try:
                self.stream.backfill(since[1])  # once for every connection that needs it, like resumes
            except Exception as problem:  # the store is away: SUBSCRIBED says nothing could be replayed
                log.warning("reading back the broadcasts after a SUBSCRIBE since failed: %s", problem)
        if conn.state == "open":
            # No pause from here until SUBSCRIBED: the newest value is chosen and sent before any
            # live frame of these channels can be, so a last value never follows a newer one.
            # And authorized again: the user may have moved clinic while the store answered
            # (Realtime.apply_identity), which re-checked the channels held, not these.
            still = [name for name in names if self._still_allowed(conn, name)]
            who = (conn.user_id, conn.role, conn.clinic_id)
            values = self.last_values.settle(found, who) if found is not None and self.last_values is not None else {}
            self._take(conn, still, values, since)
        self._answer_backlog(conn)

    def _still_allowed(self, conn: Connection, name: str) -> bool:
        refusal = channel_rules.refusal(conn, name)
        if refusal is not None:
            self.error(conn, refusal, f"you may no longer subscribe to {name!r}", channel=name, now=False)
        return refusal is None

    def _answer_backlog(self, conn: Connection) -> None:
        waiting, conn.backlog = conn.backlog or [], None
        for index, text in enumerate(waiting):
            if conn.state != "open":
                return
            self._handle(conn, text)
            if conn.backlog is not None:  # that one waits on the store too: the rest wait behind it
                conn.backlog.extend(waiting[index + 1 :])
                return

    def _take(self, conn: Connection, allowed: list[str], last: dict, since: tuple[str, int] | None = None) -> None:
        """Subscribe to already-authorized channels, send their last values (and, with ``since``, what
        they add after it), answer SUBSCRIBED.

        A channel already held gets its last value too: the page's second subscriber of a channel
        (one more fragment showing the queue) asks for it, and the first gets a repeat it can
        tell by ``"last": true``."""
        # A fan-out pausing (its offset is the position, not yet delivered) took its recipients before this
        # SUBSCRIBE: if this connection is not among them, what it sends that the channels taken now add
        # would never come, and the next PONG, past it, would say it had been (a SUBSCRIBE since replays it).
        not_a_recipient = self.stream is not None and self.hub.sending_to(conn) is False
        missed_fan_out = since is None and not_a_recipient
        # What this connection was sent (or, taken earlier in the same pause, replayed) for the channels it
        # holds already: a second SUBSCRIBE in one pause adds only what its own channels do.
        held = frozenset(conn.channels)
        taken, over = self.hub.subscribe(conn, allowed, self.max_subscriptions)
        for name in over:
            self.error(
                conn,
                Error.TOO_MANY_SUBSCRIPTIONS,
                f"a connection may hold at most {self.max_subscriptions} subscriptions",
                channel=name,
                now=False,
            )
        answer: dict = {"channels": taken}
        replay: list[Envelope] | str | None = None
        newest_shown = None  # with a replay, a last value newer than ``since`` comes with it, in order
        caught_up = False
        new = [name for name in taken if name not in held]
        if since is not None:
            replay = self._replay(conn, held, since)
            if isinstance(replay, list):
                answer["recovered"], newest_shown = True, since[1]
                # From here its channels have everything after ``since``: another SUBSCRIBE since (a page's
                # second, with "last") replays only what its own channels add, not all of this again.
                _sent_everything_after(conn, new, since[1], held_too=True)
            else:
                answer.update(recovered=False, reason=replay)
        elif missed_fan_out and taken and self.stream is not None and self.stream.epoch is not None:
            # Sent before this answer, as a replay's frames are (a last value it brings comes with it, in
            # order, not before it); nothing from before the connection joined (one admitted meanwhile).
            start = max(self.stream.delivered, conn.sent_after)
            caught = self._replay(conn, held, (self.stream.epoch, start))
            if isinstance(caught, list):
                caught_up = True
                if caught:
                    replay, newest_shown = caught, start
        if new and answer.get("recovered") is not True and self.stream is not None and self.stream.epoch is not None:
            # Taken without a replay from before: a later SUBSCRIBE since must not count what came before as
            # sent through them. A paused fan-out's broadcast (at the position) came with it if this
            # connection was among its recipients or it was caught up above; if neither, it never will.
            through = self.stream.position if not_a_recipient and not caught_up else self.stream.delivered
            _sent_everything_after(conn, new, through, held_too=False)
        for name in taken:
            envelope = last.get(name)
            if envelope is not None and (newest_shown is None or (envelope.offset or 0) <= newest_shown):
                conn.push(envelope.last_frame())  # meant for this connection (LastValues.settle)
        if isinstance(replay, list) and replay:
            conn.push_owed([envelope.frame() for envelope in replay])
        if taken:
            event("ws.subscribe", clientId=conn.id, userId=conn.user_id, channels=taken)
            if self.sessions is not None:
                self.sessions.changed(conn)
        self._tell_position(answer)
        conn.send_now(encode("SUBSCRIBED", answer))

    def _replay(self, conn: Connection, held: frozenset[str], since: tuple[str, int]) -> list[Envelope] | str:
        """The broadcasts after ``since`` meant for this connection that it was not sent: from before
        ``sent_after`` (it joined, a recovered resume's offset, or an earlier replay's ``since``), and those
        the channels just taken add (the channels it ``held`` and its user, role and clinic brought it the
        others, each channel taken late only after its offset in ``Connection.late``); from the recent
        window, or why not (a :class:`relay.recovery.Reason`).

        For a page rendered at ``since``: what was broadcast between the render and its subscription,
        which it would otherwise never see. Live frames may have reached the client before these
        (realtime.js holds them until SUBSCRIBED and puts them in order). Called with no pause
        between the subscription and the answer: everything up to ``Sequencer.position`` is
        replayed, and later ones come live."""
        stream = self.stream
        epoch, offset = since
        if stream is None or stream.epoch is None:
            return Reason.DISABLED
        if epoch != stream.epoch:
            return Reason.EPOCH
        recent = stream.recent_after(offset)
        if recent is None:  # from before this worker's window (a worker started since the render)
            return Reason.GONE
        # Paid for in the rate limit (it may go below zero: the messages after it wait), so that a client
        # that sends since again and again is slowed down as one that sends anything too fast.
        conn.rate_tokens -= min(SINCE_MOST_MESSAGES, len(recent) // SINCE_SCANNED_PER_MESSAGE)
        who = (conn.user_id, conn.role, conn.clinic_id)
        # Held channels taken late (see Connection.late), by the offset each was sent everything after: an
        # envelope at or below it was not sent through it. The window is in offset order, so the set of
        # those not sent through only shrinks as it goes.
        late = sorted((after, name) for name, after in (conn.late or {}).items() if name in held)
        passed = 0
        not_yet = frozenset(name for _, name in late)
        # Per audience (envelopes share interned filters, see Prepared.replay) and channels not yet sent
        # through: (meant for it, sent live once it had joined).
        verdicts: dict[object, tuple[bool, bool]] = {}
        replay = []
        for envelope in recent:
            flt = envelope.filter
            at = envelope.offset or 0
            if passed < len(late) and late[passed][0] < at:
                while passed < len(late) and late[passed][0] < at:
                    passed += 1
                not_yet = frozenset(name for _, name in late[passed:])
            key: object = (id(flt), not_yet) if not_yet else id(flt)
            verdict = verdicts.get(key)
            if verdict is None:
                sent_through = held - not_yet if not_yet else held
                verdict = verdicts[key] = (flt.admits(*who, conn.channels), flt.admits(*who, sent_through))
            meant, sent = verdict
            if meant and not (sent and at > conn.sent_after):
                replay.append(envelope)
                if len(replay) > self.max_replay:
                    return Reason.TOO_MANY
        return replay

    def _unsubscribe(self, conn: Connection, data: object) -> None:
        names = self._channel_list(conn, data)
        if names is None:
            return
        removed = self.hub.unsubscribe(conn, names)
        if conn.late:
            for name in removed:
                conn.late.pop(name, None)
        if removed and self.sessions is not None:
            self.sessions.changed(conn)
        conn.send_now(encode("UNSUBSCRIBED", {"channels": removed}))

    # -- limits ----------------------------------------------------------------------

    def _within_rate(self, conn: Connection) -> bool:
        """Token bucket per connection: ``rate_burst`` at once, ``rate_per_second`` sustained."""
        now = self.clock()
        if conn.rate_at == 0.0:
            conn.rate_tokens = float(self.rate_burst)
        else:
            conn.rate_tokens = min(self.rate_burst, conn.rate_tokens + (now - conn.rate_at) * self.rate_per_second)
        conn.rate_at = now
        if conn.rate_tokens >= 1.0:
            conn.rate_tokens -= 1.0
            return True
        self._rate_limited(conn, "too many messages; slow down")
        return False

    def _rate_limited(self, conn: Connection, message: str, **fields: object) -> None:
        """ERROR rate_limited, then close 1008."""
        self.error(conn, Error.RATE_LIMITED, message, now=False)
        conn.close(Close.POLICY_VIOLATION, "rate limit exceeded")
        event("ws.rate_limited", level="warning", clientId=conn.id, userId=conn.user_id, **fields)

    def _channel_list(self, conn: Connection, data: object) -> list[str] | None:
        """``data.channels`` as a de-duplicated list, or None after answering ERROR."""
        channels = data.get("channels") if isinstance(data, dict) else None
        if (
            not isinstance(channels, list)
            or len(channels) > MAX_CHANNELS_PER_REQUEST
            or not all(isinstance(name, str) for name in channels)
            or jsonsafe.problem(channels) is not None  # a name no frame can carry back (in an ERROR)
        ):
            self.error(
                conn,
                Error.INVALID_DATA,
                f'"data" must be {{"channels": [names]}} with at most {MAX_CHANNELS_PER_REQUEST} names',
            )
            return None
        return list(dict.fromkeys(channels))

    def error(self, conn: Connection, code: str, message: str, *, now: bool = True, **extra: object) -> None:
        """Send ``ERROR {code, message, **extra}`` and count it. ``now``: write it at once (a reply);
        otherwise it is queued behind what the connection is already owed."""
        frame = error_frame(code, message, **extra)
        if now:
            conn.send_now(frame)
        else:
            conn.push(frame)
        if self.telemetry is not None:
            self.telemetry.client_error(code)
