"""parse_body: the /broadcast contract, every refusal, and the documented limits at their exact edges."""

from __future__ import annotations

import json

import pytest

from relay.broadcast import (
    MAX_BODY_BYTES,
    MAX_FILTER_VALUE_CHARS,
    MAX_FILTER_VALUES,
    BroadcastError,
    parse_body,
)
from relay.codes import HttpError
from relay.envelope import Filter

GOOD = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "hi"}}}


def body(doc) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def sized(total: int) -> bytes:
    """A valid body of exactly ``total`` bytes."""
    empty = body({"message": {"type": "A", "data": ""}})
    return body({"message": {"type": "A", "data": "x" * (total - len(empty))}})


REFUSALS = [
    ("not json", b"{nope", HttpError.INVALID_JSON),
    ("not utf-8", b"\xff\xfe", HttpError.INVALID_JSON),
    ("empty", b"", HttpError.INVALID_JSON),
    ("NaN in data", b'{"message": {"type": "A", "data": NaN}}', HttpError.INVALID_JSON),
    ("Infinity in data", b'{"message": {"type": "A", "data": {"x": -Infinity}}}', HttpError.INVALID_JSON),
    ("array", [1], HttpError.INVALID_BODY),
    ("no message", {"filter": {}}, HttpError.INVALID_BODY),
    ("message not object", {"message": "hi"}, HttpError.INVALID_BODY),
    ("no type", {"message": {"data": {}}}, HttpError.INVALID_BODY),
    ("lower-case type", {"message": {"type": "announcement"}}, HttpError.INVALID_BODY),
    ("type with dash", {"message": {"type": "QUEUE-UPDATE"}}, HttpError.INVALID_BODY),
    ("type starts with a digit", {"message": {"type": "1A"}}, HttpError.INVALID_BODY),
    ("type of 65", {"message": {"type": "A" * 65}}, HttpError.INVALID_BODY),
    ("extra message field", {"message": {"type": "A", "id": "x"}}, HttpError.INVALID_BODY),
    ("extra body field", {**GOOD, "channels": ["system:announcements"]}, HttpError.INVALID_BODY),
    ("misspelled filter key", {**GOOD, "filter": {"channel": ["system:announcements"]}}, HttpError.INVALID_BODY),
    ("filter not object", {**GOOD, "filter": ["x"]}, HttpError.INVALID_BODY),
    ("filter value not list", {**GOOD, "filter": {"roles": "admin"}}, HttpError.INVALID_BODY),
    ("filter value not strings", {**GOOD, "filter": {"userIds": [1]}}, HttpError.INVALID_BODY),
    ("filter empty string", {**GOOD, "filter": {"userIds": [""]}}, HttpError.INVALID_BODY),
    (
        "filter value too long",
        {**GOOD, "filter": {"userIds": ["u" * (MAX_FILTER_VALUE_CHARS + 1)]}},
        HttpError.INVALID_BODY,
    ),
    (
        "too many filter values",
        {**GOOD, "filter": {"clinicIds": ["c"] * (MAX_FILTER_VALUES + 1)}},
        HttpError.INVALID_BODY,
    ),
    ("one byte over 64 KiB", sized(MAX_BODY_BYTES + 1), HttpError.BODY_TOO_LARGE),
]


@pytest.mark.parametrize("name,doc,code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_refusal_has_a_code_and_a_readable_message(name, doc, code):
    with pytest.raises(BroadcastError) as refused:
        parse_body(body(doc))
    assert refused.value.code == code and len(refused.value.message) > 10


NOT_JSON = [
    (b"{nope", "Expecting property name enclosed in double quotes at line 1, column 2"),
    (b'{"message": {"type": "A",\n  "data": [1, 2,]}}', "Expecting value at line 2, column 17"),
    (b'{"message": {"type": "A", "data": NaN}}', "NaN is not JSON (send null, or the value as a string)"),
    (b'{"message": {"type": "A", "data": "\xff"}}', "it is not UTF-8 (the byte at offset 35, counting from 0)"),
    (b'\xef\xbb\xbf{"message": "\xff"}', "it is not UTF-8 (the byte at offset 16, counting from 0)"),  # after a BOM
    (b'{"a": "abc', "Unterminated string starting at line 1, column 7"),  # the parser's own "at" not doubled
    (b'{"a": "x\x01"}', "Invalid control character at line 1, column 9"),
    (b"  \n", "the body is empty"),
]


@pytest.mark.parametrize("sent,why", NOT_JSON)
def test_a_body_that_is_not_json_is_told_where(sent, why):
    """A caller looking at a 64 KB body they built is told the line and column (or what else is wrong)."""
    with pytest.raises(BroadcastError) as refused:
        parse_body(sent)
    assert refused.value.code == HttpError.INVALID_JSON
    assert refused.value.message == f"the body is not valid JSON: {why}"


def test_a_body_of_exactly_64_kib_is_accepted():
    assert len(sized(MAX_BODY_BYTES)) == MAX_BODY_BYTES
    assert parse_body(sized(MAX_BODY_BYTES)).type == "A"


def test_the_limits_themselves_are_accepted():
    request = parse_body(
        body(
            {
                "message": {"type": "A" * 64},
                "filter": {"userIds": ["u" * MAX_FILTER_VALUE_CHARS], "clinicIds": ["c"] * MAX_FILTER_VALUES},
            }
        )
    )
    assert request.type == "A" * 64 and request.filter.clinic_ids == frozenset({"c"})


@pytest.mark.parametrize("data", [{"message": "x"}, [1, 2], "text", 3, 2.5, True, None])
def test_data_may_be_any_json_and_is_kept_exactly(data):
    assert parse_body(body({"message": {"type": "A", "data": data}})).data == data


def test_missing_data_means_an_empty_object():
    assert parse_body(body({"message": {"type": "A"}})).data == {}


def test_the_filter_is_read_into_sets_and_empty_lists_count_as_not_given():
    request = parse_body(body({**GOOD, "filter": {"userIds": ["b", "a", "b"], "roles": [], "channels": []}}))
    assert request.filter == Filter(user_ids=frozenset({"a", "b"}))
    assert parse_body(body(GOOD)).filter.everyone and parse_body(body({**GOOD, "filter": None})).filter.everyone


def _nested(depth: int) -> bytes:
    return b'{"message":{"type":"ALERT","data":' + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize("depth", [63, 900, 972, 3000])
def test_data_nested_past_the_limit_is_refused_before_anything_is_recorded(depth):
    """~970 levels parse but no longer encode a few calls deeper, after the history has the broadcast:
    the worker's window of recent broadcasts then failed on every later one. Refused at the door."""
    with pytest.raises(BroadcastError) as refused:
        parse_body(_nested(depth))
    assert refused.value.code == HttpError.INVALID_BODY and "nested more than 64 levels" in str(refused.value)


def test_data_nested_within_the_limit_is_accepted():
    assert parse_body(_nested(62)).data == json.loads(b"[" * 62 + b"]" * 62)


@pytest.mark.parametrize(
    "body",
    [
        rb'{"message":{"type":"ALERT","data":{"text":"\ud800"}}}',
        rb'{"message":{"type":"ALERT","data":{"\udfff":1}}}',
        rb'{"message":{"type":"ALERT"},"filter":{"userIds":["u\ud83d"]}}',
    ],
    ids=["value", "key", "filter"],
)
def test_an_unpaired_surrogate_escape_is_refused_it_is_not_text_any_frame_can_carry(body):
    with pytest.raises(BroadcastError) as refused:
        parse_body(body)
    assert refused.value.code == HttpError.INVALID_BODY and "not valid Unicode" in str(refused.value)


@pytest.mark.parametrize(
    "number",
    [b"1e400", b"-1e400", b"[1, 2e308]", b"2" + b"0" * 308, b"-" + b"9" * 400, b"9" * 5000],
    ids=["1e400", "-1e400", "2e308", "int-2e308", "int-400-digits", "int-5000-digits"],
)
def test_a_number_too_large_for_a_float_is_refused_a_browser_would_drop_the_whole_frame(number):
    """json.loads makes 1e400 inf, which would go out as Infinity: JSON.parse refuses that frame."""
    with pytest.raises(BroadcastError) as refused:
        parse_body(b'{"message":{"type":"ALERT","data":{"x":' + number + b"}}}")
    assert refused.value.code == HttpError.INVALID_BODY and "too large" in str(refused.value)
    assert parse_body(b'{"message":{"type":"ALERT","data":{"x":1e308}}}').data == {"x": 1e308}
    big = b"1" + b"0" * 307  # 1e307 written out: a double holds it
    assert parse_body(b'{"message":{"type":"ALERT","data":{"x":' + big + b"}}}").data == {"x": int(big)}


def test_a_paired_surrogate_escape_is_a_character_and_is_accepted():
    assert parse_body(rb'{"message":{"type":"ALERT","data":{"text":"\ud83d\ude00"}}}').data == {"text": "\U0001f600"}
