"""The in-process broker: what it tells /health costs nothing, whatever the number of users."""

from __future__ import annotations

from relay.broker import MemoryBroker


def test_members_never_asks_for_the_heartbeat_statistics():
    """They walk every connected user (for the cluster-wide per-user cap), and /health is polled."""
    asked = []
    broker = MemoryBroker("w1")
    broker.start(lambda envelope: None, lambda: asked.append(1) or {"clients": 1})
    assert broker.members() == []  # no other worker: /health puts this worker's own figures in
    assert asked == []
