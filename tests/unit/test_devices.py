"""The device cookie: which accounts this browser has signed in to, as only this server can write it."""

from __future__ import annotations

import hashlib
import secrets

import pytest
from itsdangerous import URLSafeSerializer

from relay.devices import MAX_ACCOUNTS, MAX_AGE_S, KnownDevices
from relay.throttle import account_key

SECRET = "s" * 32
T0 = 1_800_000_000.0


@pytest.fixture
def devices() -> KnownDevices:
    return KnownDevices(SECRET)


def test_a_browser_that_signed_in_is_known_for_that_account_only(devices):
    cookie = devices.remember(None, "bob@x", now=T0)
    device = devices.device_of(cookie, "bob@x", now=T0 + 60)
    assert device and len(device) >= 16
    assert devices.device_of(cookie, "carol@x", now=T0 + 60) is None
    assert devices.device_of(cookie, " BOB@X", now=T0 + 60) == device  # the throttle's one account


def test_the_cookie_holds_no_readable_name_not_even_a_hash_to_test_guesses_against(devices):
    cookie = devices.remember(None, "bob@x", now=T0)
    digest = URLSafeSerializer(SECRET, salt="relay.device-cookie").loads(cookie)[0][0]
    plain = account_key("bob@x").partition(":")[2]
    assert "bob" not in cookie and plain not in cookie and hashlib.sha256(b"bob@x").hexdigest()[:32] != digest
    other_key = KnownDevices("t" * 32).remember(None, "bob@x", now=T0)
    assert URLSafeSerializer("t" * 32, salt="relay.device-cookie").loads(other_key)[0][0] != digest


def test_a_sign_in_keeps_the_browsers_id_for_the_account_and_dates_it_anew(devices):
    """The id is the browser's: signing in again gives no new limit, and the entry lasts 90 days from then."""
    first = devices.remember(None, "bob@x", now=T0)
    second = devices.remember(first, "carol@x", now=T0 + 10)
    third = devices.remember(second, "bob@x", now=T0 + MAX_AGE_S - 5)
    assert devices.device_of(third, "bob@x", now=T0 + MAX_AGE_S + 60) == devices.device_of(first, "bob@x", now=T0)
    assert devices.device_of(third, "carol@x", now=T0 + 20) == devices.device_of(second, "carol@x", now=T0 + 20)
    elsewhere = devices.remember(None, "bob@x", now=T0)  # another browser
    assert devices.device_of(elsewhere, "bob@x", now=T0) != devices.device_of(first, "bob@x", now=T0)


def test_a_shared_computer_keeps_the_most_recent_accounts(devices):
    cookie = None
    for n in range(MAX_ACCOUNTS + 2):
        cookie = devices.remember(cookie, f"user-{n}@x", now=T0 + n)
    known = [n for n in range(MAX_ACCOUNTS + 2) if devices.device_of(cookie, f"user-{n}@x", now=T0 + 20)]
    assert known == list(range(2, MAX_ACCOUNTS + 2))
    assert len(cookie) < 1500  # well inside a browser's 4 KB per cookie


def test_an_entry_is_honoured_for_ninety_days_after_its_sign_in(devices):
    cookie = devices.remember(None, "bob@x", now=T0)
    assert devices.device_of(cookie, "bob@x", now=T0 + MAX_AGE_S - 1)
    assert devices.device_of(cookie, "bob@x", now=T0 + MAX_AGE_S + 1) is None
    assert devices.device_of(cookie, "bob@x", now=T0 - 3600) is None  # written an hour in the future


def forged(entries, secret=SECRET) -> str:
    return URLSafeSerializer(secret, salt="relay.device-cookie").dumps(entries)


def real_digest(devices) -> str:
    return URLSafeSerializer(SECRET, salt="relay.device-cookie").loads(devices.remember(None, "bob@x", now=T0))[0][0]


BAD_COOKIES = {
    "empty": lambda d: "",
    "not a cookie of ours": lambda d: "eyJhIjoxfQ.abc",
    "another key's signature": lambda d: forged([[real_digest(d), "id", int(T0)]], secret="t" * 32),
    "the session cookie's salt": lambda d: URLSafeSerializer(SECRET).dumps([[real_digest(d), "id", int(T0)]]),
    "altered": lambda d: d.remember(None, "bob@x", now=T0)[:-2] + "xx",
    "not a list": lambda d: forged({"bob": "id"}),
    "an entry too short": lambda d: forged([[real_digest(d), "id"]]),
    "an id that is not text": lambda d: forged([[real_digest(d), 7, int(T0)]]),
    "a time that is not a number": lambda d: forged([[real_digest(d), "id", "yesterday"]]),
    "over 4 KB, though signed": lambda d: forged([[real_digest(d), secrets.token_urlsafe(4000), int(T0)]]),
}


@pytest.mark.parametrize("name", BAD_COOKIES)
def test_a_cookie_that_is_not_ours_as_written_knows_no_one(devices, name):
    cookie = BAD_COOKIES[name](devices)
    assert devices.device_of(cookie, "bob@x", now=T0 + 1) is None
    fresh = devices.remember(cookie, "bob@x", now=T0 + 1)  # and a sign-in writes a good one over it
    assert devices.device_of(fresh, "bob@x", now=T0 + 2)


def test_a_well_formed_forgery_with_the_right_key_is_the_only_way_in(devices):
    """The check above is the signature, not the shape: this one is signed with the server's secret."""
    assert devices.device_of(forged([[real_digest(devices), "id", int(T0)]]), "bob@x", now=T0 + 1) == "id"


def test_without_a_secret_no_browser_is_known():
    assert KnownDevices(None).device_of(forged([["x", "id", int(T0)]]), "bob@x", now=T0) is None
    with pytest.raises(RuntimeError, match="SECRET_KEY"):
        KnownDevices(None).remember(None, "bob@x")
