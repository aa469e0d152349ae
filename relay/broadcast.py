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

import datetime as dt
import json
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

from .broker import Broker, Delivery
from .codes import HttpError
from .envelope import FILTER_FIELDS, Envelope, Filter
from .eventlog import event

MAX_BODY_BYTES = 64 * 1024
MAX_FILTER_VALUES = 1000
MAX_FILTER_VALUE_CHARS = 256
TYPE_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


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
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BroadcastError(HttpError.INVALID_JSON, "the body is not valid JSON") from None
    return parse_request(doc)


def parse_request(doc: object) -> BroadcastRequest:
    if not isinstance(doc, dict):
        _invalid('the body must be a JSON object: {"message": {...}, "filter": {...}}')
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
    return Filter(*values)


def _only_keys(doc: dict, allowed: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        _invalid(f"{what} has unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")


def _invalid(message: str) -> NoReturn:
    raise BroadcastError(HttpError.INVALID_BODY, message)


@dataclass(frozen=True)
class SentBroadcast:
    """One line of the admin page's "recent broadcasts" list."""

    at: dt.datetime
    id: str
    type: str
    data: object
    filter: Filter
    delivered: int
    source: str


class Broadcaster:
    """Turns a validated request into an envelope, publishes it, and logs what happened.

    Keeps the last ``history`` broadcasts this process sent, for the admin page.
    """

    def __init__(self, broker: Broker, history: int = 20):
        self.broker = broker
        self.recent: deque[SentBroadcast] = deque(maxlen=history)

    def send(self, request: BroadcastRequest, *, source: str) -> tuple[Envelope, Delivery]:
        envelope = Envelope(type=request.type, data=request.data, filter=request.filter)
        started = time.perf_counter()
        delivery = self.broker.publish(envelope)
        event(
            "broadcast",
            id=envelope.id,
            type=envelope.type,
            filter=envelope.filter.to_json(),
            delivered=delivery.delivered,
            workers=delivery.workers,
            missing=delivery.missing,
            durationMs=round((time.perf_counter() - started) * 1000, 3),
            source=source,
        )
        self.recent.appendleft(
            SentBroadcast(
                dt.datetime.now(dt.UTC),
                envelope.id,
                envelope.type,
                envelope.data,
                envelope.filter,
                delivery.delivered,
                source,
            )
        )
        return envelope, delivery
