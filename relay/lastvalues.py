"""The last value of a channel: the latest broadcast addressed to it, for ``SUBSCRIBE {"last": true}``.

A clinic's queue screen that is reloaded must not wait for the next update to
show the queue. The history keeps, per channel and audience, the latest
broadcast whose ``filter.channels`` names it (for ``WS_LAST_VALUE_TTL_MS``); a
subscription that asks for it gets the newest of those its filter admits (what
it would be showing had it been subscribed all along), the original frame plus
``"last": true``, before its ``SUBSCRIBED``. A broadcast to some of the
channel's subscribers (one user, one role) is the others' last value only if
it was meant for them too: a smoke test sent to its own user on a clinic's
queue does not empty that queue on everyone's reloaded screen.

The store is read in a greenlet (:meth:`LastValues.fetch`, it waits), and the
answer is settled with no pause before the channel joins the hub
(:meth:`LastValues.settle`): a broadcast delivered here while the store was
being read is newer, and wins; one the store has but this worker has not
delivered yet is left out (it is on its way, live). So a last value is never
older than a live frame already sent for its channel, and never a duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .envelope import Envelope
from .history import History
from .sequencer import Sequencer

log = logging.getLogger("relay.lastvalues")
Who = tuple[str | None, str | None, str | None]  # a subscriber's user id, role and clinic id


@dataclass(frozen=True)
class Fetched:
    """What the store said, and how far this worker had delivered when it was asked."""

    names: tuple[str, ...]
    position: int
    stored: dict[str, list[Envelope]]


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

    def settle(self, fetched: Fetched, who: Who) -> dict[str, Envelope]:
        """The newest value of each channel that this worker has delivered and that is meant for ``who``
        (no pause: see the module docstring)."""
        position = self.sequencer.position
        newer = self.sequencer.recent_after(fetched.position) or []
        settled: dict[str, Envelope] = {}
        for name in fetched.names:
            # Stored ones this worker has not delivered yet are left out: they come live.
            stored = [e for e in fetched.stored.get(name, ()) if (e.offset or 0) <= position]
            best = newest_for(stored + [e for e in newer if name in e.filter.channels], who, name)
            if best is not None:
                settled[name] = best
        return settled


def newest_for(values: Iterable[Envelope], who: Who, channel: str) -> Envelope | None:
    """The newest of ``values`` (by offset) that a subscriber of ``channel`` who is ``who`` receives."""
    best = None
    for envelope in values:
        if (best is None or (envelope.offset or 0) > (best.offset or 0)) and envelope.filter.admits(*who, (channel,)):
            best = envelope
    return best
