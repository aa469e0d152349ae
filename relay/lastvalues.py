"""The last value of a channel: the latest broadcast addressed to it, for ``SUBSCRIBE {"last": true}``.

A clinic's queue screen that is reloaded must not wait for the next update to
show the queue. The history keeps, per channel, the latest broadcast whose
``filter.channels`` names it (for ``WS_LAST_VALUE_TTL_MS``); a subscription
that asks for it gets that original frame, plus ``"last": true``, before its
``SUBSCRIBED``.

The store is read in a greenlet (:meth:`LastValues.fetch`, it waits), and the
answer is settled with no pause before the channel joins the hub
(:meth:`LastValues.settle`): a broadcast delivered here while the store was
being read is newer, and wins; one the store has but this worker has not
delivered yet is left out (it is on its way, live). So a last value is never
older than a live frame already sent for its channel, and never a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .envelope import Envelope
from .history import History
from .sequencer import Sequencer

log = logging.getLogger("relay.lastvalues")


@dataclass(frozen=True)
class Fetched:
    """What the store said, and how far this worker had delivered when it was asked."""

    names: tuple[str, ...]
    position: int
    stored: dict[str, Envelope]


class LastValues:
    def __init__(self, history: History, sequencer: Sequencer, *, ttl_ms: int):
        self.history = history
        self.sequencer = sequencer
        self.ttl_ms = ttl_ms
        self.errors = 0

    def fetch(self, names: list[str]) -> Fetched:
        """Ask the store (waits; call from a greenlet). A store that fails gives no last values, not an error."""
        position = self.sequencer.position
        try:
            stored = self.history.last_values(names, self.ttl_ms)
        except Exception as problem:
            self.errors += 1
            log.warning("last values unavailable: %s", problem)
            stored = {}
        return Fetched(tuple(names), position, stored)

    def settle(self, fetched: Fetched) -> dict[str, Envelope]:
        """The newest value of each channel this worker has delivered (no pause: see the module docstring)."""
        position = self.sequencer.position
        newer = self.sequencer.recent_after(fetched.position) or []
        settled: dict[str, Envelope] = {}
        for name in fetched.names:
            best = fetched.stored.get(name)
            if best is not None and (best.offset or 0) > position:
                best = None  # not delivered here yet: it comes live
            for envelope in newer:
                if name in envelope.filter.channels and (best is None or (envelope.offset or 0) > (best.offset or 0)):
                    best = envelope
            if best is not None:
                settled[name] = best
        return settled
