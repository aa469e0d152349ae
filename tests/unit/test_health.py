"""``Realtime.health`` without a server: what it asks of the seams, and what it then says."""

from __future__ import annotations

from relay.broker import MemoryBroker
from relay.config import Settings
from relay.service import Realtime

SECRETS = {"WS_TOKEN_SECRET": "t" * 40, "WS_ADMIN_SECRET": "a" * 40, "SECRET_KEY": "s" * 40}


class Failing(MemoryBroker):
    """A broker whose heartbeat fails (a Redis that hangs): every question would wait out a timeout."""

    def status(self):
        return {**super().status(), "state": "degraded"}

    def members(self):
        raise AssertionError("/health asked a failing broker (it would wait for its socket timeout)")


def test_health_does_not_ask_a_broker_whose_heartbeat_fails_for_the_cluster(tmp_path):
    """The heartbeat found the broker out already: /health says degraded at once instead of waiting
    (2 s a question), which a load balancer's probe would take for a dead worker."""
    settings = Settings.from_env({**SECRETS, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    rt = Realtime(settings, broker=Failing("here"))
    rt.start()
    try:
        health = rt.health()
        assert health["status"] == "degraded" and health["ok"] is False
    finally:
        rt.drain()


def test_every_counter_is_in_health_from_the_start(tmp_path):
    """A fresh worker said ``"counters": {}`` and later left out the ones still at 0: a check reading
    ``counters.auth_failures`` broke until the first refusal (ops review)."""
    settings = Settings.from_env({**SECRETS, "REALTIME_INSTANCE_PATH": str(tmp_path)})
    rt = Realtime(settings)
    rt.start()
    try:
        assert rt.health()["counters"] == {"connections": 0, "broadcasts": 0, "messages": 0, "auth_failures": 0}
    finally:
        rt.drain()
