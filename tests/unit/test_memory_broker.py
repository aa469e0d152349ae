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


def test_a_delivery_held_past_the_wait_is_answered_not_raised():
    """Parked behind a gap the history cannot fill yet: gevent.Timeout is no Exception, and no
    error handler would have caught it; the request died without an answer."""
    from gevent.event import AsyncResult

    from relay.envelope import Envelope, Filter

    broker = MemoryBroker("w1", wait=0.05)
    broker.start(lambda envelope: AsyncResult(), lambda: {})  # never delivered
    delivery = broker.publish(Envelope("ANNOUNCEMENT", {}, Filter()))
    assert (delivery.delivered, delivery.workers, delivery.missing) == (0, 0, 1)


def test_notify_runs_the_control_message_here_and_a_stopped_broker_refuses_it():
    import pytest

    from relay.broker import BrokerUnavailable

    ran = []
    broker = MemoryBroker("w1")
    broker.start(lambda envelope: None, lambda: {}, control=lambda message: ran.append(message) or 1)
    assert broker.notify({"kind": "replaced"}) is None and ran == [{"kind": "replaced"}]
    broker.close()
    with pytest.raises(BrokerUnavailable):
        broker.notify({"kind": "replaced"})
