"""RFC 6455 framing: server frames out, client frames in, and every violation's close code."""

import struct

import pytest
from wsframes import client_frame

from relay import frames
from relay.codes import Close
from relay.frames import FrameParser, ProtocolViolation


def parse(data: bytes, max_message=64 * 1024):
    return FrameParser(max_message).feed(data)


@pytest.mark.parametrize("size,header_len", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_server_frames_use_the_shortest_length_encoding(size, header_len):
    frame = frames.text(b"x" * size)
    assert len(frame) == size + header_len
    assert frame[0] == 0x81 and not frame[1] & 0x80  # FIN + text, unmasked


def test_close_frame_carries_code_and_reason_truncated_to_123_bytes():
    frame = frames.close(4401, "é" * 100)
    assert frame[0] == 0x88
    assert struct.unpack("!H", frame[2:4])[0] == 4401
    assert len(frame) - 4 <= 123
    frame[4:].decode("utf-8")  # never cut inside a character


def test_text_message_is_unmasked_and_decoded():
    assert parse(client_frame(frames.OP_TEXT, "héllo".encode())) == [(frames.OP_TEXT, "héllo")]


def test_several_frames_in_one_read_and_one_frame_over_many_reads():
    data = client_frame(frames.OP_TEXT, b'{"type":"PING"}') + client_frame(frames.OP_PING, b"p")
    assert parse(data) == [(frames.OP_TEXT, '{"type":"PING"}'), (frames.OP_PING, b"p")]
    parser = FrameParser(1 << 16)
    big = client_frame(frames.OP_TEXT, b"y" * 5000)
    got = []
    for i in range(0, len(big), 1000):
        got += parser.feed(big[i : i + 1000])
    assert got == [(frames.OP_TEXT, "y" * 5000)]


def test_byte_by_byte_delivery_reassembles():
    parser = FrameParser(1 << 16)
    frame = client_frame(frames.OP_TEXT, b"z" * 300)
    got = []
    for i in range(len(frame)):
        got += parser.feed(frame[i : i + 1])
    assert got == [(frames.OP_TEXT, "z" * 300)]


def test_fragmented_message_is_joined_and_control_frames_may_interleave():
    data = (
        client_frame(frames.OP_TEXT, b"ab", fin=False)
        + client_frame(frames.OP_PING, b"")
        + client_frame(frames.OP_CONTINUATION, b"cd", fin=False)
        + client_frame(frames.OP_CONTINUATION, b"ef")
    )
    assert parse(data) == [(frames.OP_PING, b""), (frames.OP_TEXT, "abcdef")]


MOST = 64 * 1024 // frames.FRAGMENT_BYTES


def test_the_service_takes_a_message_in_256_continuation_frames_at_most():
    """No more than its bytes whole would cost to parse: 4,096 empty fragments took 17 times as long."""
    assert MOST == 256


def fragmented(continuations: int) -> bytes:
    pieces = [client_frame(frames.OP_TEXT, b"a", fin=False)]
    pieces += [client_frame(frames.OP_CONTINUATION, b"b", fin=False)] * (continuations - 1)
    pieces.append(client_frame(frames.OP_CONTINUATION, b"c"))
    return b"".join(pieces)


def test_a_message_in_the_most_continuation_frames_allowed_is_joined_and_one_more_is_1009():
    assert parse(fragmented(MOST)) == [(frames.OP_TEXT, "a" + "b" * (MOST - 1) + "c")]
    with pytest.raises(ProtocolViolation) as failed:
        parse(fragmented(MOST + 1))
    assert failed.value.code == Close.MESSAGE_TOO_BIG


def test_a_larger_message_limit_allows_more_fragments():
    """Autobahn's 9.3.1 sends 4 MiB in 64-byte pieces to an endpoint that takes 16 MiB: a first frame (empty)
    and 65,536 continuations (counted in its report)."""
    piece = b"x" * 64
    frames_ = [client_frame(frames.OP_BINARY, b"", fin=False)]
    frames_ += [client_frame(frames.OP_CONTINUATION, piece, fin=False)] * (65_536 - 1)
    frames_.append(client_frame(frames.OP_CONTINUATION, piece))
    parser = FrameParser(16 << 20, max_frames=1 << 20)  # as conformance/echo_server.py has it
    assert parser.feed(b"".join(frames_)) == [(frames.OP_BINARY, piece * 65_536)]


def test_a_read_of_more_than_512_frames_stops_there_with_1008():
    """A 64 KiB read of empty pings is 10,922 frames, 15 ms to parse: one socket kept a worker busy."""
    ping = client_frame(frames.OP_PING, b"")
    flood = ping * (65_536 // len(ping))
    with pytest.raises(ProtocolViolation) as stopped:
        FrameParser(1 << 16).feed(flood)
    assert stopped.value.code == Close.POLICY_VIOLATION and "512 frames" in str(stopped.value)
    assert stopped.value.messages == [(frames.OP_PING, b"")] * frames.MAX_FRAMES_PER_READ  # parsed before it
    parser = FrameParser(1 << 16)  # 512 in one read, and again in the next: each read counts its own
    assert len(parser.feed(ping * 512)) == 512 and len(parser.feed(ping * 512)) == 512
    most = [client_frame(frames.OP_TEXT, b"", fin=False)]
    most += [client_frame(frames.OP_CONTINUATION, b"x" * 256, fin=False)] * (MOST - 1)
    most.append(client_frame(frames.OP_CONTINUATION, b"x" * 256))
    assert (
        FrameParser(1 << 16).feed(b"".join(most) + ping * 200)
        == [(frames.OP_TEXT, "x" * 256 * MOST)] + [(frames.OP_PING, b"")] * 200
    )  # a whole message in its most fragments, and more besides, in one read


def test_endless_empty_fragments_fail_the_message_with_1009_not_memory():
    """Its bytes never reach the limit, so the count of fragments must: each costs memory and time."""
    parser = FrameParser(1 << 16)
    parser.feed(client_frame(frames.OP_TEXT, b"", fin=False))
    empty = client_frame(frames.OP_CONTINUATION, b"", fin=False)
    with pytest.raises(ProtocolViolation) as failed:
        for _ in range(MOST // 1000 + 1):
            parser.feed(empty * 1000)
    assert failed.value.code == Close.MESSAGE_TOO_BIG and "continuation frames" in str(failed.value)


def test_a_character_split_across_fragments_and_reads_is_decoded_whole():
    euro = "€".encode()  # three bytes
    data = (
        client_frame(frames.OP_TEXT, b"a" + euro[:1], fin=False)
        + client_frame(frames.OP_CONTINUATION, euro[1:2], fin=False)
        + client_frame(frames.OP_CONTINUATION, euro[2:] + "é".encode())
    )
    parser = FrameParser(1 << 16)
    got = []
    for i in range(len(data)):  # byte by byte: every frame is seen partially, every split point tried
        got += parser.feed(data[i : i + 1])
    assert got == [(frames.OP_TEXT, "a€é")]


def test_invalid_utf8_fails_when_its_fragment_arrives_not_when_the_message_ends():
    """Autobahn 6.4.1/6.4.2: a strict endpoint closes at the bad fragment."""
    parser = FrameParser(1 << 16)
    assert parser.feed(client_frame(frames.OP_TEXT, "κόσμε".encode(), fin=False)) == []
    with pytest.raises(ProtocolViolation) as bad:
        parser.feed(client_frame(frames.OP_CONTINUATION, b"\xce\xbc\xe0\x80", fin=False))  # overlong: never valid
    assert bad.value.code == Close.INVALID_PAYLOAD


def test_invalid_utf8_fails_within_a_frame_still_arriving():
    """Autobahn 6.4.3/6.4.4: the frame's first part is already invalid; the rest is never waited for."""
    frame = client_frame(frames.OP_TEXT, b"ok \xf4\x90\x80\x80" + b"x" * 10_000)  # above U+10FFFF
    parser = FrameParser(1 << 16)
    with pytest.raises(ProtocolViolation) as bad:
        parser.feed(frame[:40])
    assert bad.value.code == Close.INVALID_PAYLOAD
    mid_fragment = FrameParser(1 << 16)  # the same inside a continuation frame
    mid_fragment.feed(client_frame(frames.OP_TEXT, b"abc", fin=False))
    with pytest.raises(ProtocolViolation):
        mid_fragment.feed(client_frame(frames.OP_CONTINUATION, b"\xed\xa0\x80" + b"y" * 5000)[:30])  # a surrogate


def test_close_frame_is_reported_with_code_and_reason():
    assert parse(client_frame(frames.OP_CLOSE, struct.pack("!H", 1001) + b"bye")) == [(frames.OP_CLOSE, (1001, "bye"))]
    assert parse(client_frame(frames.OP_CLOSE, b"")) == [(frames.OP_CLOSE, (1000, ""))]


VIOLATIONS = [
    ("unmasked", client_frame(frames.OP_TEXT, b"hi", masked=False), Close.PROTOCOL_ERROR),
    ("reserved bit", client_frame(frames.OP_TEXT, b"hi", rsv=0x40), Close.PROTOCOL_ERROR),
    ("unknown opcode", client_frame(0x3, b"hi"), Close.PROTOCOL_ERROR),
    ("fragmented control", client_frame(frames.OP_PING, b"", fin=False), Close.PROTOCOL_ERROR),
    ("long control", client_frame(frames.OP_PING, b"x" * 126), Close.PROTOCOL_ERROR),
    ("orphan continuation", client_frame(frames.OP_CONTINUATION, b"x"), Close.PROTOCOL_ERROR),
    (
        "interleaved messages",
        client_frame(frames.OP_TEXT, b"a", fin=False) + client_frame(frames.OP_TEXT, b"b"),
        Close.PROTOCOL_ERROR,
    ),
    ("bad utf-8", client_frame(frames.OP_TEXT, b"\xff\xfe"), Close.INVALID_PAYLOAD),
    ("one-byte close", client_frame(frames.OP_CLOSE, b"\x03"), Close.PROTOCOL_ERROR),
    ("reserved close code", client_frame(frames.OP_CLOSE, struct.pack("!H", 1005)), Close.PROTOCOL_ERROR),
    ("close reason not utf-8", client_frame(frames.OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), Close.INVALID_PAYLOAD),
    # Refused from the header alone: the 1 GiB payload is never waited for.
    ("huge declared frame", client_frame(frames.OP_TEXT, b"", length_override=1 << 30)[:10], Close.MESSAGE_TOO_BIG),
    (
        "fragments over the limit",
        client_frame(frames.OP_BINARY, b"x" * 40000, fin=False) + client_frame(frames.OP_CONTINUATION, b"x" * 30000),
        Close.MESSAGE_TOO_BIG,
    ),
]


@pytest.mark.parametrize("name,data,code", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_each_violation_names_its_close_code(name, data, code):
    with pytest.raises(ProtocolViolation) as violation:
        parse(data)
    assert violation.value.code == code


def test_message_exactly_at_the_limit_is_accepted():
    payload = b"x" * 65536
    assert parse(client_frame(frames.OP_BINARY, payload)) == [(frames.OP_BINARY, payload)]
