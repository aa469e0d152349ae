"""LastValues.settle: the newest value of a channel meant for the subscriber, among what the store had and
what this worker delivered while the store was read; never one this worker has not delivered yet."""

from __future__ import annotations

from relay.envelope import Envelope, Filter
from relay.lastvalues import LastValues
from relay.sequencer import Sequencer

Q1 = "clinic:clinic-1:queue"
BOB = ("bob", "sales_staff", "clinic-1")


def placed(offset: int, users=(), roles=()) -> Envelope:
    audience = Filter(channels=frozenset([Q1]), user_ids=frozenset(users), roles=frozenset(roles))
    return Envelope("QUEUE_UPDATE", {"n": offset}, audience, id=f"id-{offset}").placed("e1", offset)


class Store:
    """A history holding, per channel, the values it was given (newest first, as the real ones answer)."""

    def __init__(self, *values: Envelope):
        self.values = sorted(values, key=lambda e: e.offset or 0, reverse=True)

    def last_values(self, channels, max_age_ms):
        return {Q1: list(self.values)} if Q1 in channels and self.values else {}


def settled(stored: list[Envelope], delivered_meanwhile: list[Envelope], position: int, who=BOB) -> int | None:
    sequencer = Sequencer(lambda envelope: 0, lambda after, limit: [], on_reset=lambda epoch: None)
    sequencer.prime("e1", position)
    last = LastValues(Store(*stored), sequencer, ttl_ms=60_000)
    fetched = last.fetch([Q1])
    for envelope in delivered_meanwhile:
        sequencer.offer(envelope)
    value = last.settle(fetched, who).get(Q1)
    return value.data["n"] if value else None


def test_the_newest_stored_value_meant_for_the_subscriber():
    stored = [placed(1), placed(2, users=["bob"]), placed(3, roles=["admin"])]
    assert settled(stored, [], position=3) == 2
    assert settled(stored, [], position=3, who=("erin", "nurse", "clinic-1")) == 1
    assert settled(stored, [], position=3, who=("alice", "admin", None)) == 3
    assert settled([placed(1, roles=["admin"])], [], position=1) is None


def test_a_value_delivered_while_the_store_was_read_wins_only_if_it_is_meant_for_the_subscriber():
    assert settled([placed(1)], [placed(2, roles=["admin"])], position=1) == 1
    assert settled([placed(1)], [placed(2, roles=["admin"]), placed(3)], position=1) == 3


def test_a_stored_value_this_worker_has_not_delivered_yet_is_left_to_come_live():
    assert settled([placed(1), placed(2)], [], position=1) == 1
