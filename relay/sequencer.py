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
- an offset at or below ``position`` is a duplicate and is not delivered again;
  but one whose id differs from the envelope delivered at that offset means
  the stream went back (a store restored from an older copy hands offsets
  out again): ``on_went_back`` is told, and the caller starts the stream over;
- a skipped offset was a broadcast this worker's clients never got:
  ``on_gap`` is told, and the caller makes them resume (and learn it).

``position`` moves to an envelope's offset *before* its fan-out takes the
recipients' snapshot, so a connection admitted while a fan-out pauses is told
that offset as its start (``CONNECTED.offset``) and, consistently, does not
get it live. ``delivered`` moves once the fan-out is done: what a PONG tells
a connection it has been sent everything up to. The last ``recent`` envelopes
delivered are kept for resumes and last values (``recent_after``).

:meth:`offer` never waits for other broadcasts; what it returns tells when
this one was delivered, and to how many connections. It may be called from
any greenlet, never from an event-loop callback (a fan-out yields).
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections.abc import Callable

import gevent
import gevent.lock
from gevent.event import AsyncResult

from .envelope import Envelope
from .eventlog import event

log = logging.getLogger("relay.sequencer")

Fetch = Callable[[int, int], list[Envelope]]  # (after, limit) -> envelopes with offsets above ``after``
FILL_PAGE = 500  # offsets read from the history per round of the gap timer


class Sequencer:
    def __init__(
        self,
        deliver: Callable[[Envelope], int],
        fetch: Fetch,
        *,
        on_reset: Callable[[str], None],
        on_gap: Callable[[int, int], None] = lambda after, upto: None,
        on_went_back: Callable[[str, int], None] = lambda epoch, offset: None,
        gap_timeout: float = 0.2,
        recent: int = 4096,
        recent_bytes: int = 16 << 20,
    ):
        self.epoch: str | None = None
        self.position = 0  # the last offset delivered here (set as its fan-out begins)
        # The last offset whose fan-out has finished: every broadcast up to it that a connection here is
        # to get is already in its queue (a PONG says so; see ClientProtocol). Not moved past a skipped
        # gap until its sockets are closed (the drain waits for on_gap).
        self.delivered = 0
        self.skipped = 0  # offsets given up on (not in the history any more)
        self._began = 0  # the position this worker started from (or its stream started over at)
        self._deliver = deliver
        self._fetch = fetch
        self._on_reset = on_reset
        self._on_gap = on_gap
        self._on_went_back = on_went_back
        self.gap_timeout = gap_timeout
        self._parked: dict[int, tuple[Envelope, AsyncResult]] = {}
        self._draining = False
        self._gap: gevent.Greenlet | None = None
        self._recent = RecentWindow(recent, recent_bytes)
        self._backfilling = gevent.lock.Semaphore()
        self._catching_up: AsyncResult | None = None  # the catch_up_once under way: its waiters get its result
        self._retired: list[str] = []  # epochs this worker left: a straggler of one must not bring it back

    # -- positions ----------------------------------------------------------------------------

    def prime(self, epoch: str, head: int) -> None:
        """Start from the stream's head: what came before was delivered by someone else, or to no one."""
        self.epoch, self.position, self.delivered, self._began = epoch, head, head, head

    def restart(self, epoch: str, head: int) -> None:
        """The store says the stream has a new epoch (its history was lost): start over there."""
        self._reset(epoch, head)

    def left(self, epoch: str) -> bool:
        """Whether this worker left ``epoch`` for a newer stream: a store that says it is the stream again
        came back from an older copy (and would hand out again offsets that were delivered)."""
        return epoch in self._retired

    @property
    def primed(self) -> bool:
        return self.epoch is not None

    def backfill(self, offset: int) -> None:
        """Extend the recent window back to ``offset`` from the history, once for many resumes.

        After a restart every client resumes from before this worker began:
        without this each would read (and parse, and encode) the same
        broadcasts from the store. The first one reads them into the window;
        the others, waiting on the same lock, find them there. A gap wider
        than the window is left to the caller. May wait: never from an
        event-loop callback.
        """
        with self._backfilling:
            epoch = self.epoch
            upto = self._backfill_upto(offset)
            if upto is None:
                return
            older: list[Envelope] = []
            cursor = offset
            for _ in range(100):  # bounded: pages of 500, at most the window's size in all
                page = [e for e in self._fetch(cursor, min(500, upto - cursor)) if _offset(e) <= upto]
                if not page:
                    break
                older.extend(page)
                cursor = _offset(page[-1])
                if cursor >= upto:
                    break
            # The reads waited: only if the window is still the one they extend (same stream, same start),
            # and only a run with no offset missing (pages read apart may straddle a trim).
            same_stream = self.epoch == epoch and all(e.epoch == epoch for e in older)
            whole = [_offset(e) for e in older] == list(range(offset + 1, upto + 1))
            if whole and same_stream and self._recent.first in (None, upto + 1):
                self._recent.prepend(older)

    def can_backfill(self, offset: int) -> bool:
        """Whether :meth:`backfill` would bring ``offset`` into the window of a worker started after it (a
        deploy): the window still begins where the worker began (nothing trimmed, nothing read back yet),
        by no more than its size after ``offset``. A busy worker's window, trimmed since, is not extended:
        the next broadcasts would trim what was read back before it was used."""
        first = self._recent.first
        untouched = first is None or first == self._began + 1
        return untouched and self._backfill_upto(offset) is not None

    def _backfill_upto(self, offset: int) -> int | None:
        """The last offset a backfill back to ``offset`` would read, or None if there is nothing to read:
        the window reaches back already, or the gap is wider than the window."""
        upto = self._recent.first - 1 if self._recent.first is not None else self.position
        return None if offset >= upto or upto - offset > self._recent.max_count else upto

    def recent_after(self, offset: int) -> list[Envelope] | None:
        """Delivered envelopes with offsets above ``offset``, or None if they are not all still kept here."""
        if offset >= self.position:
            return []
        if self._recent.last != self.position:  # a gap just skipped, nothing delivered past it yet
            return None
        return self._recent.after(offset)

    def delivered_id(self, offset: int) -> str | None:
        """The id of the envelope delivered here at ``offset``, if the recent window still holds it."""
        return self._recent.id_at(offset)

    # -- delivery -------------------------------------------------------------------------------

    def offer(self, envelope: Envelope) -> AsyncResult:
        """Deliver ``envelope`` in its turn; the result is how many connections took it (0 for a duplicate)."""
        result = AsyncResult()
        offset = envelope.offset
        if offset is None or envelope.epoch is None:
            raise ValueError("only envelopes placed in the stream can be sequenced")
        if envelope.epoch in self._retired:  # accepted just before its stream started over: gone with it
            result.set(0)
            return result
        if envelope.epoch != self.epoch:
            self._reset(envelope.epoch, offset - 1)
        if offset <= self.position or offset in self._parked:
            held = self._parked[offset][0].id if offset in self._parked else self._recent.id_at(offset)
            if held is not None and held != envelope.id:  # one offset, two broadcasts: the stream went back
                self._on_went_back(envelope.epoch, offset)
            result.set(self._recent.count_of(offset, envelope.id))
            if self._parked and self._gap is None:  # whatever is parked is never left without its timer
                self._gap = gevent.spawn_later(self.gap_timeout, self._fill)
            return result
        self._parked[offset] = (envelope, result)
        if not self._draining:
            self._drain()
        if self._parked and self._gap is None:
            self._gap = gevent.spawn_later(self.gap_timeout, self._fill)
        return result

    def catch_up_once(self) -> None:
        """:meth:`catch_up` by one greenlet at a time: one that comes while it runs waits for it and does not
        read again (a reconnect storm's resumes, each finding this worker behind), and raises what it raised."""
        running = self._catching_up
        if running is not None:
            running.get()  # raises what it raised
            return
        running = self._catching_up = AsyncResult()
        try:
            self.catch_up()
        except Exception as problem:
            running.set_exception(problem)
            raise
        else:
            running.set(None)
        finally:
            self._catching_up = None

    def catch_up(self) -> None:
        """Deliver whatever the history has beyond ``position`` (after a listener was away). May wait."""
        stalled = False
        for _ in range(1000):  # bounded: 1000 pages of 500
            before = self.position
            missing = self._fetch(before, 500)
            if not missing:
                return
            for envelope in missing:
                self.offer(envelope)
            if len(missing) < 500:
                return
            if self.position == before:
                # The page starts past a gap, so it is parked: reading it again would not help. The gap
                # timer fills or skips the gap; go on once it has (or leave it to the next catch-up).
                if stalled:
                    return
                stalled = True
                gevent.sleep(self.gap_timeout * 2)
            else:
                stalled = False

    def _drain(self) -> None:
        self._draining = True
        try:
            while True:
                item = self._parked.pop(self.position + 1, None)
                if item is None:
                    return
                envelope, result = item
                # Both before the fan-out's first pause: a connection admitted meanwhile starts after this
                # offset, and a resume finishing meanwhile finds this envelope in the recent window.
                self.position = _offset(envelope)
                kept = self._recent.add(envelope)
                try:
                    count = self._deliver(envelope)
                    # The position, not this offset: a new epoch may have begun while the fan-out paused
                    # (_reset), and a PONG must not tell its clients an offset of the old stream.
                    self.delivered = self.position
                except Exception:
                    log.exception("delivering offset %s failed", envelope.offset)
                    count = 0
                kept.count = count
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
        epoch, after, first = self.epoch, self.position, min(self._parked)
        wanted = min(first - after - 1, FILL_PAGE)  # a page at a time: a long outage can leave 200,000
        try:
            missing = self._fetch(after, wanted)
        except Exception as problem:  # the store is down: try again later
            log.warning("cannot fill the gap before offset %s yet: %s", first, problem)
            self._gap = gevent.spawn_later(self.gap_timeout * 5, self._fill)
            return
        # The read waited, and offers meanwhile may have closed the gap, delivered past it or started
        # a new stream: use what was read only for what is still missing, and skip only a gap this
        # read covered (the position unmoved), never one that opened while it waited.
        later = 0 if len(missing) == wanted == FILL_PAGE else self.gap_timeout  # a full page: the next at once
        if self.epoch == epoch and any(envelope.epoch != epoch for envelope in missing):
            later = self.gap_timeout * 5  # the stream started over: no gap; its first broadcast here resets us
        elif self.epoch == epoch:
            for envelope in missing:
                if envelope.epoch == epoch and _offset(envelope) > self.position:
                    self._parked.setdefault(_offset(envelope), (envelope, AsyncResult()))
            if self.position == after and self._parked and self.position + 1 not in self._parked:
                first = min(self._parked)
                lost = first - self.position - 1
                event("sequencer.gap_skipped", level="error", after=self.position, upto=first - 1, count=lost)
                self.skipped += lost
                self.position = first - 1
                # Before the drain, and with offers made meanwhile held (closing pauses): a client must not
                # get what follows the gap, or its position would be past it and a resume would call it whole.
                self._draining = True
                try:
                    self._on_gap(after, first - 1)
                except Exception:
                    log.exception("handling the gap after offset %s failed", after)
                finally:
                    self._draining = False
        if not self._draining:
            self._drain()
        if self._parked and self._gap is None:
            self._gap = gevent.spawn_later(later, self._fill)

    def _reset(self, epoch: str, position: int) -> None:
        """The stream's history was lost (a new epoch): start over from the new stream."""
        if self.epoch is not None:
            event("stream.epoch_changed", level="error", old=self.epoch, new=epoch)
        for _, result in self._parked.values():
            result.set(0)
        self._parked.clear()
        self._recent.clear()
        old = self.epoch
        self.epoch, self.position, self.delivered, self._began = epoch, position, position, position
        if epoch in self._retired:  # told it is the stream (the service starts one it left over instead)
            self._retired.remove(epoch)
        if old is not None:
            self._retired = [*self._retired[-7:], old]
            self._on_reset(epoch)


def _offset(envelope: Envelope) -> int:
    """The offset of an envelope the history placed (only such envelopes are sequenced)."""
    assert envelope.offset is not None
    return envelope.offset


# What one value of a broadcast's filter holds in memory (a str and its set entry: 1,000 user ids ~120 KB).
FILTER_VALUE_BYTES = 120
# What a broadcast's parsed data holds per `,`, `[` or `{` of its frame, on top of the frame's own
# length (its strings): a list, a dict, a number or an entry of one takes 30-300 bytes in Python for
# 1-10 bytes of JSON. Measured with tracemalloc: this comes within 0.9-2x of frame and data together
# for data whose strings hold few of those characters (text, numbers, objects, nested and empty lists;
# a queue of 20 rows 1.75x), and a 64 KiB body of empty lists parses into ~1.9 MB, which the frame
# alone counted as 90 KB. Strings full of them (CSV text: ~12x) are counted as if each were a value:
# such broadcasts take more of the window than they hold, never less.
DATA_VALUE_BYTES = 64
_PUNCTUATION = b",[{"


def _weight(envelope: Envelope) -> int:
    """What the recent window counts an envelope as: its frame, its parsed data (estimated from the
    frame, see DATA_VALUE_BYTES), and its filter's values. Once per envelope: well under a µs for a
    frame of a few hundred bytes, ~40 µs at the 64 KiB bound."""
    frame = envelope.frame()
    values = len(frame) - len(frame.translate(None, _PUNCTUATION))
    return 2 * len(frame) + DATA_VALUE_BYTES * values + FILTER_VALUE_BYTES * envelope.filter.size


class Kept:
    """One envelope of the recent window: how many connections took it, and what it is counted as."""

    __slots__ = ("envelope", "count", "weight")

    def __init__(self, envelope: Envelope):
        self.envelope, self.count, self.weight = envelope, 0, _weight(envelope)


class RecentWindow:
    """The last envelopes delivered here, in offset order, with how many connections took each.

    Bounded by count and by bytes (their frames, their parsed data and their audiences' lists: a
    broadcast to 1,000 user ids holds ~120 KB for a frame of a few hundred bytes, measured; counted
    by frames alone, 4,096 of them held 490 MB); searched by offset in O(log n), because a reconnect
    storm asks once per resuming client.
    """

    def __init__(self, count: int, nbytes: int):
        self.max_count, self.max_bytes = count, nbytes
        self._offsets: list[int] = []
        self._kept: list[Kept] = []  # parallel to _offsets
        self._bytes = 0

    def add(self, envelope: Envelope) -> Kept:
        kept = Kept(envelope)
        self._offsets.append(_offset(envelope))
        self._kept.append(kept)
        self._bytes += kept.weight
        if len(self._kept) > self.max_count + 256 or self._bytes > self.max_bytes:
            self._trim()
        return kept

    @property
    def counted_bytes(self) -> int:
        """What the entries kept are counted as, against ``max_bytes``."""
        return self._bytes

    @property
    def first(self) -> int | None:
        return self._offsets[0] if self._offsets else None

    @property
    def last(self) -> int | None:
        return self._offsets[-1] if self._offsets else None

    def prepend(self, envelopes: list[Envelope]) -> None:
        """Put older envelopes (read back from the history) in front."""
        kept = [Kept(e) for e in envelopes]
        self._offsets[:0] = [_offset(e) for e in envelopes]
        self._kept[:0] = kept
        self._bytes += sum(entry.weight for entry in kept)

    def after(self, offset: int) -> list[Envelope] | None:
        """Envelopes with offsets above ``offset``, or None if the window no longer reaches back that far
        or misses one of them (a gap the sequencer skipped: the caller must read the history, and be told)."""
        if not self._offsets or self._offsets[0] > offset + 1:
            return None
        offsets = self._offsets
        start, end = bisect_right(offsets, offset), len(offsets) - 1
        # Offsets only increase: the run from start to end is whole when it spans exactly its length.
        if start <= end and (offsets[start] != offset + 1 or offsets[end] - offsets[start] != end - start):
            return None
        return [kept.envelope for kept in self._kept[start:]]

    def count_of(self, offset: int, envelope_id: str) -> int:
        """How many connections took the envelope delivered at ``offset``, if it is this one (else 0)."""
        index = self._index_of(offset)
        return self._kept[index].count if index is not None and self._kept[index].envelope.id == envelope_id else 0

    def id_at(self, offset: int) -> str | None:
        index = self._index_of(offset)
        return self._kept[index].envelope.id if index is not None else None

    def _index_of(self, offset: int) -> int | None:
        index = bisect_left(self._offsets, offset)
        return index if index < len(self._offsets) and self._offsets[index] == offset else None

    def clear(self) -> None:
        self._offsets.clear()
        self._kept.clear()
        self._bytes = 0

    def _trim(self) -> None:
        # One slice delete for many entries: the lists move once per trim, not once per broadcast
        # (down to 15/16 of the bytes when they are what is over, as the count has its 256 to spare).
        drop = max(0, len(self._kept) - self.max_count)
        freed = sum(kept.weight for kept in self._kept[:drop])
        keep_bytes = self.max_bytes - self.max_bytes // 16 if self._bytes > self.max_bytes else self.max_bytes
        while self._bytes - freed > keep_bytes and drop < len(self._kept) - 1:
            freed += self._kept[drop].weight
            drop += 1
        self._bytes -= freed
        del self._offsets[:drop], self._kept[:drop]
