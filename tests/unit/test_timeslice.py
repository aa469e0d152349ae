"""relay.timeslice: a long loop pauses once its slice of time is used up, not every N items."""

from __future__ import annotations

import time

import gevent

import relay.timeslice
from relay.timeslice import TimeSlice


def run_loop(items: int, slice_: TimeSlice, work_s: float = 0.0) -> list[str]:
    """Loop over ``items`` as relay's loops do, while another greenlet waits to run; the order of events."""
    order: list[str] = []
    gevent.spawn(lambda: order.append("other"))
    for count in range(1, items + 1):
        if work_s:
            time.sleep(work_s)  # the real time.sleep: CPU-like work that does not yield
        order.append(str(count - 1))
        if count % relay.timeslice.CHECK_EVERY == 0:
            slice_.check()
    gevent.sleep(0)
    return order


def test_a_loop_within_its_slice_never_pauses():
    order = run_loop(1000, TimeSlice(seconds=60))
    assert order.index("other") == 1000  # the other greenlet ran only after the whole loop


def test_a_loop_pauses_at_the_first_look_at_the_clock_after_its_slice(monkeypatch):
    monkeypatch.setattr(relay.timeslice, "CHECK_EVERY", 4)
    order = run_loop(12, TimeSlice(seconds=0.002), work_s=0.001)
    # Items 0-3 take ~4 ms, past the 2 ms slice: the look after the 4th item pauses.
    assert order.index("other") == 4


def test_the_default_slice_is_a_few_milliseconds():
    assert 0.001 <= TimeSlice().seconds <= 0.02


def items_before_the_next_greenlet(slice_: TimeSlice, busy_s: float) -> int:
    """A greenlet holds the loop ``busy_s`` at the first pause; how many 1 ms items run before the next one gets in."""
    order: list[object] = []
    gevent.spawn(time.sleep, busy_s)  # the real time.sleep: holds the loop, as a burst of handshakes does
    time.sleep(0.001)
    slice_.check()  # used up: pause, and the busy greenlet runs
    gevent.spawn(lambda: order.append("other"))
    for count in range(60):
        time.sleep(0.001)
        order.append(count)
        slice_.check()
    return order.index("other")


def test_after_a_long_pause_an_elastic_slice_lasts_as_long_as_the_pause():
    assert items_before_the_next_greenlet(TimeSlice(seconds=0.001), busy_s=0.030) == 1
    # ~30 items of 1 ms; at least 6 even if a loaded machine stretches each sleep to 5 ms.
    assert items_before_the_next_greenlet(TimeSlice(seconds=0.001, at_most=0.050), busy_s=0.030) >= 6


def test_an_elastic_slice_is_capped():
    assert items_before_the_next_greenlet(TimeSlice(seconds=0.001, at_most=0.002), busy_s=0.030) <= 3
