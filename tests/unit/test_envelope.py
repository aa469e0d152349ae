"""Envelopes: the frame clients get, and the same bytes after a trip through a broker or the history."""

import json

import pytest

from relay import envelope as envelope_module
from relay.envelope import Envelope, Filter


def decoded(frame: bytes) -> dict:
    return json.loads(frame[2:] if frame[1] < 126 else frame[4:])


def test_a_placed_envelope_frames_type_data_id_and_offset_exactly():
    envelope = Envelope("QUEUE_UPDATE", {"queue": [1, 2]}, id="abc").placed("e1", 7)
    assert decoded(envelope.frame()) == {"type": "QUEUE_UPDATE", "data": {"queue": [1, 2]}, "id": "abc", "offset": 7}
    assert list(decoded(envelope.frame())) == ["type", "data", "id", "offset"]


def test_without_a_place_there_is_no_offset_on_the_wire():
    assert "offset" not in decoded(Envelope("A", {}).frame())


def test_a_last_value_is_the_original_message_plus_last_true():
    envelope = Envelope("QUEUE_UPDATE", {"n": 1}, id="abc").placed("e1", 3)
    assert decoded(envelope.last_frame()) == {**decoded(envelope.frame()), "last": True}


DATA = [
    {"message": "héllo ✓", "nested": {"list": [1, 2.5, None, True, -0.0, 1e-7, 12345678901234567890]}},
    ["a", {"b": []}],
    "text",
    2.5,
    None,
]


@pytest.mark.parametrize("data", DATA, ids=[type(d).__name__ for d in DATA])
def test_the_frame_rebuilt_from_json_is_byte_for_byte_the_live_one(data):
    live = Envelope("A", data, Filter(user_ids=frozenset({"u"}), channels=frozenset({"c"}))).placed("e1", 42)
    carried = Envelope.from_json(json.loads(json.dumps(live.to_json())))  # a broker's trip
    stored = live.to_json()
    stored.pop("offset"), stored.pop("epoch")
    replayed = Envelope.from_json(json.loads(json.dumps(stored)), offset=42, epoch="e1")  # the history's
    assert carried.frame() == live.frame() == replayed.frame()
    assert carried.filter == live.filter == replayed.filter and replayed.at == live.at


def test_filters_admit_by_every_given_field():
    flt = Filter(clinic_ids=frozenset({"c-1"}), channels=frozenset({"clinic:c-1:queue"}))
    assert flt.admits("bob", "sales_staff", "c-1", {"clinic:c-1:queue"})
    assert not flt.admits("bob", "sales_staff", "c-2", {"clinic:c-1:queue"})
    assert not flt.admits("bob", "sales_staff", "c-1", set())
    assert Filter().admits(None, None, None, ())


def test_equal_filters_read_from_json_are_one_shared_object():
    first = Envelope.from_json({"id": "a", "type": "T", "filter": {"roles": ["nurse"], "channels": ["x"]}})
    second = Envelope.from_json({"id": "b", "type": "T", "filter": {"channels": ["x"], "roles": ["nurse"]}})
    other = Envelope.from_json({"id": "c", "type": "T", "filter": {"roles": ["admin"]}})
    assert first.filter is second.filter
    assert other.filter is not first.filter and other.filter == Filter(roles=frozenset({"admin"}))


def test_the_interned_table_is_bounded(monkeypatch):
    monkeypatch.setattr(envelope_module, "_INTERNED", {})
    monkeypatch.setattr(envelope_module, "INTERNED_MAX", 3)
    for n in range(10):
        envelope_module.interned(Filter(user_ids=frozenset({f"u{n}"})))
        assert len(envelope_module._INTERNED) <= 3
    again = Filter(user_ids=frozenset({"u9"}))
    assert envelope_module.interned(again) == again


def test_a_large_audience_is_not_kept_by_the_interned_table(monkeypatch):
    """4,096 distinct lists of 1,000 user ids, kept here, held ~490 MB long after their broadcasts."""
    monkeypatch.setattr(envelope_module, "_INTERNED", {})
    many = Filter(user_ids=frozenset(f"u{n}" for n in range(envelope_module.INTERNED_MAX_VALUES + 1)))
    assert envelope_module.interned(many) is many and not envelope_module._INTERNED
    few = Filter(user_ids=frozenset(f"u{n}" for n in range(envelope_module.INTERNED_MAX_VALUES)))
    assert envelope_module.interned(few) is few and len(envelope_module._INTERNED) == 1
