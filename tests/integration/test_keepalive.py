"""Keep-alive: a client that stops answering pings is closed with 4408 and removed; a live one stays."""

import time

from rawws import RawClient

from relay.codes import Close


def test_a_dead_client_is_closed_4408_and_a_live_one_is_kept(start_server):
    srv = start_server(WS_PING_INTERVAL_MS=200, WS_CLOSE_TIMEOUT_MS=200)
    live = srv.connect("bob")  # the websockets client answers pings by itself
    dead = RawClient(srv.port, srv.token("carol"))  # reads nothing the test does not read, answers nothing
    assert srv.wait_clients(2)["clients"] == 2
    health = srv.wait_clients(1, timeout=5)
    assert health["clients"] == 1 and health["byClinic"] == {"clinic-1": 1}
    record = srv.wait_for_event("ws.disconnect", lambda e: e["userId"] == "carol")
    assert record["code"] == Close.KEEPALIVE_TIMEOUT and record["reason"] == "no answer to ping"
    # What the dead client would have seen had it been listening: pings, then the close frame.
    assert dead.read_json()["type"] == "CONNECTED"
    opcodes = []
    while True:
        opcode, payload = dead.read_frame()
        opcodes.append(opcode)
        if opcode == 0x8:
            assert int.from_bytes(payload[:2], "big") == Close.KEEPALIVE_TIMEOUT
            break
    assert opcodes[0] == 0x9  # at least one ping came first
    time.sleep(0.6)  # several more intervals: the live client is still there and usable
    assert srv.health()["clients"] == 1
    live.send({"type": "PING"})
    live.expect("PONG")
    live.close()
    dead.close()
