"""Property-based fuzzing (hypothesis) of every parser that meets untrusted input.

The properties: any input gives a result or the parser's own refusal, never
another exception; the frame parser gives the same answer however the bytes
are split. The number of inputs per target is ``EXAMPLES`` (the README's
Security section reports it).
"""

from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from wsframes import client_frame

from relay import frames
from relay.broadcast import BroadcastError, BroadcastRequest, parse_body
from relay.channels import refusal
from relay.frames import FrameParser, ProtocolViolation
from relay.hub import Hub
from relay.protocol import ClientProtocol
from relay.tokens import TokenError, TokenService

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the frame parser ------------------------------------------------------------------------

opcodes = st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB, 0xF])
frame_specs = st.tuples(
    opcodes,
    st.binary(max_size=300),
    st.booleans(),  # fin
    st.booleans(),  # masked
    st.sampled_from([0, 0, 0, 0x10, 0x40]),  # rsv bits
)


def outcome(parser: FrameParser, pieces: list[bytes]):
    """Every message, in order, and how it ended: ("ok",) or ("violation", code)."""
    got = []
    try:
        for piece in pieces:
            got.extend(parser.feed(piece))
    except ProtocolViolation as violation:
        return got + violation.messages, ("violation", violation.code)
    return got, ("ok",)


@fuzz
@given(st.lists(frame_specs, max_size=8), st.binary(max_size=64), st.lists(st.integers(0, 4000), max_size=6))
# Found at 20,000 inputs: a text frame inside an unfinished message, seen half-arrived, must stay a 1002.
@example(specs=[(1, b"", False, True, 0), (1, b"\x80\x00\x00\x00\x00", False, True, 0)], junk=b"", cuts=[589])
def test_any_byte_stream_split_anywhere_gives_the_same_messages_or_the_same_violation(specs, junk, cuts):
    stream = b"".join(client_frame(op, data, fin=fin, masked=masked, rsv=rsv) for op, data, fin, masked, rsv in specs)
    stream += junk
    cuts = sorted({c % (len(stream) + 1) for c in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = outcome(FrameParser(1024), [stream])
    split = outcome(FrameParser(1024), pieces)
    assert whole == split
    for opcode, payload in whole[0]:
        assert opcode in (frames.OP_TEXT, frames.OP_BINARY, frames.OP_PING, frames.OP_PONG, frames.OP_CLOSE)
        if opcode == frames.OP_TEXT:
            assert isinstance(payload, str)


@fuzz
@given(st.binary(max_size=2000))
def test_raw_bytes_never_raise_anything_but_a_protocol_violation(data):
    try:
        FrameParser(512).feed(data)
    except ProtocolViolation as violation:
        assert violation.code in (1002, 1007, 1009)


# -- tokens ----------------------------------------------------------------------------------

tokens = TokenService("s" * 40, 600_000)


@fuzz
@given(st.one_of(st.text(max_size=3000), st.binary(max_size=2000).map(lambda b: b.decode("latin-1"))))
def test_any_token_text_is_a_user_or_a_stated_refusal(text):
    try:
        user_id = tokens.verify(text)
    except TokenError as refused:
        assert refused.reason and str(refused)
    else:
        assert isinstance(user_id, str)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@fuzz
@given(st.dictionaries(st.sampled_from(["userId", "timestamp", "signature", "x"]), json_values, max_size=4))
def test_any_token_json_is_a_user_or_a_stated_refusal(payload):
    import base64

    try:
        tokens.verify(base64.b64encode(json.dumps(payload).encode()).decode())
    except TokenError as refused:
        assert refused.reason


# -- the broadcast body ------------------------------------------------------------------------

bodies = st.one_of(
    st.binary(max_size=500),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"message": st.dictionaries(st.sampled_from(["type", "data", "id"]), json_values, max_size=3)},
        optional={"filter": st.dictionaries(st.sampled_from(["userIds", "roles", "channels", "x"]), json_values)},
    ).map(lambda v: json.dumps(v).encode()),
)


@fuzz
@given(bodies)
def test_any_body_is_a_request_or_a_stated_refusal(body):
    try:
        request = parse_body(body)
    except BroadcastError as refused:
        assert refused.code and len(refused.message) > 5
    else:
        assert isinstance(request, BroadcastRequest)
        json.dumps(request.data, allow_nan=False)  # whatever is accepted can be framed as JSON


# -- SUBSCRIBE ---------------------------------------------------------------------------------


class Conn:
    def __init__(self):
        self.id, self.admitted = "c", True
        self.user_id, self.role, self.clinic_id = "bob", "sales_staff", "clinic-1"
        self.channels: set[str] = set()
        self.rate_tokens = self.rate_at = 0.0
        self.backlog = None
        self.state = "open"
        self.sent: list[dict] = []

    def push(self, frame):
        self.sent.append(json.loads(frame[2:] if frame[1] < 126 else frame[4:]))
        return True

    send_now = push

    def close(self, code, reason=""):
        self.state = "closing"


channel_names = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["system:announcements", "clinic:clinic-1:queue", "clinic:clinic-2:queue", "user:bob:notifications"]
    ),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, st.fixed_dictionaries({"channels": st.lists(channel_names, max_size=8)})))
def test_any_subscribe_data_gets_errors_and_subscribed_or_one_error_and_only_allowed_channels(data):
    hub = Hub(max_clients=10, ping_interval=30)
    protocol = ClientProtocol(hub, max_subscriptions=5, rate_burst=10**9)
    conn = Conn()
    hub.add(conn)
    protocol.on_text(conn, json.dumps({"type": "SUBSCRIBE", "data": data}))
    assert conn.sent, "every request is answered"
    kinds = [message["type"] for message in conn.sent]
    assert set(kinds) <= {"ERROR", "SUBSCRIBED"} and kinds.count("SUBSCRIBED") <= 1
    assert all(refusal(conn, name) is None for name in conn.channels) and len(conn.channels) <= 5
