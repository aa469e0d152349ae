"""What travels from "a broadcast was requested" to "the hub fans it out".

An :class:`Envelope` is one broadcast: the message (type, data), the audience
(:class:`Filter`), a unique id, when it was accepted, and, once the history
has placed it, its ``offset`` in the stream and the stream's ``epoch``. It is
JSON-able so a broker can carry it between processes and the history can keep
it, and it encodes its WebSocket frame once, however many clients receive it.
A frame rebuilt from the history is byte for byte the frame sent live.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field

from . import frames, jsonsafe
from .clock import now_ms

FILTER_FIELDS = ("userIds", "clinicIds", "roles", "channels")
TYPE_PATTERN = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # what a message type can be (upper case, digits, _)


@dataclass(frozen=True)
class Filter:
    """Who receives a broadcast.

    A client is a recipient when it matches every field that is given (a
    field is "given" when it is a non-empty set); within one field any value
    matches. No field given means every connected client.
    """

    user_ids: frozenset[str] = frozenset()
    clinic_ids: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()

    @property
    def everyone(self) -> bool:
        return not (self.user_ids or self.clinic_ids or self.roles or self.channels)

    @property
    def size(self) -> int:
        """How many values it lists, all fields together (what it holds in memory grows with it)."""
        return len(self.user_ids) + len(self.clinic_ids) + len(self.roles) + len(self.channels)

    def admits(self, user_id: str | None, role: str | None, clinic_id: str | None, channels: Collection[str]) -> bool:
        """Whether a connection of this identity, subscribed to ``channels``, is a recipient."""
        if self.user_ids and user_id not in self.user_ids:
            return False
        if self.clinic_ids and clinic_id not in self.clinic_ids:
            return False
        if self.roles and role not in self.roles:
            return False
        return not (self.channels and self.channels.isdisjoint(channels))

    @property
    def audience(self) -> str:
        """Who, among a channel's subscribers, this filter reaches: the same for every filter that
        differs only in its channels ("" for all of them). A channel keeps a last value per audience."""
        if not (self.user_ids or self.clinic_ids or self.roles):
            return ""
        parts = (sorted(self.user_ids), sorted(self.clinic_ids), sorted(self.roles))
        return hashlib.sha256(jsonsafe.compact(parts).encode()).hexdigest()[:32]

    def to_json(self) -> dict:
        out = {}
        for key, values in zip(FILTER_FIELDS, (self.user_ids, self.clinic_ids, self.roles, self.channels), strict=True):
            if values:
                out[key] = sorted(values)
        return out

    @classmethod
    def from_json(cls, data: dict | None) -> Filter:
        data = data or {}
        return interned(cls(*(frozenset(data.get(key) or ()) for key in FILTER_FIELDS)))


_INTERNED: dict[Filter, Filter] = {}
INTERNED_MAX = 4096  # distinct audiences kept; past that the table starts over (it is only a shortcut)
# Audiences of more values are not kept: a list of 1,000 user ids holds ~120 KB, and 4,096 distinct ones
# kept here held ~490 MB after the broadcasts were long gone (found by review). Such lists rarely repeat.
INTERNED_MAX_VALUES = 16


def interned(flt: Filter) -> Filter:
    """The one shared instance of a filter equal to ``flt``.

    A stream's broadcasts go to a handful of audiences. With one object per
    audience, a resume decides whether each of them reaches the client once,
    not once per missed broadcast (``relay.recovery``: 300 missed broadcasts
    to 10,000 clients were 3 M filter checks in a reload). Correctness never
    depends on it: an equal filter that is not shared is only checked again.
    """
    if flt.size > INTERNED_MAX_VALUES:
        return flt
    shared = _INTERNED.get(flt)
    if shared is None:
        if len(_INTERNED) >= INTERNED_MAX:
            _INTERNED.clear()
        shared = _INTERNED[flt] = flt
    return shared


@dataclass(frozen=True)
class Envelope:
    type: str
    data: object
    filter: Filter = Filter()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    at: int = field(default_factory=now_ms)  # when it was accepted, ms since the epoch
    offset: int | None = None  # its place in the stream; None when recovery is off
    epoch: str | None = None

    def placed(self, epoch: str, offset: int) -> Envelope:
        """This envelope at its place in the stream."""
        return dataclasses.replace(self, epoch=epoch, offset=offset)

    @property
    def place(self) -> int:
        """The offset of an envelope that is in the stream (anything read from the history is)."""
        if self.offset is None:
            raise ValueError(f"broadcast {self.id} was never placed in the stream")
        return self.offset

    def message(self) -> dict:
        """The message exactly as clients receive it: ``{type, data, id, offset}``."""
        out = {"type": self.type, "data": self.data, "id": self.id}
        if self.offset is not None:
            out["offset"] = self.offset
        return out

    def frame(self) -> bytes:
        """The WebSocket text frame, encoded on first use and kept."""
        cached = self.__dict__.get("_frame")
        if cached is None:
            cached = _text_frame(self.message())
            object.__setattr__(self, "_frame", cached)
        return cached

    def last_frame(self) -> bytes:
        """The frame sent as a channel's last value: the original message plus ``"last": true``."""
        return _text_frame({**self.message(), "last": True})

    def to_json(self) -> dict:
        out = {"id": self.id, "type": self.type, "data": self.data, "filter": self.filter.to_json(), "at": self.at}
        if self.offset is not None:
            out.update(offset=self.offset, epoch=self.epoch)
        return out

    @classmethod
    def from_json(cls, data: dict, *, offset: int | None = None, epoch: str | None = None) -> Envelope:
        return cls(
            type=data["type"],
            data=data.get("data"),
            filter=Filter.from_json(data.get("filter")),
            id=data["id"],
            at=int(data.get("at") or 0),
            offset=offset if offset is not None else data.get("offset"),
            epoch=epoch if epoch is not None else data.get("epoch"),
        )


def _text_frame(message: dict) -> bytes:
    return frames.text(jsonsafe.compact(message).encode())
