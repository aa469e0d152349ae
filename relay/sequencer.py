"""The sequencer: this worker's hub receives broadcasts in offset order, each exactly once.

Broadcasts reach a worker from two directions: the ones it accepted itself
(delivered at once, without a trip through Redis) and everyone else's (from
the broker's listener). Across workers they can arrive out of order (A takes
offset 5, B offset 6, B's message arrives first), and a listener that lost
its Redis connection misses some altogether. A client that saw 6 before 5
would resume after 6 and never get 5, so the hub must see offsets in order:

- an envelope that is next (``position + 1``) is delivered at once, and then
  every parked one that follows it;
- an envelope from further ahead is parked; if the gap is still open after
  ``gap_timeout``, the missing offsets are read from the history (they are
  there: a broadcast is in the history before anyone publishes it), and an
  offset the history no longer has is skipped, loudly;
- an offset at or below ``position`` is a duplicate and is not delivered again.

``position`` moves to an envelope's offset *before* its fan-out takes the
recipients' snapshot, so a connection admitted while a fan-out pauses is told
that offset as its start (``CONNECTED.offset``) and, consistently, does not
get it live. The last ``recent`` envelopes delivered are kept for resumes and
last values (``recent_after``).

:meth:`offer` never waits for other broadcasts; what it returns tells when
this one was delivered, and to how many connections. It may be called from
any greenlet, never from an event-loop callback (a fan-out yields).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import gevent
from gevent.event import AsyncResult

from .envelope import Envelope
from .eventlog import event

log = logging.getLogger("relay.sequencer")

Fetch = Callable[[int, int], list[Envelope]]  # (after, limit) -> envelopes with offsets above ``after``


class Sequencer:
    def __init__(
        self,
        deliver: Callable[[Envelope], int],
        fetch: Fetch,
        *,
        on_reset: Callable[[str], None],
        gap_timeout: float = 0.2,
        recent: int = 4096,
        recent_bytes: int = 16 << 20,
    ):
        self.epoch: str | None = None
        self.position = 0  # the last offset delivered here
        self.skipped = 0  # offsets given up on (not in the history any more)
        self._deliver = deliver
        self._fetch = fetch
        self._on_reset = on_reset
        self.gap_timeout = gap_timeout
        self._parked: dict[int, tuple[Envelope, AsyncResult]] = {}
        self._draining = False
        self._gap: gevent.Greenlet | None = None
        self._recent: deque[tuple[Envelope, int]] = deque()
        self._recent_max = recent
        self._recent_bytes_max = recent_bytes
        self._recent_bytes = 0

    # -- positions ----------------------------------------------------------------------------

    def prime(self, epoch: str, head: int) -> None:
        """Start from the stream's head: what came before was delivered by someone else, or to no one."""
        self.epoch, self.position = epoch, head

    def restart(self, epoch: str, head: int) -> None:
        """The store says the stream has a new epoch (its history was lost): start over there."""
        self._reset(epoch, head)

    @property
    def primed(self) -> bool:
        return self.epoch is not None

    def recent_after(self, offset: int) -> list[Envelope] | None:
        """Delivered envelopes with offsets above ``offset``, or None if they are not all still kept here."""
        if offset >= self.position:
            return []
        if not self._recent or self._recent[0][0].offset > offset + 1:  # type: ignore[operator]
            return None
        return [envelope for envelope, _ in self._recent if envelope.offset > offset]  # type: ignore[operator]

    # -- delivery -------------------------------------------------------------------------------

    def offer(self, envelope: Envelope) -> AsyncResult:
        """Deliver ``envelope`` in its turn; the result is how many connections took it (0 for a duplicate)."""
        result = AsyncResult()
        offset = envelope.offset
        if offset is None or envelope.epoch is None:
            raise ValueError("only envelopes placed in the stream can be sequenced")
        if envelope.epoch != self.epoch:
            self._reset(envelope.epoch, offset - 1)
        if offset <= self.position or offset in self._parked:
            result.set(self._count_of(offset))
            return result
        self._parked[offset] = (envelope, result)
        if not self._draining:
            self._drain()
        if self._parked and self._gap is None:
            self._gap = gevent.spawn_later(self.gap_timeout, self._fill)
        return result

    def catch_up(self) -> None:
        """Deliver whatever the history has beyond ``position`` (after a listener was away)."""
        for _ in range(1000):  # bounded: 1000 pages of 500
            missing = self._fetch(self.position, 500)
            if not missing:
                return
            for envelope in missing:
                self.offer(envelope)
            if len(missing) < 500:
                return

    def _drain(self) -> None:
        self._draining = True
        try:
            while True:
                item = self._parked.pop(self.position + 1, None)
                if item is None:
                    return
                envelope, result = item
                self.position = envelope.offset  # type: ignore[assignment]  # placed: offer checked
                try:
                    count = self._deliver(envelope)
                except Exception:
                    log.exception("delivering offset %s failed", envelope.offset)
                    count = 0
                self._remember(envelope, count)
                result.set(count)
        finally:
            self._draining = False

    def _fill(self) -> None:
        """The gap timer: read what never arrived from the history, or give it up."""
        self._gap = None
        if not self._parked or self._draining:
            if self._parked:
                self._gap = gevent.spawn_later(self.gap_timeout, self._fill)
            return
        first = min(self._parked)
        try:
            missing = self._fetch(self.position, first - self.position - 1)
        except Exception as problem:  # the store is down: try again later
            log.warning("cannot fill the gap before offset %s yet: %s", first, problem)
            self._gap = gevent.spawn_later(self.gap_timeout * 5, self._fill)
            return
        for envelope in missing:
            if envelope.epoch == self.epoch and self.position < envelope.offset < first:  # type: ignore[operator]
                self._parked.setdefault(envelope.offset, (envelope, AsyncResult()))  # type: ignore[arg-type]
        if self.position + 1 not in self._parked:
            lost = first - self.position - 1
            event("sequencer.gap_skipped", level="error", after=self.position, upto=first - 1, count=lost)
            self.skipped += lost
            self.position = first - 1
        self._drain()
        if self._parked and self._gap is None:
            self._gap = gevent.spawn_later(self.gap_timeout, self._fill)

    def _reset(self, epoch: str, position: int) -> None:
        """The stream's history was lost (a new epoch): start over from the new stream."""
        if self.epoch is not None:
            event("stream.epoch_changed", level="error", old=self.epoch, new=epoch)
        for _, result in self._parked.values():
            result.set(0)
        self._parked.clear()
        self._recent.clear()
        self._recent_bytes = 0
        old = self.epoch
        self.epoch, self.position = epoch, position
        if old is not None:
            self._on_reset(epoch)

    # -- the recent window ----------------------------------------------------------------------

    def _remember(self, envelope: Envelope, count: int) -> None:
        self._recent.append((envelope, count))
        self._recent_bytes += len(envelope.frame())
        while len(self._recent) > self._recent_max or self._recent_bytes > self._recent_bytes_max:
            old, _ = self._recent.popleft()
            self._recent_bytes -= len(old.frame())

    def _count_of(self, offset: int) -> int:
        """How many took an offset already delivered here (0 if it is no longer remembered)."""
        for envelope, count in reversed(self._recent):
            if envelope.offset == offset:
                return count
            if envelope.offset < offset:  # type: ignore[operator]
                break
        return 0
