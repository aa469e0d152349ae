"""The sign-in throttle's policy, on a fake clock: what a person never notices, what a guesser always does."""

from __future__ import annotations

import pytest

from relay.throttle import Limit, LoginThrottle, MemoryThrottleStore

T0 = 1_000_000.0


@pytest.fixture
def throttle():
    return LoginThrottle(MemoryThrottleStore(), window=900, account=Limit(free=5), address=Limit(free=20))


def fail(throttle, times, login="bob@x", address="10.0.0.1", at=T0, step=1.0):
    waits = []
    for n in range(times):
        waits.append(throttle.failed(login, address, now=at + n * step))
    return waits


def test_a_few_mistakes_cost_nothing(throttle):
    assert fail(throttle, 4) == [0, 0, 0, 0]
    assert throttle.wait("bob@x", "10.0.0.1", now=T0 + 4) == 0


def test_the_fifth_failure_makes_the_next_attempt_wait_and_the_wait_doubles(throttle):
    waits = fail(throttle, 8, step=0)
    assert waits[:4] == [0, 0, 0, 0] and waits[4:] == [30, 60, 120, 240]
    assert throttle.wait("bob@x", "10.0.0.1", now=T0 + 1) == pytest.approx(239)
    assert throttle.wait("BOB@X ", "10.0.0.1", now=T0 + 1) > 0  # the same account however it is typed


def test_the_wait_is_capped_at_fifteen_minutes(throttle):
    assert max(fail(throttle, 30, step=0)) == 900


def test_a_success_clears_the_account_but_not_the_address(throttle):
    fail(throttle, 5, step=0)
    throttle.succeeded("bob@x")
    assert throttle.wait("bob@x", None, now=T0 + 1) == 0
    assert fail(throttle, 1, at=T0 + 2) == [0]  # counting starts again


def test_other_accounts_are_not_affected_until_the_address_limit(throttle):
    fail(throttle, 10, step=0)
    assert throttle.wait("carol@x", "10.0.0.1", now=T0 + 1) == 0
    assert throttle.wait("carol@x", "10.0.0.2", now=T0 + 1) == 0


def test_an_address_trying_many_accounts_is_slowed_down(throttle):
    for n in range(20):
        throttle.failed(f"user-{n}@x", "10.9.9.9", now=T0)
    assert throttle.wait("someone-new@x", "10.9.9.9", now=T0 + 1) > 0
    assert throttle.wait("someone-new@x", "10.0.0.1", now=T0 + 1) == 0


def test_failures_older_than_the_window_are_forgotten(throttle):
    fail(throttle, 4, step=0)
    assert fail(throttle, 1, at=T0 + 901) == [0]  # 15 minutes later: the old four are gone
