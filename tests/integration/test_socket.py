"""The /ws protocol over a real gunicorn gevent server, one rule per test."""

import base64
import json
import time

import pytest
from rawws import RawClient
from support import Server
from websockets.exceptions import ConnectionClosed

from relay.codes import Close, Error

# -- handshake ---------------------------------------------------------------------


def test_connected_is_the_first_message_with_client_and_user_ids(server: Server):
    with server.open(server.token("bob")) as client:
        hello = client.expect("CONNECTED")
        assert hello["data"]["userId"] == "bob"
        assert len(hello["data"]["clientId"]) == 36


def expired_token(srv):
    return srv.token("bob", timestamp=int(time.time() * 1000) - 600_001)


def future_token(srv):
    return srv.token("bob", timestamp=int(time.time() * 1000) + 60_000)


def forged_token(srv):
    payload = json.loads(base64.b64decode(srv.token("bob")))
    payload["userId"] = "alice"
    return base64.b64encode(json.dumps(payload).encode()).decode()


BAD_TOKENS = {
    "missing": lambda srv: None,
    "not_base64": lambda srv: "***",
    "not_json": lambda srv: base64.b64encode(b"nope").decode(),
    "not_object": lambda srv: base64.b64encode(b"[1]").decode(),
    "missing_field": lambda srv: base64.b64encode(b'{"userId":"bob"}').decode(),
    "bad_field": lambda srv: base64.b64encode(b'{"userId":"bob","timestamp":"1","signature":"x"}').decode(),
    "bad_signature": forged_token,
    "expired": expired_token,
    "future": future_token,
    "too_long": lambda srv: "A" * 3000,
}


@pytest.mark.parametrize("reason", sorted(BAD_TOKENS))
def test_bad_token_is_closed_4401_and_the_reason_is_logged(server: Server, reason):
    with server.open(BAD_TOKENS[reason](server)) as client:
        code, _ = client.closed_with()
    assert code == Close.UNAUTHORIZED
    server.wait_for_event("ws.auth_failed", lambda e: e["reason"] == reason)


def test_no_token_or_secret_is_ever_logged(server: Server):
    token = server.token("bob")
    with server.open(token) as client:
        client.expect("CONNECTED")
    rejected = expired_token(server)
    with server.open(rejected) as client:
        client.closed_with()
    server.wait_for_event("ws.auth_failed", lambda e: e["reason"] == "expired")
    log = server.log_text()
    for secret in (token, rejected, server.env["WS_TOKEN_SECRET"], server.env["WS_ADMIN_SECRET"]):
        assert secret not in log and secret[:40] not in log


@pytest.mark.parametrize("user_id,reason", [("nobody", "unknown_user"), ("dave", "user_disabled")])
def test_unknown_or_disabled_user_is_closed_4403(server: Server, user_id, reason):
    with server.open(server.token(user_id)) as client:
        code, text = client.closed_with()
    assert code == Close.FORBIDDEN
    server.wait_for_event("ws.auth_failed", lambda e: e["reason"] == reason and e["userId"] == user_id)


def test_plain_http_get_on_ws_is_a_json_error(server: Server):
    import requests

    response = requests.get(server.ws_url.replace("ws://", "http://"), timeout=5)
    assert response.status_code == 400
    assert response.json()["ok"] is False


# -- messages ----------------------------------------------------------------------


def test_ping_gets_pong_with_a_timestamp(server: Server):
    with server.connect("bob") as client:
        client.send({"type": "PING"})
        pong = client.expect("PONG")
        assert abs(pong["data"]["timestamp"] - time.time() * 1000) < 5000


def test_pong_carries_the_streams_position_past_broadcasts_meant_for_others(server: Server):
    """A client whose channels are quiet learns how far the stream went: its resume position stays
    inside the recovery window (README, "The window")."""
    with server.connect("bob") as client:
        hello = client.hello
        sent = server.announce("for clinic 2 only", channels=["clinic:clinic-2:queue"])
        assert sent["delivered"] == 0
        client.send({"type": "PING"})
        pong = client.expect("PONG")["data"]
        assert pong["epoch"] == hello["epoch"] and pong["offset"] >= sent["offset"] > hello["offset"]


def test_subscribe_and_unsubscribe_report_what_took_effect(server: Server):
    with server.connect("bob") as client:
        reply = client.subscribe(["system:announcements", "clinic:clinic-1:queue", "system:announcements"])
        assert reply["data"]["channels"] == ["system:announcements", "clinic:clinic-1:queue"]
        client.send({"type": "UNSUBSCRIBE", "data": {"channels": ["clinic:clinic-1:queue", "system:maintenance"]}})
        assert client.expect("UNSUBSCRIBED")["data"]["channels"] == ["clinic:clinic-1:queue"]


@pytest.mark.parametrize(
    "user_id,channel,code",
    [
        ("bob", "clinic:clinic-2:queue", Error.FORBIDDEN_CHANNEL),
        ("bob", "clinic:clinic-2:alerts", Error.FORBIDDEN_CHANNEL),
        ("bob", "user:carol:notifications", Error.FORBIDDEN_CHANNEL),
        ("alice", "user:bob:notifications", Error.FORBIDDEN_CHANNEL),
        ("bob", "system:secrets", Error.UNKNOWN_CHANNEL),
        ("bob", "clinic:clinic-1:payroll", Error.UNKNOWN_CHANNEL),
    ],
)
def test_refused_channel_gets_an_error_and_is_not_subscribed(server: Server, user_id, channel, code):
    with server.connect(user_id) as client:
        client.send({"type": "SUBSCRIBE", "data": {"channels": [channel, "system:announcements"]}})
        error = client.expect("ERROR")
        assert error["data"]["code"] == code and error["data"]["channel"] == channel
        assert client.expect("SUBSCRIBED")["data"]["channels"] == ["system:announcements"]
    server.wait_for_event("ws.subscribe_denied", lambda e: e["channel"] == channel)


def test_own_clinic_own_notifications_and_admin_any_clinic_are_allowed(server: Server):
    with server.connect("bob") as bob, server.connect("alice") as alice:
        assert bob.subscribe(["clinic:clinic-1:alerts", "user:bob:notifications"])["data"]["channels"] == [
            "clinic:clinic-1:alerts",
            "user:bob:notifications",
        ]
        assert alice.subscribe(["clinic:clinic-2:queue", "clinic:clinic-9:alerts"])["data"]["channels"] == [
            "clinic:clinic-2:queue",
            "clinic:clinic-9:alerts",
        ]


BAD_MESSAGES = [
    ("not json", "{nope", Error.INVALID_JSON),
    ("array", "[1,2]", Error.INVALID_MESSAGE),
    ("no type", '{"data":{}}', Error.INVALID_MESSAGE),
    ("numeric type", '{"type":7}', Error.INVALID_MESSAGE),
    ("unknown type", '{"type":"DANCE"}', Error.UNKNOWN_TYPE),
    ("data not object", '{"type":"SUBSCRIBE","data":"system:announcements"}', Error.INVALID_DATA),
    ("channels not list", '{"type":"SUBSCRIBE","data":{"channels":"system:announcements"}}', Error.INVALID_DATA),
    ("channel not string", '{"type":"UNSUBSCRIBE","data":{"channels":[1]}}', Error.INVALID_DATA),
    ("binary frame", b"\x00\x01", Error.BINARY_NOT_SUPPORTED),
]


@pytest.mark.parametrize("name,frame,code", BAD_MESSAGES, ids=[m[0] for m in BAD_MESSAGES])
def test_bad_input_gets_a_stable_error_code_and_the_socket_lives_on(server: Server, name, frame, code):
    with server.connect("bob") as client:
        client.send(frame)
        error = client.expect("ERROR")
        assert error["data"]["code"] == code and error["data"]["message"]
        client.send({"type": "PING"})
        client.expect("PONG")


def test_more_than_100_subscriptions_are_refused(server: Server):
    # Admins may read any clinic: alice reaches the limit with real channel names.
    with server.connect("alice") as client:
        wanted = [f"clinic:c{i}:queue" for i in range(101)]
        client.send({"type": "SUBSCRIBE", "data": {"channels": wanted}})
        error = client.expect("ERROR")
        assert error["data"]["code"] == Error.TOO_MANY_SUBSCRIPTIONS and error["data"]["channel"] == "clinic:c100:queue"
        assert len(client.expect("SUBSCRIBED")["data"]["channels"]) == 100


def test_a_burst_of_40_is_fine_but_a_flood_is_an_error_then_close_1008(server: Server):
    """The exact bucket (40 at once, 20/s after) is tested with a fake clock in tests/unit/test_protocol.py."""
    with server.connect("bob") as client:
        for _ in range(40):
            client.send({"type": "PING"})
        for _ in range(40):
            client.expect("PONG")
        try:
            for _ in range(200):
                client.send({"type": "PING"})
        except ConnectionClosed:
            pass  # the server may close before the client has sent them all
        seen = []
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(300):
                seen.append(client.recv())
        assert closed.value.rcvd.code == Close.POLICY_VIOLATION
        assert any(m["type"] == "ERROR" and m["data"]["code"] == Error.RATE_LIMITED for m in seen)


def test_a_frame_over_64_kib_is_closed_1009(server: Server):
    with server.connect("bob") as client:
        client.send("x" * (64 * 1024 + 1))
        assert client.closed_with()[0] == Close.MESSAGE_TOO_BIG


def test_a_message_of_exactly_64_kib_is_processed(server: Server):
    with server.connect("bob") as client:
        padding = "x" * (64 * 1024 - len('{"type":"PING","pad":""}'))
        client.send('{"type":"PING","pad":"' + padding + '"}')
        client.expect("PONG")


def test_garbage_bytes_after_the_upgrade_get_1002_and_do_not_disturb_others(server: Server):
    with server.connect("carol", ["system:announcements"]) as bystander:
        raw = RawClient(server.port, server.token("bob"))
        raw.read_json()  # CONNECTED
        raw.sock.sendall(b"\x81\x05hello-unmasked-garbage" * 10)
        assert raw.close_code() == Close.PROTOCOL_ERROR
        raw.close()
        result = server.announce("still here", channels=["system:announcements"])
        assert result["delivered"] >= 1
        assert bystander.expect("ANNOUNCEMENT")["data"]["message"] == "still here"


def test_a_client_close_code_is_echoed(server: Server):
    client = server.connect("bob")
    client.ws.close(4000, "see you")
    assert client.ws.protocol.close_rcvd.code == 4000  # the server answered with the client's own code
    server.wait_for_event("ws.disconnect", lambda e: e["code"] == 4000 and e["reason"] == "see you")


def test_frames_sent_right_behind_the_upgrade_request_are_not_lost(server: Server):
    raw = RawClient(server.port, server.token("bob"), pipelined=[{"type": "PING"}])
    assert raw.read_json()["type"] == "CONNECTED"
    assert raw.read_json()["type"] == "PONG"
    raw.close()


def test_ws_max_clients_refuses_the_next_socket_with_1013(start_server):
    srv = start_server(WS_MAX_CLIENTS=2)
    with srv.connect("bob"), srv.connect("carol"), srv.open(srv.token("erin")) as third:
        assert third.closed_with() == (Close.TRY_AGAIN_LATER, "server full")
    srv.wait_for_event("ws.refused", lambda e: e["reason"] == "server_full" and e["userId"] == "erin")
