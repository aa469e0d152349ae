"""The outbox: one greenlet that writes what connections have queued.

A broadcast only *queues* its frame on each recipient (a list append); this
greenlet does the writing, one non-blocking ``send`` per connection, and
pauses once per time slice (``relay.timeslice``) so that HTTP requests keep
flowing during a large fan-out. When broadcasts come back to back, the next
one is queued while the previous is still being written, so a connection
that has not been flushed yet gets both frames in one ``send``: that
coalescing is where a Python server catches up with a C event loop.

That is also why the writer's time slice is short (``WRITE_SLICE_S``, a tenth
of the fan-out's): a POST that arrives while a round is being written is read
at the next pause, and its frame joins the ones still waiting on the
connections not written yet. With 5 ms slices a round of 1,000 sockets was
written before the next POST got in, one ``send`` per frame; at 0.5 ms a
socket gets several frames per ``send``, and the kernel's share of the
worker's CPU fell from 63% to 27% (the shared harness, back-to-back POSTs,
1,000 clients: 137k -> 240-300k deliveries/s).

Short slices alone would starve the writer when the loop is busy, though: in
a connect storm each pause runs upgrades of a millisecond or more, and 0.5 ms
of writing per turn made a broadcast reach the clients already connected
twice as late. So the slice is elastic (``TimeSlice(at_most=...)``): after a
long pause the writer takes as long a turn, up to the fan-out's 5 ms (the
storm's probe broadcasts: p50 128 -> 84 ms).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from .timeslice import CHECK_EVERY, SLICE_S, TimeSlice

if TYPE_CHECKING:  # the connection imports nothing from here; only its type is named
    from .connection import Connection

log = logging.getLogger("relay.outbox")

WRITE_SLICE_S = 0.0005  # between two looks for new requests (see the module docstring)


class Outbox:
    def __init__(self) -> None:
        self._dirty: list = []
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        self._writing = False
        self.stalls = 0  # times a socket's kernel buffer was full and a write had to wait

    @property
    def busy(self) -> bool:
        """Whether sockets are waiting to be written, or a round is being written (background work waits)."""
        return self._writing or bool(self._dirty)

    def status(self) -> dict:
        return {"backlog": len(self._dirty), "stalls": self.stalls}

    def schedule(self, conn: Connection) -> None:
        """Flush ``conn`` soon. The connection guarantees it is scheduled at most once."""
        if not self._dirty:
            # Empty -> not empty is the only transition the writer can be asleep for.
            self._wake.set()
            if self._greenlet is None:
                self._greenlet = gevent.spawn(self._run)
        self._dirty.append(conn)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            slice_ = TimeSlice(WRITE_SLICE_S, at_most=SLICE_S)
            self._writing = True
            try:
                while self._dirty:
                    # Swap the list: connections scheduled while we write go to the next round.
                    batch, self._dirty = self._dirty, []
                    for count, conn in enumerate(batch, 1):
                        try:
                            conn.flush()
                        except Exception:  # one broken socket must never stop the writer
                            log.exception("flush failed; dropping the connection")
                            # Nor one that cannot even be dropped: the rest of the batch is still
                            # owed its frames, and a dead writer is never started again.
                            try:
                                conn.abort("flush_error")
                            except Exception:
                                log.exception("dropping a connection failed")
                        if count % CHECK_EVERY == 0:
                            slice_.check()
                    slice_.check()  # and between rounds: a stream of small rounds must give way too
            finally:
                self._writing = False
