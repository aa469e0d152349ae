"""The broker seam: between "a broadcast was requested" and "hubs fan it out".

A broker takes an :class:`~relay.envelope.Envelope` from whoever accepted the
request and gets it to the hub of every process that holds sockets. It talks
back only through the ``deliver`` callback given to :meth:`Broker.start`, so
it never sees the hub. Implementations: :class:`MemoryBroker` (one process)
and ``RedisBroker`` (several workers or hosts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .envelope import Envelope

Deliver = Callable[[Envelope], int]
Stats = Callable[[], dict]


@dataclass(frozen=True)
class Delivery:
    """How a publish went: connections handed the message, across workers."""

    delivered: int
    workers: int = 1  # workers that reported their count
    missing: int = 0  # workers known to be alive that did not report in time


class BrokerUnavailable(Exception):
    """The broadcast could not be published; nothing was delivered anywhere."""


class Broker(Protocol):
    name: str

    def start(self, deliver: Deliver, stats: Stats) -> None:
        """Begin receiving. ``deliver(envelope)`` fans out locally and returns a count;
        ``stats()`` is this worker's hub statistics, for the cluster view."""

    def publish(self, envelope: Envelope) -> Delivery:
        """Deliver everywhere and report the total. Raises BrokerUnavailable."""

    def members(self) -> list[dict] | None:
        """The statistics of every live worker (this one included), or None if unknown right now."""

    def status(self) -> dict:
        """For ``/health``: ``{"kind", "state": "ok"|"degraded"|"stopped", ...}``."""

    def close(self) -> None:
        """Leave: stop receiving and withdraw from the cluster view."""


class MemoryBroker:
    """In-process only: a publish is delivered by this process's own hub.

    Correct for exactly one worker. With several workers each would see only
    its own clients, so start-up refuses that combination.
    """

    name = "memory"

    def __init__(self, worker_id: str = "local") -> None:
        self.worker_id = worker_id
        self._deliver: Deliver | None = None
        self._stats: Stats | None = None

    def start(self, deliver: Deliver, stats: Stats) -> None:
        self._deliver, self._stats = deliver, stats

    def publish(self, envelope: Envelope) -> Delivery:
        if self._deliver is None:
            raise BrokerUnavailable("the broker is stopped")
        return Delivery(delivered=self._deliver(envelope))

    def members(self) -> list[dict] | None:
        return [{**self._stats(), "worker": self.worker_id}] if self._stats else []

    def status(self) -> dict:
        return {"kind": self.name, "state": "ok" if self._deliver else "stopped", "worker": self.worker_id}

    def close(self) -> None:
        self._deliver = None
