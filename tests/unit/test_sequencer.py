"""The sequencer: offset order and exactly once, whatever order broadcasts arrive in; gaps filled or skipped."""

from __future__ import annotations

import gevent
import pytest

from relay.envelope import Envelope, Filter
from relay.sequencer import Sequencer

EPOCH = "e1"


def env(offset: int, epoch: str = EPOCH, channels=("system:announcements",)) -> Envelope:
    return Envelope("ANNOUNCEMENT", {"n": offset}, Filter(channels=frozenset(channels)), id=f"id-{offset}").placed(
        epoch, offset
    )


class World:
    """The sequencer's surroundings: what it delivered, what the history holds, what it reset."""

    def __init__(self, head: int = 0):
        self.delivered: list[int] = []
        self.history: dict[int, Envelope] = {}
        self.resets: list[str] = []
        self.fetches: list[tuple[int, int]] = []
        self.told: list[tuple] = []  # ("gap", after, upto) and ("went back", epoch, offset), in order with deliveries
        self.sequencer = Sequencer(
            self.deliver,
            self.fetch,
            on_reset=self.resets.append,
            on_gap=lambda after, upto: self.told.append(("gap", after, upto)),
            on_went_back=lambda epoch, offset: self.told.append(("went back", epoch, offset)),
            gap_timeout=0.05,
        )
        self.sequencer.prime(EPOCH, head)

    def deliver(self, envelope: Envelope) -> int:
        self.delivered.append(envelope.offset)
        self.told.append(("delivered", envelope.offset))
        return 10 + envelope.offset  # a recognisable count

    def fetch(self, after: int, limit: int) -> list[Envelope]:
        self.fetches.append((after, limit))
        return [self.history[o] for o in sorted(self.history) if o > after][:limit]


@pytest.fixture
def world():
    return World()


def test_in_order_envelopes_are_delivered_at_once_with_their_count(world):
    results = [world.sequencer.offer(env(n)) for n in (1, 2, 3)]
    assert world.delivered == [1, 2, 3] and [r.get(timeout=1) for r in results] == [11, 12, 13]
    assert world.sequencer.position == 3


def test_an_envelope_from_further_ahead_waits_for_the_ones_before_it(world):
    third = world.sequencer.offer(env(3))
    second = world.sequencer.offer(env(2))
    assert world.delivered == [] and not third.ready() and not second.ready()
    world.sequencer.offer(env(1))
    assert world.delivered == [1, 2, 3] and third.get(timeout=1) == 13


def test_duplicates_are_never_delivered_twice_and_report_the_first_count(world):
    world.sequencer.offer(env(1))
    again = world.sequencer.offer(env(1))  # e.g. our own broadcast coming back from the broker
    assert world.delivered == [1] and again.get(timeout=1) == 11
    world.sequencer.offer(env(3))
    assert world.sequencer.offer(env(3)).get(timeout=1) == 0  # parked twice: once is enough
    world.sequencer.offer(env(2))
    assert world.delivered == [1, 2, 3]


def test_a_gap_that_stays_open_is_filled_from_the_history_in_order(world):
    world.history = {2: env(2), 3: env(3)}  # published, but never reached this worker's listener
    world.sequencer.offer(env(1))
    late = world.sequencer.offer(env(4))
    assert late.get(timeout=2) == 14
    assert world.delivered == [1, 2, 3, 4] and world.fetches[0][0] == 1


def test_an_offset_the_history_no_longer_has_is_skipped_loudly(world):
    world.sequencer.offer(env(1))
    late = world.sequencer.offer(env(3))
    assert late.get(timeout=2) == 13
    assert world.delivered == [1, 3] and world.sequencer.skipped == 1
    # The service is told before anything past the gap goes out: its clients must resume from before it.
    assert world.told == [("delivered", 1), ("gap", 1, 2), ("delivered", 3)]


def test_offers_made_while_the_service_handles_a_gap_wait_for_it():
    """Closing every socket pauses: a broadcast arriving then must not reach a socket not closed yet."""
    world = World()
    during: list[int] = []

    def closing(after: int, upto: int) -> None:
        world.sequencer.offer(env(4))  # arrives while the sockets are being closed
        during.extend(world.delivered)

    world.sequencer._on_gap = closing
    world.sequencer.offer(env(1))
    assert world.sequencer.offer(env(3)).get(timeout=2) == 13
    assert during == [1] and world.delivered == [1, 3, 4]


def test_a_second_broadcast_at_a_delivered_offset_says_the_stream_went_back(world):
    """A store restored from an older copy hands out offsets again: each one's broadcast would be dropped
    as a duplicate by every worker, silently. The same broadcast again is only a duplicate."""
    world.sequencer.offer(env(1))
    world.sequencer.offer(env(1))
    assert world.told == [("delivered", 1)]
    other = Envelope("ANNOUNCEMENT", {}, Filter(), id="another").placed(EPOCH, 1)
    assert world.sequencer.offer(other).get(timeout=1) == 0
    assert world.told == [("delivered", 1), ("went back", EPOCH, 1)]
    world.sequencer.offer(env(3))  # parked
    world.sequencer.offer(Envelope("ANNOUNCEMENT", {}, Filter(), id="third").placed(EPOCH, 3))
    assert world.told[-1] == ("went back", EPOCH, 3)


def test_a_long_gap_is_read_a_page_at_a_time():
    world = World()
    world.history = {n: env(n) for n in range(1, 1201)}  # a listener away while 1,200 went by
    assert world.sequencer.offer(env(1201)).get(timeout=5) == 1211
    assert world.delivered == list(range(1, 1202)) and world.sequencer.skipped == 0
    assert max(limit for _, limit in world.fetches) <= 500


def test_catch_up_past_a_gap_waits_for_the_gap_timer_instead_of_reading_the_same_page_again(world):
    world.history = {n: env(n) for n in range(3, 1003)}  # 1 and 2 trimmed: the history starts past a gap
    world.sequencer.catch_up()
    assert world.delivered == list(range(3, 1003)) and world.sequencer.skipped == 2
    assert len(world.fetches) < 10, world.fetches


class SlowHistory(World):
    """A history read that waits (a Redis round trip), during which offers keep arriving."""

    def fetch(self, after: int, limit: int) -> list[Envelope]:
        gevent.sleep(0.05)
        return super().fetch(after, limit)


def test_a_gap_that_closes_live_while_the_history_is_read_is_delivered_once():
    world = SlowHistory()
    world.history = {n: env(n) for n in range(1, 6)}
    world.sequencer.offer(env(2))  # 1 is late: 2 parked
    gevent.sleep(0.07)  # the gap timer fired: the history is being read for offset 1
    for n in (1, 3):
        world.sequencer.offer(env(n))  # 1 arrives live meanwhile: 1, 2 and 3 delivered
    gevent.sleep(0.1)  # the read comes back
    world.sequencer.offer(env(4))
    assert world.delivered == [1, 2, 3, 4]
    assert world.sequencer.position == 4 and world.sequencer.skipped == 0


def test_a_gap_that_opens_while_the_history_is_read_is_read_in_its_turn_not_skipped():
    world = SlowHistory()
    world.history = {n: env(n) for n in range(1, 8)}
    world.sequencer.offer(env(2))  # 1 is late: the history is read for it
    gevent.sleep(0.07)
    for n in (1, 3, 5):
        world.sequencer.offer(env(n))  # 1..3 delivered live, 5 parked: 4 is missing now, and not read yet
    last = world.sequencer.offer(env(6))
    assert last.get(timeout=2) == 16
    assert world.delivered == [1, 2, 3, 4, 5, 6] and world.sequencer.skipped == 0


def test_a_backfill_whose_stream_started_over_while_it_read_keeps_the_old_stream_out():
    world = SlowHistory(head=10)
    world.history = {n: env(n) for n in range(1, 11)}
    backfill = gevent.spawn(world.sequencer.backfill, 5)
    gevent.sleep(0.02)  # reading 6..10 of the old stream
    world.sequencer.restart("e2", 0)  # the store lost its history meanwhile
    backfill.get(timeout=2)
    world.sequencer.offer(env(1, "e2"))
    recent = world.sequencer.recent_after(0)
    assert recent is not None and [(e.epoch, e.offset) for e in recent] == [("e2", 1)]  # nothing of e1's


def test_catch_up_delivers_what_a_listener_missed(world):
    world.history = {n: env(n) for n in range(1, 1201)}
    world.sequencer.catch_up()
    assert world.delivered == list(range(1, 1201)) and len(world.fetches) == 3


def test_a_new_epoch_resets_the_position_and_tells_the_service(world):
    world.sequencer.offer(env(1))
    world.sequencer.offer(env(5))  # parked, waiting for 2..4 of the old stream
    fresh = world.sequencer.offer(env(1, epoch="e2"))  # the store was lost: a new stream starts at 1
    assert fresh.get(timeout=1) == 11 and world.resets == ["e2"]
    assert world.sequencer.epoch == "e2" and world.sequencer.position == 1 and world.delivered == [1, 1]


def test_recent_after_returns_what_was_delivered_since_an_offset(world):
    for n in range(1, 6):
        world.sequencer.offer(env(n))
    assert [e.offset for e in world.sequencer.recent_after(2)] == [3, 4, 5]
    assert world.sequencer.recent_after(5) == []


def test_recent_after_says_when_it_no_longer_reaches_back():
    world = World(head=100)
    small = Sequencer(world.deliver, world.fetch, on_reset=world.resets.append, recent=3)
    small.prime(EPOCH, 0)
    for n in range(1, 601):
        small.offer(env(n))
    assert [e.offset for e in small.recent_after(597)] == [598, 599, 600]  # at least the last 3 are kept
    assert small.recent_after(6) is None  # 7 was forgotten: the caller must read the history


def test_recent_after_will_not_answer_across_a_skipped_gap(world):
    """A resume across offsets the sequencer gave up on must read the history (and be told it is gone),
    not be handed the rest as if it were whole."""
    world.sequencer.offer(env(1))
    world.sequencer.offer(env(3)).get(timeout=2)  # 2 never came and the history has none: skipped
    world.sequencer.offer(env(4))
    assert world.sequencer.skipped == 1
    assert world.sequencer.recent_after(0) is None and world.sequencer.recent_after(1) is None
    assert [e.offset for e in world.sequencer.recent_after(2)] == [3, 4]  # past the gap: whole


def test_a_backfill_extends_the_window_back_once_for_every_resume():
    """The control for the two tests around it: a whole run from one stream is kept."""
    world = World(head=10)
    world.history = {n: env(n) for n in range(1, 11)}
    assert world.sequencer.recent_after(4) is None  # a worker that just started holds nothing
    world.sequencer.backfill(4)
    world.sequencer.backfill(4)  # the next resume finds it there
    assert [e.offset for e in world.sequencer.recent_after(4)] == [5, 6, 7, 8, 9, 10]
    assert world.fetches == [(4, 6)]


def test_only_the_window_of_a_worker_started_since_is_read_back_for_a_subscribe_since():
    """A deploy's new worker, whose window begins at its start: yes, once. A busy worker whose window was
    trimmed since: no (the next broadcasts would trim what was read before it was used, and each SUBSCRIBE
    since could make it read the store again)."""
    world = World(head=10)
    world.history = {n: env(n) for n in range(1, 31)}
    assert world.sequencer.can_backfill(4) and not world.sequencer.can_backfill(10)
    world.sequencer.backfill(4)
    assert not world.sequencer.can_backfill(2)  # read back once already
    busy = World(head=0)
    busy.sequencer = Sequencer(busy.deliver, busy.fetch, on_reset=busy.resets.append, recent=4)
    busy.sequencer.prime(EPOCH, 0)
    for n in range(1, 301):  # past the window's 4 and the 256 it may run over before a trim
        busy.sequencer.offer(env(n))
    first = busy.sequencer._recent.first
    assert first is not None and first > 1  # trimmed
    assert busy.sequencer.recent_after(first - 2) is None and not busy.sequencer.can_backfill(first - 2)


def test_a_backfill_of_pages_with_a_hole_is_not_kept():
    world = World(head=10)
    world.history = {n: env(n) for n in range(1, 11) if n != 7}  # 7 trimmed between two pages, say
    world.sequencer.backfill(4)
    assert world.fetches and world.sequencer._recent.first is None  # read, and not kept
    assert world.sequencer.recent_after(4) is None  # a resume reads the history itself


def test_a_straggler_of_an_epoch_left_behind_does_not_bring_it_back(world):
    """Accepted in the old stream just before it started over, it arrives after: it went with it."""
    world.sequencer.offer(env(1))
    world.sequencer.restart("e2", 5)
    assert world.sequencer.offer(env(2)).get(timeout=1) == 0  # e1's, late
    assert world.sequencer.epoch == "e2" and world.resets == ["e2"] and world.delivered == [1]
    world.sequencer.restart(EPOCH, 9)  # unless the store itself says the stream is that one again
    world.sequencer.offer(env(10))
    assert world.delivered == [1, 10]


def test_a_duplicate_reports_the_count_of_the_same_broadcast_only(world):
    world.sequencer.offer(env(1))
    other = Envelope("ANNOUNCEMENT", {}, Filter(), id="another").placed(EPOCH, 1)
    assert world.sequencer.offer(other).get(timeout=1) == 0  # not broadcast 1's count
    assert world.delivered == [1]


def test_the_id_delivered_at_an_offset_is_known_while_the_window_holds_it(world):
    world.sequencer.offer(env(1))
    assert world.sequencer.delivered_id(1) == "id-1" and world.sequencer.delivered_id(2) is None


def test_the_position_moves_before_the_fan_out_so_a_connection_joining_mid_fan_out_starts_after_it():
    seen: list[tuple[str, int]] = []

    def slow_deliver(envelope):
        gevent.sleep(0.01)  # a fan-out that pauses
        return 1

    sequencer = Sequencer(slow_deliver, lambda a, n: [], on_reset=lambda e: None)
    sequencer.prime(EPOCH, 0)
    job = gevent.spawn(sequencer.offer, env(1))
    gevent.sleep(0.001)  # the fan-out of 1 has started and paused
    seen.append(("joiner sees", sequencer.position))
    # ...and a resume finishing now, with the client at offset 0, must replay 1: it will not get it live.
    seen.append(("resume replays", [e.offset for e in sequencer.recent_after(0)]))
    job.join()
    assert seen == [("joiner sees", 1), ("resume replays", [1])]


def test_delivered_moves_only_once_a_fan_out_is_done():
    """What a PONG reports: a connection told 1 mid-fan-out would drop 1 when it arrived, as already seen."""
    sequencer = Sequencer(lambda e: gevent.sleep(0.01) or 1, lambda a, n: [], on_reset=lambda e: None)
    sequencer.prime(EPOCH, 5)
    assert sequencer.delivered == 5
    job = gevent.spawn(sequencer.offer, env(6))
    gevent.sleep(0.001)  # the fan-out of 6 has started and paused
    assert (sequencer.position, sequencer.delivered) == (6, 5)
    job.join()
    assert sequencer.delivered == 6
    sequencer.restart("e2", 40)
    assert (sequencer.position, sequencer.delivered) == (40, 40)


def test_a_fan_out_that_ends_after_the_stream_started_over_reports_the_new_streams_position():
    """A PONG then says (e2, 0): the old stream's offset 6 in the new epoch would skip e2's first six."""
    sequencer = Sequencer(lambda e: gevent.sleep(0.01) or 1, lambda a, n: [], on_reset=lambda e: None)
    sequencer.prime(EPOCH, 5)
    job = gevent.spawn(sequencer.offer, env(6))
    gevent.sleep(0.001)  # the fan-out of 6 has started and paused
    sequencer.restart("e2", 0)  # the store lost its history meanwhile
    job.join()
    assert (sequencer.epoch, sequencer.position, sequencer.delivered) == ("e2", 0, 0)


def test_delivered_does_not_pass_a_skipped_gap_until_the_service_has_handled_it():
    """The sockets open during the gap are closed by on_gap: none may be told it has what follows it."""
    world = World()
    seen = []
    world.sequencer._on_gap = lambda after, upto: seen.append(world.sequencer.delivered)
    world.sequencer.offer(env(1))
    assert world.sequencer.offer(env(3)).get(timeout=2) == 13
    assert seen == [1] and world.sequencer.delivered == 3


def test_a_resume_while_a_skipped_gap_is_being_handled_is_not_told_the_window_is_whole():
    """Between the skip and the first delivery past it the window ends before the position: a resume
    then must read the history (and be told the gap), not be handed the window (found by review)."""
    world = World()
    answers = []

    def closing(after: int, upto: int) -> None:
        answers.extend([world.sequencer.recent_after(0), world.sequencer.recent_after(1)])

    world.sequencer._on_gap = closing
    world.sequencer.offer(env(1))
    assert world.sequencer.offer(env(3)).get(timeout=2) == 13
    assert answers == [None, None]
    assert [e.offset for e in world.sequencer.recent_after(2)] == [3]


def test_a_failing_gap_handler_leaves_nothing_stranded(world):
    def broken(after: int, upto: int) -> None:
        raise RuntimeError("closing failed")

    world.sequencer._on_gap = broken
    world.sequencer.offer(env(1))
    assert world.sequencer.offer(env(3)).get(timeout=2) == 13  # delivered all the same


def test_a_duplicate_offered_while_something_is_parked_without_its_timer_arms_it(world):
    world.sequencer.offer(env(1))
    world.history = {2: env(2)}
    late = world.sequencer.offer(env(3))
    world.sequencer._gap.kill()  # as if the timer had been lost
    world.sequencer._gap = None
    world.sequencer.offer(env(1))  # a duplicate: the timer is armed again
    assert late.get(timeout=2) == 13 and world.delivered == [1, 2, 3]


def test_a_gap_read_from_a_stream_that_started_over_is_not_skipped(world):
    """Another worker started the stream over: what the history holds now is the new epoch's. That is
    not a gap of the old one (its first broadcast here resets the sequencer instead)."""
    world.sequencer.offer(env(1))
    world.history = {2: env(2, "e2")}  # a new epoch goes on from the old head's offsets
    parked = world.sequencer.offer(env(3))
    gevent.sleep(0.3)
    assert world.sequencer.skipped == 0 and ("gap", 1, 2) not in world.told and not parked.ready()
    world.sequencer.offer(env(3, "e2"))
    assert parked.get(timeout=1) == 0 and world.resets == ["e2"]


def test_resumes_that_find_the_worker_behind_read_the_history_once_between_them(world):
    """A reconnect storm's resumes each find this worker behind: one reads, the others wait for it."""
    for n in (1, 2, 3):
        world.history[n] = env(n)
    real_fetch = world.sequencer._fetch
    world.sequencer._fetch = lambda after, limit: gevent.sleep(0.05) or real_fetch(after, limit)
    jobs = [gevent.spawn(world.sequencer.catch_up_once) for _ in range(5)]
    gevent.joinall(jobs, timeout=5)
    assert world.delivered == [1, 2, 3] and world.fetches == [(0, 500)]  # one catch-up: one short page


def test_resumes_that_wait_for_a_catch_up_that_failed_are_told_it_failed(world):
    """Not that they are still behind: a resume is then refused as unavailable, not invalid_position."""

    def away(after, limit):
        gevent.sleep(0.05)
        raise RuntimeError("the store is away")

    world.sequencer._fetch = away
    jobs = [gevent.spawn(world.sequencer.catch_up_once) for _ in range(3)]
    gevent.joinall(jobs, timeout=5)
    assert [type(job.exception).__name__ for job in jobs] == ["RuntimeError"] * 3


def test_the_recent_window_counts_an_audiences_list_as_well_as_the_frame():
    """A broadcast to 1,000 user ids has a frame of a few hundred bytes and holds ~120 KB: counted by its
    frame alone, 4,096 of them kept ~490 MB in the window (found by review)."""
    from relay.sequencer import RecentWindow

    window = RecentWindow(4096, 1 << 20)  # 1 MiB
    many = frozenset(f"user-{n:04d}" for n in range(1000))
    for offset in range(1, 101):
        window.add(Envelope("NOTIFICATION", {"n": offset}, Filter(user_ids=many)).placed(EPOCH, offset))
    assert window.last == 100 and 100 - window.first + 1 <= 9  # ~120 KB each: eight fit in 1 MiB
    small = RecentWindow(4096, 1 << 20)
    for offset in range(1, 101):
        small.add(env(offset))
    assert small.first == 1  # frames of ~80 bytes and one channel: all kept


def test_the_recent_window_counts_a_broadcasts_parsed_data_as_well_as_its_frame():
    """A 60 KB body of empty lists parses into ~1.3 MB of Python objects: counted by its frame alone,
    the window's 16 MiB held ~270 such broadcasts, ~360 MB. Text of the same size is ~2x its frame."""
    import json
    import tracemalloc

    from relay.sequencer import RecentWindow

    text = json.dumps([[] for _ in range(20_000)])
    tracemalloc.start()
    data = json.loads(text)
    parsed, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    lists = Envelope("QUEUE_UPDATE", data, Filter(channels=frozenset({"clinic:c-1:queue"}))).placed(EPOCH, 1)
    window = RecentWindow(4096, 1 << 30)
    window.add(lists)
    counted = window.counted_bytes
    assert parsed + len(lists.frame()) <= counted <= 3 * (parsed + len(lists.frame()))
    prose = Envelope("ANNOUNCEMENT", {"message": "x" * 60_000}, Filter(channels=frozenset({"system:announcements"})))
    window.add(prose.placed(EPOCH, 2))
    assert 120_000 <= window.counted_bytes - counted <= 125_000  # the frame and the text once parsed
