"""Connection tokens: the wire format, and every way a token is refused."""

import base64
import hashlib
import hmac
import json

import pytest

from relay.tokens import MAX_FUTURE_MS, TokenError, TokenService

SECRET = "s" * 40
NOW = 1_750_000_000_000
TTL = 600_000
service = TokenService(SECRET, TTL)


def raw_token(payload, *, encode=base64.b64encode) -> str:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return encode(body).decode()


def signed(user_id="bob", timestamp=NOW, secret=SECRET) -> dict:
    sig = hmac.new(secret.encode(), f"{user_id}:{timestamp}".encode(), hashlib.sha256).hexdigest()
    return {"userId": user_id, "timestamp": timestamp, "signature": sig}


def test_minted_token_is_base64_json_with_hmac_of_user_and_timestamp():
    token = service.mint("bob", NOW)
    payload = json.loads(base64.b64decode(token))
    assert payload == signed("bob", NOW)
    assert service.verify(token, now=NOW) == "bob"


def test_a_token_says_whose_it_is_and_when_it_was_minted():
    assert service.claims(raw_token(signed("bob", NOW - 5_000)), now=NOW) == ("bob", NOW - 5_000)
    assert service.claims(service.mint("carol", NOW), now=NOW).issued_ms == NOW
    with pytest.raises(TokenError):
        service.claims(raw_token({**signed("bob"), "timestamp": NOW - 1}), now=NOW)  # the signature is of NOW


@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda b: base64.b64encode(b).rstrip(b"="),
        lambda b: base64.urlsafe_b64encode(b).rstrip(b"="),
    ],
    ids=["standard", "urlsafe", "standard-unpadded", "urlsafe-unpadded"],
)
def test_both_base64_alphabets_are_accepted_padded_or_not(encode):
    # A user id chosen so that its base64 contains '+' or '/' in the standard alphabet.
    payload = signed("user>>>???", NOW)
    assert service.verify(raw_token(payload, encode=encode), now=NOW) == "user>>>???"


def test_plus_sign_turned_into_space_by_an_unencoded_query_is_tolerated():
    token = raw_token(signed("user>>>???", NOW))
    assert "+" in token
    assert service.verify(token.replace("+", " "), now=NOW) == "user>>>???"


REJECTIONS = [
    ("missing", None),
    ("missing", ""),
    ("too_long", "A" * 2049),
    ("not_base64", "not base64!*"),
    ("not_base64", "abcde"),  # impossible length
    ("not_json", raw_token(b"\xff\xfe not json")),
    ("not_object", raw_token([1, 2, 3])),
    ("not_object", raw_token("a string")),
    ("missing_field", raw_token({"userId": "bob", "timestamp": NOW})),
    ("missing_field", raw_token({"timestamp": NOW, "signature": "00"})),
    ("missing_field", raw_token({"userId": "bob", "signature": "00"})),
    ("bad_field", raw_token({**signed(), "userId": 42})),
    ("bad_field", raw_token({**signed(), "userId": ""})),
    ("bad_field", raw_token({**signed(), "userId": "\ud800"})),  # parses; cannot be signed (was a 1011)
    ("bad_field", raw_token({**signed(), "timestamp": str(NOW)})),
    ("bad_field", raw_token({**signed(), "timestamp": True})),
    ("bad_field", raw_token({**signed(), "timestamp": float(NOW)})),
    ("bad_field", raw_token({**signed(), "signature": 1234})),
    ("bad_signature", raw_token(signed(secret="another secret entirely, 40 bytes long!"))),
    ("bad_signature", raw_token({**signed("bob"), "userId": "alice"})),
    ("bad_signature", raw_token({**signed(), "signature": "é" * 64})),
    ("expired", raw_token(signed(timestamp=NOW - TTL - 1))),
    ("future", raw_token(signed(timestamp=NOW + MAX_FUTURE_MS + 1))),
]


@pytest.mark.parametrize("reason,token", REJECTIONS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(REJECTIONS)])
def test_each_rejection_has_its_own_reason(reason, token):
    with pytest.raises(TokenError) as refused:
        service.verify(token, now=NOW)
    assert refused.value.reason == reason


def test_token_at_the_edges_of_its_lifetime_is_accepted():
    assert service.verify(raw_token(signed(timestamp=NOW - TTL)), now=NOW) == "bob"
    assert service.verify(raw_token(signed(timestamp=NOW + MAX_FUTURE_MS)), now=NOW) == "bob"


def test_expired_token_names_its_user_but_a_forged_one_does_not():
    with pytest.raises(TokenError) as expired:
        service.verify(raw_token(signed(timestamp=NOW - TTL - 1)), now=NOW)
    assert expired.value.user_id == "bob"
    with pytest.raises(TokenError) as forged:
        service.verify(raw_token({**signed("bob"), "userId": "alice"}), now=NOW)
    assert forged.value.user_id is None


def token_of_2048_chars() -> str:
    """A valid, signed token of exactly 2048 characters: 1536 bytes of JSON (padded with spaces) in base64."""
    payload = json.dumps(signed())
    return base64.b64encode((payload + " " * (1536 - len(payload))).encode()).decode()


def test_the_2_kib_token_limit_is_exact():
    token = token_of_2048_chars()
    assert len(token) == 2048 and service.verify(token, now=NOW) == "bob"
    with pytest.raises(TokenError) as refused:
        service.verify(token + "=", now=NOW)  # one character more
    assert refused.value.reason == "too_long"


def test_during_a_key_rotation_tokens_of_the_previous_key_are_still_accepted():
    old, new = "o" * 40, "n" * 40
    rotating = TokenService(new, TTL, previous=old)
    assert rotating.verify(TokenService(old, TTL).mint("bob", NOW), now=NOW) == "bob"  # handed out before
    assert rotating.verify(rotating.mint("bob", NOW), now=NOW) == "bob"
    minted = json.loads(base64.b64decode(rotating.mint("bob", NOW)))
    assert minted["signature"] == signed(timestamp=NOW, secret=new)["signature"]  # new ones: the new key
    with pytest.raises(TokenError) as refused:
        rotating.verify(TokenService("u" * 40, TTL).mint("bob", NOW), now=NOW)  # neither key
    assert refused.value.reason == "bad_signature"
    with pytest.raises(TokenError):
        TokenService(new, TTL).verify(TokenService(old, TTL).mint("bob", NOW), now=NOW)  # rotation over


def test_a_token_of_deeply_nested_json_is_not_json_not_a_crash():
    token = base64.b64encode(b"[" * 1500).decode()  # within the 2,048 characters a token may have
    with pytest.raises(TokenError) as refused:
        TokenService("s" * 40, 60_000).verify(token)
    assert refused.value.reason == "not_json"


def test_a_signature_starts_from_the_key_alone_every_time():
    """Signatures copy a keyed HMAC state: one that leaked into the next would fail the second check."""
    rotating = TokenService("n" * 40, TTL, previous="o" * 40)
    old = TokenService("o" * 40, TTL)
    for _ in range(3):
        assert rotating.verify(old.mint("alice", NOW), now=NOW) == "alice"
        assert rotating.verify(rotating.mint("bob", NOW), now=NOW) == "bob"
    assert (
        json.loads(base64.b64decode(rotating.mint("bob", NOW)))["signature"]
        == signed(timestamp=NOW, secret="n" * 40)["signature"]
    )


def test_every_reason_a_socket_is_refused_for_has_its_metric_series_from_the_start():
    """A dashboard's rate over realtime_auth_failures_total{reason=...} needs the series before the first
    failure: every reason the code can give is listed (read from the source, so a new one cannot be missed)."""
    import re
    from pathlib import Path

    from relay.metrics import AUTH_FAILURE_REASONS

    relay = Path(__file__).resolve().parents[2] / "relay"
    given = set(re.findall(r'TokenError\("([a-z0-9_]+)"', (relay / "tokens.py").read_text()))
    service = (relay / "service.py").read_text()
    given |= set(re.findall(r'auth_failed\("([a-z0-9_]+)"\)', service))
    given |= set(re.findall(r'reason = "([a-z0-9_]+)"$', service, re.MULTILINE))
    given |= set(re.findall(r'self\._refuse\(\s*conn,\s*Close\.[A-Z_]+,\s*reason="([a-z0-9_]+)"', service))
    given |= {
        word for pair in re.findall(r'reason = "([a-z0-9_]+)" if .* else "([a-z0-9_]+)"', service) for word in pair
    }
    expected = {"not_base64", "unknown_user", "user_disabled", "disconnected", "directory_unavailable", "signed_out"}
    assert expected <= given
    assert given <= set(AUTH_FAILURE_REASONS), given - set(AUTH_FAILURE_REASONS)
