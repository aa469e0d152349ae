"""The in-memory throttle store's bound: what it keeps when sign-ins flood it with new names."""

from __future__ import annotations

import time

from relay.throttle import Limit, LoginThrottle, MemoryThrottleStore

NOW = float(int(time.time()))


def test_attempts_refused_outright_add_nothing_to_the_store():
    """A blocked address trying new names each time used to add an entry per name (380 B each)."""
    store = MemoryThrottleStore()
    throttle = LoginThrottle(store, account=Limit(free=5), address=Limit(free=3))
    for n in range(3):
        throttle.attempt(f"user{n}@x", "10.0.0.1", now=NOW)
    assert throttle.attempt("user3@x", "10.0.0.1", now=NOW + 1).wait > 0  # the address is blocked now
    kept = len(store._states)
    for n in range(1000):
        assert throttle.attempt(f"new{n}@x", "10.0.0.1", now=NOW + 1).wait > 0
    assert len(store._states) == kept


def test_a_full_store_keeps_the_back_off_of_the_account_under_attack():
    """Flooded with new names from many addresses past its bound, the store must still remember the
    account being guessed at, or the guesser gets its free guesses again."""
    store = MemoryThrottleStore(max_keys=200)
    throttle = LoginThrottle(store, account=Limit(free=5), address=Limit(free=1000))
    for n in range(5):
        throttle.attempt("victim@x", None, now=NOW + n)
    assert throttle.attempt("victim@x", None, now=NOW + 10).wait > 0  # blocked: level 1
    for n in range(2000):  # the flood: counted attempts at other names, each a new key
        throttle.attempt(f"decoy{n}@x", f"10.1.{n // 250}.{n % 250}", now=NOW + 11)
    assert len(store._states) <= 200
    assert throttle.attempt("victim@x", None, now=NOW + 12).wait > 0  # still blocked, level kept


def test_leveled_decoys_queued_behind_the_account_under_attack_do_not_push_it_out():
    """The eviction looked at the oldest 65 keys for one without a level and, finding none, dropped the
    oldest: five guesses on the victim, then 70 decoy accounts given a level, then a flood of new names,
    and the victim had its free guesses back (found by review)."""
    store = MemoryThrottleStore(max_keys=200)
    throttle = LoginThrottle(store, account=Limit(free=5), address=Limit(free=1000))
    for n in range(5):
        throttle.attempt("victim@x", None, now=NOW + n)
    for d in range(70):
        for _ in range(5):
            throttle.attempt(f"decoy{d}@x", None, now=NOW + 5)
    assert throttle.attempt("victim@x", None, now=NOW + 10).wait > 0  # blocked: level 1
    for n in range(2000):
        throttle.attempt(f"new{n}@x", None, now=NOW + 11)
    assert len(store._states) <= 200
    assert throttle.attempt("victim@x", None, now=NOW + 12).wait > 0  # still blocked, level kept
