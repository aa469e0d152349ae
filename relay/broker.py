"""The broker seam: between "a broadcast was requested" and "hubs fan it out".

A broker takes an :class:`~relay.envelope.Envelope` from whoever accepted the
request and gets it to the hub of every process that holds sockets. It talks
back only through the ``deliver`` callback given to :meth:`Broker.start`, so
it never sees the hub. Implementations: :class:`MemoryBroker` (one process)
and ``RedisBroker`` (several workers or hosts).

``deliver(envelope)`` never waits for other broadcasts (the sequencer may
hold an envelope until the ones before it arrived, and a listener that waited
would never receive them): it returns a :class:`Pending` whose value is how
many local connections took the envelope, once it was delivered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import gevent

from .envelope import Envelope


class Pending(Protocol):
    """A delivery in progress (a gevent AsyncResult): its value is the local count."""

    def ready(self) -> bool: ...

    def get(self, block: bool = True, timeout: float | None = None) -> int: ...


Deliver = Callable[[Envelope], Pending]
Stats = Callable[[], dict]
Resync = Callable[[], None]
Control = Callable[[dict], int]  # runs a control message (disconnect a user, ...) here; returns a count


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

    def start(
        self, deliver: Deliver, stats: Stats, resync: Resync | None = None, control: Control | None = None
    ) -> None:
        """Begin receiving. ``deliver(envelope)`` fans out locally (see the module docstring);
        ``stats()`` is this worker's hub statistics, for the cluster view; ``resync()`` is
        called (in a greenlet of its own) after a listener that was away is back;
        ``control(message)`` runs a control message here."""

    def publish(self, envelope: Envelope) -> Delivery:
        """Deliver everywhere and report the total. Raises BrokerUnavailable."""

    def control(self, message: dict) -> Delivery:
        """Run a control message on every worker; ``delivered`` is the sum of what they returned."""

    def notify(self, message: dict) -> None:
        """Run a control message on every worker without waiting for any: best effort (a worker whose
        listener is away never gets it), for a message nobody needs an answer to. Raises BrokerUnavailable."""

    def connections_elsewhere(self, user_id: str) -> int:
        """The user's connections on the other workers (as far as this worker knows; 0 for one process)."""

    def members(self) -> list[dict] | None:
        """The last published statistics of every live worker, or None if unknown right now.

        This worker's own entry may be missing or stale: a caller has fresher
        figures of its own (``/health`` puts them in its place)."""

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

    def __init__(self, worker_id: str = "local", *, wait: float = 5.0) -> None:
        self.worker_id = worker_id
        self.wait = wait
        self._deliver: Deliver | None = None
        self._control: Control | None = None

    def start(
        self, deliver: Deliver, stats: Stats, resync: Resync | None = None, control: Control | None = None
    ) -> None:
        self._deliver, self._control = deliver, control  # stats: there is no cluster to publish them to

    def publish(self, envelope: Envelope) -> Delivery:
        if self._deliver is None:
            raise BrokerUnavailable("the broker is stopped")
        try:
            return Delivery(delivered=self._deliver(envelope).get(timeout=self.wait))
        except gevent.Timeout:  # held behind a gap the history cannot fill yet: it goes out when it can
            return Delivery(delivered=0, workers=0, missing=1)

    def control(self, message: dict) -> Delivery:
        if self._deliver is None:
            raise BrokerUnavailable("the broker is stopped")
        return Delivery(delivered=self._control(message) if self._control is not None else 0)

    def notify(self, message: dict) -> None:
        self.control(message)

    def connections_elsewhere(self, user_id: str) -> int:
        return 0  # there is no elsewhere

    def members(self) -> list[dict] | None:
        # No other worker, and nothing published: the caller's own figures are the cluster.
        # (Not the heartbeat's stats(): they walk every user, and /health is polled.)
        return []

    def status(self) -> dict:
        return {"kind": self.name, "state": "ok" if self._deliver else "stopped", "worker": self.worker_id}

    def close(self) -> None:
        self._deliver = None
