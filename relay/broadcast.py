"""Broadcast requests: validation of the wire body, and the one service that sends.

``POST /broadcast`` (services, bearer secret), ``POST /api/admin/broadcast``
(signed-in admins) and the admin page all end in :meth:`Broadcaster.send`.

Body (the original contract)::

    {"message": {"type": "ANNOUNCEMENT", "data": {...}},
     "filter":  {"userIds": [], "clinicIds": [], "roles": [], "channels": []}}

Validation is strict on purpose: an unknown filter key (``"channel"`` for
``"channels"``) would otherwise silently widen a broadcast to everyone.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from dataclasses import dataclass
from typing import NoReturn

import gevent

from . import jsonsafe
from .broadcast_log import LogWriter, record_of, source_kind
from .broker import Broker, BrokerUnavailable
from .codes import HttpError
from .envelope import FILTER_FIELDS, TYPE_PATTERN, Envelope, Filter, interned
from .eventlog import event
from .history import History, HistoryUnavailable, Idempotency, Previous
from .telemetry import Telemetry

MAX_BODY_BYTES = 64 * 1024
MAX_FILTER_VALUES = 1000
MAX_FILTER_VALUE_CHARS = 256


class BroadcastError(ValueError):
    """The request is not a valid broadcast; ``code`` is an :class:`HttpError` code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BroadcastRequest:
    type: str
    data: object
    filter: Filter


def parse_body(body: bytes) -> BroadcastRequest:
    if len(body) > MAX_BODY_BYTES:
        raise BroadcastError(HttpError.BODY_TOO_LARGE, f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        doc = json.loads(body, parse_constant=_no_constants)
    except _NotJsonConstant as constant:
        _not_json(f"{constant} is not JSON (send null, or the value as a string)")
    except json.JSONDecodeError as bad:  # where, so that a caller can find it in what they sent
        complaint = bad.msg.removesuffix(" at")  # "Unterminated string starting at": the position follows
        _not_json(f"{complaint} at line {bad.lineno}, column {bad.colno}" if body.strip() else "the body is empty")
    except UnicodeDecodeError as bad:  # json reads UTF-16 and UTF-32 too, told by the first bytes
        if not bad.encoding.lower().startswith("utf-8"):
            _not_json(f"it could not be read as {bad.encoding}")
        offset = bad.start + (3 if body.startswith(codecs.BOM_UTF8) else 0)
        _not_json(f"it is not UTF-8 (the byte at offset {offset}, counting from 0)")
    except ValueError:  # the one other: an integer past Python's 4,300 digits (valid JSON; no double holds it)
        _invalid(f"the body cannot be broadcast: {jsonsafe.TOO_LARGE}")
    except RecursionError:  # nested deeper than the parser goes
        _invalid(f"the body cannot be broadcast: it is nested more than {jsonsafe.MAX_DEPTH} levels deep")
    return parse_request(doc)


class _NotJsonConstant(ValueError):
    pass


def _no_constants(name: str) -> object:
    # Python reads NaN and Infinity; JSON (and every browser) does not: a frame carrying one would not parse.
    raise _NotJsonConstant(name)


def _not_json(why: str) -> NoReturn:
    raise BroadcastError(HttpError.INVALID_JSON, f"the body is not valid JSON: {why}") from None


def parse_request(doc: object) -> BroadcastRequest:
    if not isinstance(doc, dict):
        _invalid('the body must be a JSON object: {"message": {...}, "filter": {...}}')
    why = jsonsafe.problem(doc)
    if why is not None:  # it would parse here and fail to encode later, once recorded in the history
        _invalid(f"the body cannot be broadcast: {why}")
    _only_keys(doc, ("message", "filter"), "the body")
    message = doc.get("message")
    if not isinstance(message, dict):
        _invalid('"message" must be an object: {"type": "ANNOUNCEMENT", "data": {...}}')
    _only_keys(message, ("type", "data"), '"message"')
    message_type = message.get("type")
    if not isinstance(message_type, str) or not TYPE_PATTERN.fullmatch(message_type):
        _invalid(
            f'"message.type" must match {TYPE_PATTERN.pattern} (upper case, digits, underscores), '
            f"got {message_type!r:.80}"
        )
    data = message.get("data", {})
    return BroadcastRequest(message_type, data, _parse_filter(doc.get("filter")))


def _parse_filter(raw: object) -> Filter:
    if raw is None:
        return Filter()
    if not isinstance(raw, dict):
        _invalid(f'"filter" must be an object with any of {", ".join(FILTER_FIELDS)}')
    _only_keys(raw, FILTER_FIELDS, '"filter"')
    values: list[frozenset[str]] = []
    for key in FILTER_FIELDS:
        items = raw.get(key)
        if items is None:
            values.append(frozenset())
            continue
        if (
            not isinstance(items, list)
            or len(items) > MAX_FILTER_VALUES
            or not all(isinstance(i, str) and 0 < len(i) <= MAX_FILTER_VALUE_CHARS for i in items)
        ):
            _invalid(
                f'"filter.{key}" must be a list of at most {MAX_FILTER_VALUES} non-empty strings '
                f"(each at most {MAX_FILTER_VALUE_CHARS} characters)"
            )
        values.append(frozenset(items))
    return interned(Filter(*values))


def _only_keys(doc: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        _invalid(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def _invalid(message: str) -> NoReturn:
    raise BroadcastError(HttpError.INVALID_BODY, message)


MAX_IDEMPOTENCY_KEY_CHARS = 200
_IDEMPOTENCY_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_CHARS}}}")


def idempotency_key(raw: str | None) -> str | None:
    """The ``Idempotency-Key`` header checked: printable ASCII, 1 to 200 characters (None if absent)."""
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise BroadcastError(
            HttpError.INVALID_IDEMPOTENCY_KEY,
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters without spaces",
        )
    return raw


@dataclass(frozen=True)
class Receipt:
    """What a broadcast got: the ``/broadcast`` answer (``replayed`` when it is a repeat's first answer)."""

    id: str
    offset: int | None
    epoch: str | None
    delivered: int
    workers: int
    missing: int
    replayed: bool = False

    def answer(self) -> dict:
        out: dict = {"ok": True, "delivered": self.delivered, "id": self.id}
        if self.offset is not None:
            out.update(offset=self.offset, epoch=self.epoch)
        out.update(workers=self.workers, missingWorkers=self.missing)
        return out

    @classmethod
    def of(cls, answer: dict, *, replayed: bool) -> Receipt:
        return cls(
            answer["id"],
            answer.get("offset"),
            answer.get("epoch"),
            int(answer["delivered"]),
            int(answer.get("workers", 0)),
            int(answer.get("missingWorkers", 0)),
            replayed,
        )


class Broadcaster:
    """Turns a validated request into an envelope, places it in the history, publishes it, logs it.

    With a history (recovery on) every broadcast is appended before it is
    published, so one answered 200 is in the history even if this worker dies
    the next instant. An idempotency key makes a retry safe: a repeat within
    the window publishes nothing and gets the first answer.

    Each one sent is counted (``telemetry``) and queued for the broadcast log
    (``log``); a repeat is neither (it sent nothing).
    """

    def __init__(
        self,
        broker: Broker,
        history: History | None = None,
        *,
        telemetry: Telemetry | None = None,
        log: LogWriter | None = None,
        repeat_wait: float = 5.0,
    ):
        self.broker = broker
        self.history = history
        self.telemetry = telemetry
        self.log = log
        self.repeat_wait = repeat_wait

    def send(self, request: BroadcastRequest, *, source: str, scope: str, key: str | None = None) -> Receipt:
        """Publish ``request``. ``scope`` names who may reuse ``key`` (a service, one admin).

        Raises BrokerUnavailable (nothing was published) and IdempotencyConflict.
        """
        envelope = Envelope(type=request.type, data=request.data, filter=request.filter)
        addressed = request.filter.to_json()  # for the key's digest, the log line and the log row
        started = time.perf_counter()
        idempotency = None
        if self.history is not None:
            if key is not None:
                idempotency = Idempotency.of(scope, key, request.type, request.data, addressed)
            try:
                placed = self.history.append(envelope, idempotency=idempotency)
            except HistoryUnavailable as down:
                raise BrokerUnavailable(str(down)) from None
            if isinstance(placed, Previous):
                assert idempotency is not None
                return self._first_answer(placed, idempotency)
            envelope = envelope.placed(placed.epoch, placed.offset)
        delivery = self.broker.publish(envelope)
        receipt = Receipt(
            envelope.id, envelope.offset, envelope.epoch, delivery.delivered, delivery.workers, delivery.missing
        )
        if idempotency is not None and self.history is not None:
            try:
                self.history.complete(idempotency, receipt.answer())
            except HistoryUnavailable:
                pass  # a repeat will get the place without the counts
        seconds = time.perf_counter() - started
        event(
            "broadcast",
            id=envelope.id,
            offset=envelope.offset,
            type=envelope.type,
            filter=addressed,
            delivered=delivery.delivered,
            workers=delivery.workers,
            missing=delivery.missing,
            durationMs=round(seconds * 1000, 3),
            source=source,
        )
        if self.telemetry is not None:
            self.telemetry.broadcast(source_kind(source), delivery.delivered, seconds)
        if self.log is not None:
            self.log.record(
                record_of(
                    envelope_id=envelope.id,
                    offset=envelope.offset,
                    at=envelope.at,
                    source=source,
                    type_=envelope.type,
                    data=envelope.data,
                    filter_=addressed,
                    delivered=delivery.delivered,
                )
            )
        return receipt

    def _first_answer(self, previous: Previous, idempotency: Idempotency) -> Receipt:
        """The answer of the key's first request: wait for it if that request is still being delivered."""
        assert self.history is not None
        deadline = time.monotonic() + self.repeat_wait
        while previous.answer is None and time.monotonic() < deadline:
            gevent.sleep(0.02)
            try:
                previous = self.history.previous(idempotency) or previous
            except HistoryUnavailable:
                break
        event("broadcast.repeat", id=previous.envelope_id, offset=previous.offset, complete=previous.answer is not None)
        if previous.answer is not None:
            return Receipt.of(previous.answer, replayed=True)
        # The first request's worker died before it could answer: its place is known, its count is not.
        return Receipt(previous.envelope_id, previous.offset, previous.epoch, 0, 0, 0, replayed=True)
