"""Resume: a reconnecting client gets every broadcast it missed, once and in order, or is told to refetch.

A client that lost its connection comes back with
``/ws?token=T&resume=<its previous clientId>&epoch=<E>&offset=<last offset it processed>``.
The session is restored only when every condition holds; otherwise the
client is told ``recovered: false`` and why (:class:`Reason`), nothing is
restored, and it must subscribe again and refetch its state. Never a partial
recovery: either every missed broadcast is replayed, or none.

The work is split in two, around the event-loop rule:

1. :meth:`Recovery.prepare` runs in the upgrade request's greenlet and may
   wait: it loads the session, checks the epoch, and reads the missed
   broadcasts up to this worker's position ``H`` (from the sequencer's
   recent window, else from the history store);
2. :meth:`Prepared.replay` runs with no pause before the connection joins
   the hub: it adds what was delivered after ``H`` meanwhile (always in the
   recent window), so that the replay ends exactly where live delivery
   starts: nothing duplicated, nothing skipped. It checks the epoch again:
   a stream that started over while step 1 waited refuses the resume
   (``epoch_changed``) rather than replay the new stream's offsets as the old.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import gevent

from .envelope import Envelope, Filter
from .history import History, Session
from .sequencer import Sequencer
from .sessions import SessionKeeper
from .timeslice import pause

log = logging.getLogger("relay.recovery")
_CLIENT_ID = re.compile(r"[0-9a-f-]{1,64}")
_EPOCH = re.compile(r"[0-9A-Za-z_-]{1,64}")
_OFFSET = re.compile(r"[0-9]{1,18}")  # ASCII digits: str.isdigit() also takes '²', which int() refuses
READ_PAGE = 1000
Admits = Callable[[Filter], bool]  # would this connection receive a broadcast with this filter?
AdmitsWith = Callable[[Filter, list[str]], bool]  # ...if it held these channels?


class Reason:
    """Why a resume was refused (``CONNECTED.data.reason``); the client subscribes again and refetches."""

    DISABLED = "disabled"  # WS_RECOVERY_WINDOW_MS=0: this deployment keeps no history
    INVALID = "invalid_position"  # resume, epoch or offset missing or malformed
    NO_SESSION = "no_session"  # unknown, expired, already resumed, or another user's
    EPOCH = "epoch_changed"  # the stream's history was lost since (Redis flushed, store deleted)
    GONE = "history_gone"  # the missed broadcasts are older than the window
    TOO_MANY = "too_many_missed"  # more than WS_RECOVERY_MAX_MESSAGES missed
    UNAVAILABLE = "unavailable"  # the history store did not answer


@dataclass(frozen=True)
class ResumeRequest:
    client_id: str
    epoch: str
    offset: int


def resume_request(args: Mapping[str, str]) -> ResumeRequest | str | None:
    """The resume a client asked for: None when it asked none, a Reason when it asked badly."""
    client_id = args.get("resume")
    if client_id is None:
        return None
    epoch, offset = args.get("epoch", ""), args.get("offset", "")
    if not _CLIENT_ID.fullmatch(client_id) or not _EPOCH.fullmatch(epoch) or not _OFFSET.fullmatch(offset):
        return Reason.INVALID
    return ResumeRequest(client_id, epoch, int(offset))


def split_by_refusal(
    names: Iterable[str], refusal: Callable[[str], str | None]
) -> tuple[list[str], list[tuple[str, str]]]:
    """The channels a session may restore, and (channel, error code) for each it may no longer hold."""
    kept: list[str] = []
    refused: list[tuple[str, str]] = []
    for name in names:
        why = refusal(name)
        if why is None:
            kept.append(name)
        else:
            refused.append((name, why))
    return kept, refused


@dataclass
class Prepared:
    """A resume that may go ahead: the restored channels and the missed broadcasts read so far."""

    session: Session
    channels: list[str]
    refused: list[tuple[str, str]]  # (channel, error code): restored no more, for the user as they are now
    epoch: str  # the stream the client's offset and everything read here belong to
    # From the recent window, every broadcast after the offset (the window's own envelopes); read from
    # the store, only those meant for the connection as it was when prepared (a resume from far back
    # would otherwise hold the whole range). The replay filters again, for the connection as it joins.
    missed: list[Envelope] = field(default_factory=list)
    read_upto: int = 0
    after: int = 0  # the client's offset: the replay is everything after it (for the connection as it joins)

    def replay(self, sequencer: Sequencer, admits: Admits, max_messages: int) -> list[Envelope] | str:
        """Every missed broadcast this connection would have received, through the sequencer's
        current position. Call with no pause between this and joining the hub."""
        # The stream may have been reset while prepare() waited (a store that lost its history):
        # the offsets read so far then count in another stream, and a replay of them would be wrong.
        if sequencer.epoch != self.epoch:
            return Reason.EPOCH
        delta = sequencer.recent_after(self.read_upto)
        if delta is None:  # cannot happen while the recent window outlasts a read; refuse rather than skip
            return Reason.UNAVAILABLE
        # Decided once per audience: envelopes share interned filters (relay.envelope.interned), and an
        # id() is unique while the envelopes that hold the filters are alive, as they are here.
        verdicts: dict[int, bool] = {}
        replay = []
        for envelope in (*self.missed, *delta):
            if envelope.epoch != self.epoch:  # read from the store after it started over
                return Reason.EPOCH
            flt = envelope.filter
            admitted = verdicts.get(id(flt))
            if admitted is None:
                admitted = verdicts[id(flt)] = admits(flt)
            if admitted:
                replay.append(envelope)
        return Reason.TOO_MANY if len(replay) > max_messages else replay


class Recovery:
    def __init__(
        self,
        history: History | None,
        sequencer: Sequencer,
        sessions: SessionKeeper | None,
        *,
        max_messages: int,
        catch_up_timeout: float = 1.0,
        session_wait: float = 0.5,
    ):
        self.history = history
        self.sequencer = sequencer
        self.sessions = sessions
        self.max_messages = max_messages
        self.catch_up_timeout = catch_up_timeout
        self.session_wait = session_wait
        self.recovered = 0
        self.not_recovered: dict[str, int] = {}
        self._preparing: set[str] = set()  # sessions a socket is resuming right now

    def count(self, outcome: Prepared | str | None) -> None:
        """Count a resume's outcome for /health: recovered, or not and why."""
        if isinstance(outcome, Prepared):
            self.recovered += 1
        else:
            reason = outcome or Reason.INVALID
            self.not_recovered[reason] = self.not_recovered.get(reason, 0) + 1

    def prepare(
        self, request: ResumeRequest, user_id: str, refusal: Callable[[str], str | None], admits: AdmitsWith
    ) -> Prepared | str:
        """Check the session and read what the client missed (may wait; never in an event-loop callback).

        ``refusal(channel)`` says why the user may no longer read a channel;
        ``admits(filter, channels)`` whether a broadcast was meant for this
        connection with those channels.
        """
        if self.history is None or self.sessions is None:
            return Reason.DISABLED
        # The epoch first: a position in a lost stream means nothing, whatever else survived.
        if request.epoch != self.sequencer.epoch:
            return Reason.EPOCH
        if request.client_id in self._preparing:
            # Another socket is resuming this session: only one can have it (the admission takes it
            # with no pause after this returns), and each would read the missed broadcasts for nothing.
            return Reason.NO_SESSION
        self._preparing.add(request.client_id)
        try:
            return self._prepare(request, user_id, refusal, admits)
        finally:
            self._preparing.discard(request.client_id)

    def _prepare(
        self, request: ResumeRequest, user_id: str, refusal: Callable[[str], str | None], admits: AdmitsWith
    ) -> Prepared | str:
        try:
            session = self._session(request.client_id)
        except Exception:
            return Reason.UNAVAILABLE
        if session is None or session.user_id != user_id:
            return Reason.NO_SESSION
        try:
            reached = self._reach(request.offset)
        except Exception as problem:  # the store is away: whether the stream had that offset cannot be told
            log.warning("catching up for a resume failed: %s", problem)
            return Reason.UNAVAILABLE
        if not reached:
            return Reason.INVALID  # an offset this stream never had
        channels, refused = split_by_refusal(session.channels, refusal)
        prepared = Prepared(
            session, channels, refused, request.epoch, read_upto=self.sequencer.position, after=request.offset
        )
        recent = self.sequencer.recent_after(request.offset)
        if recent is None:  # from before this worker began (a restart): read it once for everyone
            try:
                self.sequencer.backfill(request.offset)
            except Exception:
                return Reason.UNAVAILABLE
            prepared.read_upto = self.sequencer.position
            recent = self.sequencer.recent_after(request.offset)
        if recent is not None:
            # Read with no pause since read_upto was taken, so none is past it; checked, not assumed.
            past = bool(recent) and recent[-1].place > prepared.read_upto
            prepared.missed = [e for e in recent if e.place <= prepared.read_upto] if past else recent
        else:
            missed = self._read(request.offset, prepared.read_upto, lambda flt: admits(flt, channels))
            if isinstance(missed, str):
                return missed
            prepared.missed = missed
        return prepared

    def _session(self, client_id: str) -> Session | None:
        """The session, from this worker or the store. A client that left a draining worker may be back
        before that worker has written its session: look again for a moment before saying there is none."""
        assert self.history is not None and self.sessions is not None
        deadline = time.monotonic() + self.session_wait
        while True:
            if self.sessions.taken(client_id):  # already resumed (here): the store may not know yet
                return None
            session = self.sessions.pending(client_id) or self.history.load_session(client_id)
            if session is not None or time.monotonic() > deadline:
                return session
            gevent.sleep(0.05)

    def _reach(self, offset: int) -> bool:
        """Wait (briefly) until this worker has delivered ``offset``: the client may come from a worker that
        was ahead of this one. Then, if it is still behind (its listener may be reconnecting: the
        follower notices within seconds), read what it lacks from the history, once. False if the
        stream never had that offset; raises if the history cannot be read."""
        deadline = time.monotonic() + self.catch_up_timeout
        while offset > self.sequencer.position:
            if time.monotonic() > deadline:
                self.sequencer.catch_up_once()
                return offset <= self.sequencer.position
            gevent.sleep(0.01)
        return True

    def _read(self, after: int, upto: int, admits: Admits) -> list[Envelope] | str:
        """What ``admits`` of the history from ``after`` to ``upto`` (or a Reason): no offset may be
        missing, and no more than ``max_messages`` may be admitted."""
        assert self.history is not None
        try:
            oldest = self.history.oldest()
            if after < upto and (oldest is None or oldest > after + 1):
                return Reason.GONE
            missed: list[Envelope] = []
            cursor = after
            while cursor < upto:
                page = self.history.read(cursor, READ_PAGE)
                if not page:
                    return Reason.GONE
                for envelope in page:
                    if envelope.place > upto:
                        return missed
                    if envelope.place != cursor + 1:  # trimmed since oldest() was read, or a hole: not whole
                        return Reason.GONE
                    cursor = envelope.place
                    if admits(envelope.filter):
                        missed.append(envelope)
                        if len(missed) > self.max_messages:
                            return Reason.TOO_MANY
                pause()
        except Exception:
            return Reason.UNAVAILABLE
        return missed

    def status(self) -> dict:
        return {"recovered": self.recovered, "notRecovered": dict(self.not_recovered)}
