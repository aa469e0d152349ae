"""RFC 6455 framing, both directions, for a server that negotiates no extensions.

Server frames are built once and written as they are: a broadcast's frame is
the same bytes object for every recipient. Client frames are parsed
incrementally by :class:`FrameParser`, which enforces the size limit from the
frame header (a client cannot make us buffer a gigabyte it announced), the
masking rule, and the control-frame rules, and reports every violation as a
:class:`ProtocolViolation` carrying the close code to answer with.
"""

from __future__ import annotations

import codecs
import struct

from .codes import Close

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_CONTROL = frozenset({OP_CLOSE, OP_PING, OP_PONG})
_DATA = frozenset({OP_TEXT, OP_BINARY})
# Close codes a peer may put on the wire (RFC 6455 7.4.1; 1004-1006 and 1015 are reserved).
_VALID_CLOSE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
MAX_CONTROL_PAYLOAD = 125
# Continuation frames one message may have: its byte limit in 256-byte pieces (256 for the service's 64 KiB),
# so that no message costs more to parse in fragments than whole (measured: 256 empty fragments 0.26 ms, one
# 64 KiB frame 0.23 ms; 4,096 took 4.4 ms, at the rate limit's 20 a second). Autobahn's 9.3.1 (4 MiB in
# 64-byte pieces, to an endpoint that takes 16 MiB) sends a first frame and 65,536 continuations: the bound.
FRAGMENT_BYTES = 256
# Frames one read (up to 64 KiB) may carry: a whole message in its most fragments and room to spare. A 64 KiB
# read of empty 6-byte pings is 10,922 frames, 15 ms to parse (measured): at line rate, one socket kept a
# worker busy, even a refused one while it waited 2 s for the client's close. Over this, the parse stops
# there (1008). No client of the service comes near: its rate limit closes the socket at 41 messages.
MAX_FRAMES_PER_READ = 512
MAX_CLOSE_REASON_BYTES = 123


def encode(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (server to client)."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, size))
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def text(payload: bytes) -> bytes:
    return encode(OP_TEXT, payload)


def close(code: int, reason: str = "") -> bytes:
    data = reason.encode()[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode()
    return encode(OP_CLOSE, struct.pack("!H", code) + data)


PING = encode(OP_PING, b"")


class ProtocolViolation(Exception):
    """The client broke the protocol; answer with close ``code``.

    ``messages`` are the whole messages that came before the violation in the
    same :meth:`FrameParser.feed`: they were valid, and are handled like any
    others (so the outcome does not depend on how the bytes were split).
    """

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.messages: list[tuple[int, object]] = []


class FrameParser:
    """Turns bytes from a client into whole messages and control frames.

    :meth:`feed` returns ``(opcode, payload)`` pairs: ``OP_TEXT`` payloads are
    decoded ``str``, ``OP_BINARY``/``OP_PING``/``OP_PONG`` payloads ``bytes``,
    ``OP_CLOSE`` payloads a ``(code, reason)`` tuple. Fragmented messages are
    joined. Holds at most one partial frame plus one partial message, both
    bounded by ``max_message``.
    """

    __slots__ = (
        "max_message",
        "max_frames",
        "_buffer",
        "_fragments",
        "_fragment_opcode",
        "_fragment_size",
        "_text",
        "_peek",
    )

    def __init__(self, max_message: int, max_frames: int = MAX_FRAMES_PER_READ):
        self.max_message = max_message
        self.max_frames = max_frames  # whole frames one feed may parse (see MAX_FRAMES_PER_READ)
        self._buffer = b""
        self._fragments: list | None = None  # bytes, or str for a text message (decoded as it comes)
        self._fragment_opcode = 0
        self._fragment_size = 0
        # A fragmented text message is decoded fragment by fragment, so invalid UTF-8 fails the
        # connection when the fragment carrying it arrives, not when the message ends (RFC 6455 8.1).
        self._text: codecs.IncrementalDecoder | None = None
        # The same within one text frame that arrives in pieces: (decoder, payload bytes checked).
        self._peek: tuple[codecs.IncrementalDecoder, int] | None = None

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        out: list[tuple[int, object]] = []
        try:
            return self._feed(data, out)
        except ProtocolViolation as violation:
            violation.messages = out
            raise

    def _feed(self, data: bytes, out: list[tuple[int, object]]) -> list[tuple[int, object]]:
        buf = self._buffer + data if self._buffer else data
        pos = 0
        end = len(buf)
        parsed = 0
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            fin = b0 & 0x80
            opcode = b0 & 0x0F
            if b0 & 0x70:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
            if not b1 & 0x80:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "client frames must be masked")
            size = b1 & 0x7F
            head = 2
            if size == 126:
                if end - pos < 4:
                    break
                size = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif size == 127:
                if end - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
                if size >> 63:
                    raise ProtocolViolation(Close.PROTOCOL_ERROR, "frame length has its top bit set")
            self._check_header(opcode, fin, size)
            if end - pos < head + 4 + size:
                # Only a frame that will be decoded as text: a text frame opening a message (one
                # inside another message is a 1002 once whole, and must stay one), or its continuation.
                opens_text = opcode == OP_TEXT and self._fragments is None
                if end - pos > head + 4 and (opens_text or (opcode == OP_CONTINUATION and self._text is not None)):
                    self._check_partial(buf, pos + head, end, opcode)
                break
            if parsed == self.max_frames:
                raise ProtocolViolation(Close.POLICY_VIOLATION, f"over {self.max_frames} frames at once")
            parsed += 1
            self._peek = None
            mask = buf[pos + head : pos + head + 4]
            start = pos + head + 4
            payload = _unmask(buf[start : start + size], mask)
            pos = start + size
            message = self._frame(opcode, fin, payload)
            if message is not None:
                out.append(message)
        self._buffer = bytes(buf[pos:]) if pos < end else b""
        return out

    def _check_header(self, opcode: int, fin: int, size: int) -> None:
        if opcode in _CONTROL:
            if not fin:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "control frames cannot be fragmented")
            if size > MAX_CONTROL_PAYLOAD:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "control frame payload over 125 bytes")
        elif opcode in _DATA or opcode == OP_CONTINUATION:
            total = size + (self._fragment_size if opcode == OP_CONTINUATION else 0)
            if total > self.max_message:
                raise ProtocolViolation(Close.MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        else:
            raise ProtocolViolation(Close.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")

    def _frame(self, opcode: int, fin: int, payload: bytes) -> tuple[int, object] | None:
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "continuation frame without a message")
            self._fragment_size += len(payload)
            most = self.max_message // FRAGMENT_BYTES
            if len(self._fragments) > most:  # the first frame and ``most`` continuations
                # Bytes alone do not bound a message: endless empty fragments cost memory and time.
                raise ProtocolViolation(Close.MESSAGE_TOO_BIG, f"message in more than {most} continuation frames")
            if self._text is not None:
                self._fragments.append(self._decode(payload, final=bool(fin)))
            else:
                self._fragments.append(payload)
            if not fin:
                return None
            opcode = self._fragment_opcode
            parts = self._fragments
            self._fragments = None
            self._fragment_size = 0
            if self._text is not None:
                self._text = None
                return OP_TEXT, "".join(parts)
            payload = b"".join(parts)
        elif opcode in _DATA:
            if self._fragments is not None:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "new message before the last one ended")
            if not fin:
                self._fragment_opcode = opcode
                self._fragment_size = len(payload)
                if opcode == OP_TEXT:
                    self._text = codecs.getincrementaldecoder("utf-8")()
                    self._fragments = [self._decode(payload, final=False)]
                else:
                    self._fragments = [payload]
                return None
        elif opcode == OP_CLOSE:
            return OP_CLOSE, _close_payload(payload)
        else:
            return opcode, payload  # ping or pong

        if opcode == OP_TEXT:
            try:
                return OP_TEXT, payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolViolation(Close.INVALID_PAYLOAD, "text frame is not valid UTF-8") from None
        return OP_BINARY, payload

    def _check_partial(self, buf: bytes, mask_at: int, end: int, opcode: int) -> None:
        """Validate the UTF-8 of a text frame's payload received so far (each byte once)."""
        if self._peek is None:
            fresh = codecs.getincrementaldecoder("utf-8")()
            if opcode == OP_CONTINUATION and self._text is not None:
                fresh.setstate(self._text.getstate())  # mid-character from the previous fragment
            self._peek = (fresh, 0)
        decoder, checked = self._peek
        start = mask_at + 4 + checked
        if start >= end:
            return
        turn = checked % 4
        mask = buf[mask_at : mask_at + 4]
        try:
            decoder.decode(_unmask(buf[start:end], mask[turn:] + mask[:turn]), False)
        except UnicodeDecodeError:
            raise ProtocolViolation(Close.INVALID_PAYLOAD, "text frame is not valid UTF-8") from None
        self._peek = (decoder, checked + end - start)

    def _decode(self, payload: bytes, *, final: bool) -> str:
        assert self._text is not None
        try:
            return self._text.decode(payload, final)
        except UnicodeDecodeError:
            raise ProtocolViolation(Close.INVALID_PAYLOAD, "text frame is not valid UTF-8") from None


def _unmask(data: bytes, mask: bytes) -> bytes:
    size = len(data)
    if not size:
        return b""
    # XOR as one big integer: a handful of C calls instead of a Python loop per byte.
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def _close_payload(payload: bytes) -> tuple[int, str]:
    if not payload:
        return Close.NORMAL, ""  # no status code: answer as a normal closure
    if len(payload) == 1:
        raise ProtocolViolation(Close.PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = (payload[0] << 8) | payload[1]
    if code not in _VALID_CLOSE and not 3000 <= code <= 4999:
        raise ProtocolViolation(Close.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(Close.INVALID_PAYLOAD, "close reason is not valid UTF-8") from None
    return code, reason
