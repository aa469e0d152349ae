"""The sign-in throttle's policy, on a fake clock: what a person never notices, what a guesser always does.

Against the in-memory store here; ``tests/integration/test_throttle_redis.py`` runs the same tests
against a real ``redis-server``."""

from __future__ import annotations

import time

import pytest

from relay.throttle import Limit, LoginThrottle, MemoryThrottleStore

# A fake clock that starts when each test does: Redis expires blocks at their real end time (PXAT),
# so the fake timeline must not begin in the past; the stores compare every block with the ``now`` given.
T0 = float(int(time.time()))


@pytest.fixture(autouse=True)
def clock_starts_now():  # public: the Redis module takes it with import *
    global T0
    T0 = float(int(time.time()))


BOB, HOME = "bob@x", "10.0.0.1"


def policy(store) -> LoginThrottle:
    return LoginThrottle(store, window=900, account=Limit(free=5), address=Limit(free=20))


@pytest.fixture
def throttle():
    return policy(MemoryThrottleStore())


def fail(throttle, times, login=BOB, address=HOME, at=None, step=1.0, device=None) -> list[float]:
    """``times`` wrong passwords; the block each one earned (or -1 for an attempt refused outright)."""
    at = T0 if at is None else at
    earned = []
    for n in range(times):
        attempt = throttle.attempt(login, address, now=at + n * step, device=device)
        earned.append(-1 if attempt.wait > 0 else attempt.earned)
    return earned


def test_a_few_mistakes_cost_nothing(throttle):
    assert fail(throttle, 4) == [0, 0, 0, 0]
    assert throttle.wait(BOB, HOME, now=T0 + 4) == 0


def test_the_fifth_failure_blocks_the_next_attempt_the_right_password_too(throttle):
    assert fail(throttle, 5, step=0) == [0, 0, 0, 0, 30]
    refused = throttle.attempt(BOB, HOME, now=T0 + 1)  # whatever its password: it is never checked
    assert refused.id is None and refused.wait == pytest.approx(29)
    assert throttle.attempt("BOB@X ", HOME, now=T0 + 1).wait > 0  # the same account however it is typed


def test_each_block_doubles_up_to_fifteen_minutes(throttle):
    earned, now = [], T0
    for _ in range(12):  # a guesser who tries again the moment the block ends
        attempt = throttle.attempt(BOB, HOME, now=now)
        assert attempt.wait == 0
        earned.append(attempt.earned)
        now += max(attempt.earned, 1.0)
    assert earned == [0, 0, 0, 0, 30, 60, 120, 240, 480, 900, 900, 900]


def test_guesses_sent_at_the_same_instant_are_counted_one_by_one(throttle):
    """The race a check-then-count throttle loses: fifty parallel guesses, five get a password check."""
    attempts = [throttle.attempt(BOB, f"10.1.0.{n}", now=T0) for n in range(50)]
    assert sum(a.wait == 0 for a in attempts) == 5


def test_a_success_clears_the_account_and_takes_back_only_its_own_attempt_from_the_address(throttle):
    fail(throttle, 4, step=0)
    right = throttle.attempt(BOB, HOME, now=T0 + 1)
    assert right.earned == 30  # had it been wrong
    throttle.succeeded(right)
    assert throttle.wait(BOB, HOME, now=T0 + 2) == 0
    assert fail(throttle, 4, at=T0 + 2) == [0, 0, 0, 0]  # the account starts afresh
    # the address still holds its eight failures: twelve more from it reach its limit of twenty
    others = [throttle.attempt(f"user-{n}@x", HOME, now=T0 + 10) for n in range(12)]
    assert [a.earned for a in others][-1] == 30 and all(a.earned == 0 for a in others[:-1])


def test_a_success_at_the_address_limit_lifts_the_block_it_caused(throttle):
    for n in range(19):
        fail(throttle, 1, login=f"user-{n}@x")
    right = throttle.attempt("carol@x", HOME, now=T0 + 1)
    assert right.earned == 30  # the twentieth failure from this address, had it been one
    throttle.succeeded(right)
    assert throttle.wait("dora@x", HOME, now=T0 + 2) == 0


def test_an_attempt_whose_password_could_not_be_checked_does_not_count(throttle):
    fail(throttle, 4, step=0)
    unchecked = throttle.attempt(BOB, HOME, now=T0 + 1)
    throttle.withdraw(unchecked)
    assert throttle.wait(BOB, HOME, now=T0 + 2) == 0
    assert fail(throttle, 1, at=T0 + 2) == [30]  # still the fifth failure, not the sixth


def test_other_accounts_are_not_affected_until_the_address_limit(throttle):
    fail(throttle, 10, step=31)
    assert throttle.wait("carol@x", HOME, now=T0 + 1) == 0
    assert throttle.wait("carol@x", "10.0.0.2", now=T0 + 1) == 0


def test_an_address_trying_many_accounts_is_slowed_down(throttle):
    for n in range(20):
        throttle.attempt(f"user-{n}@x", "10.9.9.9", now=T0)
    assert throttle.wait("someone-new@x", "10.9.9.9", now=T0 + 1) > 0
    assert throttle.wait("someone-new@x", HOME, now=T0 + 1) == 0


@pytest.mark.parametrize("spelling", ["IRIS@X", " iris@x ", "\u0130ris@x", "\uff49\uff52\uff49\uff53@x"])
def test_every_spelling_an_identity_source_would_take_for_the_same_name_is_one_account(throttle, spelling):
    """Supabase lower-cases with Go's simple mapping: "İ" is "i" there, but "i̇" to Python's lower()."""
    fail(throttle, 6, login="iris@x", step=0)
    assert throttle.wait(spelling, "10.0.0.9", now=T0 + 1) > 0


@pytest.mark.parametrize("neighbour", ["2001:db8:1:2::99", "2001:db8:1:2:ffff::1"])
def test_an_ipv6_client_is_one_address_per_64_as_its_network_gives_it(throttle, neighbour):
    for n in range(20):
        throttle.attempt(f"user-{n}@x", f"2001:db8:1:2::{n + 1:x}", now=T0)
    assert throttle.wait("someone-new@x", neighbour, now=T0 + 1) > 0
    assert throttle.wait("someone-new@x", "2001:db8:1:3::1", now=T0 + 1) == 0  # the next /64 is someone else


@pytest.mark.parametrize("written", ["[2001:db8:1:2::7]:443", "10.9.9.9:5678"])
def test_an_address_a_proxy_wrote_with_its_port_is_the_address(throttle, written):
    host = "2001:db8:1:2::8" if written.startswith("[") else "10.9.9.9"
    for n in range(20):
        throttle.attempt(f"user-{n}@x", written, now=T0)
    assert throttle.wait("someone-new@x", host, now=T0 + 1) > 0


def test_an_ipv4_mapped_address_is_its_ipv4_address(throttle):
    for n in range(20):
        throttle.attempt(f"user-{n}@x", "::ffff:10.9.9.9", now=T0)
    assert throttle.wait("someone-new@x", "10.9.9.9", now=T0 + 1) > 0


def test_failures_older_than_the_window_are_forgotten(throttle):
    fail(throttle, 4, step=0)
    assert fail(throttle, 1, at=T0 + 901) == [0]  # 15 minutes later: the old four are gone


def test_waiting_out_the_window_after_a_block_gives_no_new_free_guesses(throttle):
    assert fail(throttle, 5, step=0)[-1] == 30
    assert fail(throttle, 1, at=T0 + 901) == [60]  # the level is remembered for a day, not the window


def test_one_account_takes_about_a_hundred_guesses_a_day_at_most(throttle):
    """The README's figure: a guesser who never waits a second longer than it must, for 24 hours."""
    now, guesses = T0, 0
    for _ in range(10_000):
        if now >= T0 + 86_400:
            break
        attempt = throttle.attempt(BOB, f"10.2.{guesses % 250}.{guesses // 250}", now=now)  # many addresses
        if attempt.wait > 0:
            now += attempt.wait
            continue
        guesses += 1
        now += 0.1
    assert 100 <= guesses <= 110, guesses


def test_a_refused_attempt_counts_nothing():
    store = MemoryThrottleStore()
    throttle = LoginThrottle(store, account=Limit(free=2))
    throttle.attempt(BOB, None, now=T0)
    throttle.attempt(BOB, None, now=T0)
    for _ in range(5):
        assert throttle.attempt(BOB, None, now=T0 + 1).wait > 0
    later = throttle.attempt(BOB, None, now=T0 + 31)
    assert later.wait == 0 and later.earned == 60  # the next level, not five levels up


# -- a browser that signed in to the account before (a device cookie: relay.devices) ------------


def test_a_known_browser_signs_in_while_the_account_is_blocked_for_everyone_else(throttle):
    """The lockout a guesser who knows an email could otherwise keep up for good, one failure per block."""
    assert fail(throttle, 5, step=0)[-1] == 30
    assert throttle.attempt(BOB, "10.7.7.7", now=T0 + 1).wait > 0  # any other browser: blocked
    mine = throttle.attempt(BOB, HOME, now=T0 + 1, device="my-laptop")
    assert mine.wait == 0 and mine.earned == 0
    throttle.succeeded(mine)
    assert throttle.wait(BOB, "10.7.7.7", now=T0 + 2) > 0  # its success does not free the guesser


def test_a_known_browser_has_the_accounts_limit_of_its_own(throttle):
    assert fail(throttle, 5, step=0, address=None)[-1] == 30  # the guesser, from nowhere in particular
    assert fail(throttle, 6, at=T0 + 1, device="stolen-copy") == [0, 0, 0, 0, 30, -1]
    assert throttle.wait(BOB, HOME, now=T0 + 7, device="my-laptop") == 0  # another browser is not held
    throttle.succeeded(throttle.attempt(BOB, HOME, now=T0 + 7, device="my-laptop"))
    assert throttle.attempt(BOB, HOME, now=T0 + 8, device="stolen-copy").wait > 0


def test_a_known_browser_is_not_held_by_its_address_nor_counted_there(throttle):
    """A clinic's shared address blocked by a guesser among its users does not keep the staff out."""
    for n in range(19):
        throttle.attempt(f"user-{n}@x", HOME, now=T0)
    assert fail(throttle, 4, login="carol@x", at=T0 + 1, device="front-desk") == [0, 0, 0, 0]
    assert fail(throttle, 1, login="someone-new@x", at=T0 + 5) == [30]  # the address's 20th: the four were not
    assert throttle.wait("dora@x", HOME, now=T0 + 6) > 0
    assert throttle.attempt("carol@x", HOME, now=T0 + 6, device="front-desk").wait == 0


def test_known_browsers_at_one_address_share_a_larger_limit_of_their_own(throttle):
    """Someone signing in to their own account again and again, for a new device id each time, and
    failing with each: bounded per address like everyone, without touching the others' limit."""
    earned = [e for n in range(25) for e in fail(throttle, 4, login=f"mine-{n}@x", at=T0 + n, device=f"new-{n}")]
    assert earned == [0] * 99 + [30]  # four each: no browser reached its own limit
    assert throttle.attempt("mine-99@x", HOME, now=T0 + 30, device="fresh-99").wait > 0
    assert throttle.attempt("mine-99@x", "10.0.0.2", now=T0 + 30, device="fresh-99").wait == 0
    assert throttle.attempt("carol@x", HOME, now=T0 + 30).wait == 0  # strangers have their own limit


def test_a_known_browsers_success_clears_only_that_browser(throttle):
    fail(throttle, 3, step=0)
    assert fail(throttle, 4, at=T0 + 1, device="my-laptop") == [0, 0, 0, 0]
    throttle.succeeded(throttle.attempt(BOB, HOME, now=T0 + 5, device="my-laptop"))
    assert fail(throttle, 5, at=T0 + 6, step=0, device="my-laptop") == [0, 0, 0, 0, 30]  # afresh
    assert fail(throttle, 2, at=T0 + 6, step=0) == [0, 30]  # the account kept its three failures


def refuse_tokens(throttle, times, address=HOME, at=None) -> list[float]:
    """``times`` bearer access tokens refused from ``address``; the block each one earned (-1: the
    address was blocked, the token not even checked)."""
    at = T0 if at is None else at
    earned = []
    for _ in range(times):
        attempt = throttle.token_attempt(address, now=at)
        earned.append(-1 if attempt.wait > 0 else attempt.earned)
    return earned


def test_refused_access_tokens_cost_nothing_until_the_address_has_had_a_hundred():
    throttle = LoginThrottle(MemoryThrottleStore())  # the limits as shipped
    assert refuse_tokens(throttle, 99) == [0] * 99
    assert refuse_tokens(throttle, 1) == [30]
    refused = throttle.token_attempt(HOME, now=T0 + 1)
    assert refused.id is None and refused.wait == pytest.approx(29)
    assert throttle.token_attempt("10.0.0.2", now=T0 + 1).wait == 0  # other addresses are heard


def test_a_burst_of_tokens_sent_at_once_is_counted_one_by_one(throttle):
    """Counted before the check: a burst all checked before the first refusal came back was let through
    whole (review)."""
    throttle.token_address = Limit(free=3)
    burst = [throttle.token_attempt(HOME, now=T0) for _ in range(10)]  # none answered yet
    assert [attempt.wait > 0 for attempt in burst] == [False] * 3 + [True] * 7


def test_a_good_token_or_one_that_could_not_be_checked_is_taken_back(throttle):
    throttle.token_address = Limit(free=3)
    for _ in range(10):
        throttle.withdraw(throttle.token_attempt(HOME, now=T0))
    assert refuse_tokens(throttle, 3) == [0, 0, 30]


def test_each_block_of_an_address_for_its_tokens_doubles(throttle):
    throttle.token_address = Limit(free=3)
    assert refuse_tokens(throttle, 3) == [0, 0, 30]
    assert refuse_tokens(throttle, 5, at=T0 + 10) == [-1] * 5
    assert refuse_tokens(throttle, 1, at=T0 + 31) == [60]  # the next refusal after a block blocks again


def test_refused_access_tokens_and_wrong_passwords_are_counted_apart(throttle):
    throttle.token_address = Limit(free=3)
    assert refuse_tokens(throttle, 3) == [0, 0, 30]
    assert throttle.attempt(BOB, HOME, now=T0 + 1).wait == 0  # sign-in at that address goes on
    for n in range(19):  # with bob's, the address's twentieth wrong password blocks sign-in there
        throttle.attempt(f"user{n}@x", HOME, now=T0 + 2)
    assert throttle.wait("dora@x", HOME, now=T0 + 31) > 0
    assert throttle.token_attempt(HOME, now=T0 + 31).wait == 0  # but not its tokens, whose own block is over
    assert throttle.token_attempt(None).wait == 0  # no address: not counted
