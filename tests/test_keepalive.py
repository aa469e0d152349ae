"""Keep-alive: a client that stops answering pings is closed and removed; a live one stays."""

import time

from rawws import RawClient


def test_a_dead_client_is_dropped_and_a_live_one_is_kept(start_server):
    srv = start_server(WS_PING_INTERVAL_MS=200, WS_CLOSE_TIMEOUT_MS=200)
    live = srv.connect("bob")  # the websockets client answers pings by itself
    dead = RawClient(srv.port, srv.token("carol"))  # never reads, never answers a ping
    assert srv.wait_clients(2)["clients"] == 2
    health = srv.wait_clients(1, timeout=5)
    assert health["clients"] == 1 and health["byClinic"] == {"clinic-1": 1}
    record = srv.wait_for_event("ws.disconnect", lambda e: e["userId"] == "carol")
    assert record["code"] in (4408, 1006)
    time.sleep(0.6)  # several more intervals: the live client is still there and usable
    assert srv.health()["clients"] == 1
    live.send({"type": "PING"})
    live.expect("PONG")
    live.close()
    dead.close()
