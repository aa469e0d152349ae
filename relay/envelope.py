"""What travels from "a broadcast was requested" to "the hub fans it out".

An :class:`Envelope` is one broadcast: the message (type, data), the audience
(:class:`Filter`) and a unique id. It is JSON-able so a broker can carry it
between processes, and it encodes its WebSocket frame once, however many
clients receive it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from . import frames

FILTER_FIELDS = ("userIds", "clinicIds", "roles", "channels")


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

    def to_json(self) -> dict:
        out = {}
        for key, values in zip(FILTER_FIELDS, (self.user_ids, self.clinic_ids, self.roles, self.channels), strict=True):
            if values:
                out[key] = sorted(values)
        return out

    @classmethod
    def from_json(cls, data: dict | None) -> Filter:
        data = data or {}
        return cls(*(frozenset(data.get(key) or ()) for key in FILTER_FIELDS))


@dataclass(frozen=True)
class Envelope:
    type: str
    data: object
    filter: Filter = Filter()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def message(self) -> dict:
        """The message exactly as clients receive it: ``{type, data, id}``."""
        return {"type": self.type, "data": self.data, "id": self.id}

    def frame(self) -> bytes:
        """The WebSocket text frame, encoded on first use and kept."""
        cached = self.__dict__.get("_frame")
        if cached is None:
            payload = json.dumps(self.message(), separators=(",", ":"), ensure_ascii=False)
            cached = frames.text(payload.encode())
            object.__setattr__(self, "_frame", cached)
        return cached

    def to_json(self) -> dict:
        return {"id": self.id, "type": self.type, "data": self.data, "filter": self.filter.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> Envelope:
        return cls(type=data["type"], data=data.get("data"), filter=Filter.from_json(data.get("filter")), id=data["id"])
