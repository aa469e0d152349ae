"""The Redis broker's listener loop, fed by a stand-in subscription: one bad message must not end it."""

from __future__ import annotations

import json
import logging

from relay.envelope import Envelope, Filter
from relay.redis_broker import RedisBroker


def test_a_message_whose_delivery_fails_does_not_stop_the_listener(caplog):
    """A bug with one message (here: delivering it raises) used to end the listener for good, while
    /health kept saying the broker was fine: the worker would hear no other worker again."""
    broker = RedisBroker("redis://127.0.0.1:9/0", worker_id="here")  # never connects in this test
    delivered = []

    def deliver(envelope):
        delivered.append(envelope.data["n"])
        raise RuntimeError("a bug while delivering")

    broker._deliver = deliver
    messages = [
        {
            "type": "message",
            "channel": broker.channel.encode(),
            "data": json.dumps(
                {"envelope": Envelope("T", {"n": n}, Filter()).to_json(), "replyTo": "r", "from": "another"}
            ).encode(),
        }
        for n in (1, 2)
    ]

    class Subscription:
        def get_message(self, timeout):
            if not messages:
                broker._stopped = True
                return None
            return messages.pop(0)

    with caplog.at_level(logging.ERROR, logger="relay.redis"):
        broker._pump(Subscription())
    assert delivered == [1, 2] and "handling a message from" in caplog.text


def test_a_control_message_is_answered_unless_it_came_from_notify():
    """control() waits for every worker's answer; notify() sends no replyTo, and nobody answers it."""
    broker = RedisBroker("redis://127.0.0.1:9/0", worker_id="here")  # never connects in this test
    ran, answered = [], []
    broker._control = lambda message: ran.append(message) or 1
    broker._reply = lambda reply_to, message_id, delivered: answered.append((reply_to, message_id, delivered))
    asked = {"control": {"kind": "disconnect", "userId": "bob"}, "id": "m-1", "replyTo": "r", "from": "there"}
    told = {"control": {"kind": "replaced", "userId": "bob", "clientId": "c-1"}, "from": "there"}
    for doc in (asked, told):
        broker._on_message(broker.control_channel.encode(), json.dumps(doc).encode())
    assert ran == [asked["control"], told["control"]] and answered == [("r", "m-1", 1)]
