"""POST /broadcast: the secret, the body contract, filters, and the exact delivered count."""

import json

import pytest
import requests
from support import ADMIN_SECRET, Server, make_users

GOOD = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "hi"}}}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-secret"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer"},
        {"X-Admin-Secret": ""},
        {"X-Admin-Secret": "wrong"},
        {"Authorization": f"Basic {ADMIN_SECRET}"},
        {"Authorization": f"Bearer {ADMIN_SECRET}x"},
    ],
    ids=["missing", "wrong", "empty-bearer", "bare-bearer", "empty-header", "wrong-header", "basic", "longer"],
)
def test_wrong_missing_or_empty_admin_secret_is_401(server: Server, headers):
    response = server.broadcast(GOOD, secret=None, headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "ok": False,
        "error": {"code": "unauthorized", "message": response.json()["error"]["message"]},
    }


def test_a_wrong_secret_is_told_apart_from_a_missing_one_and_logged_without_it(start_server):
    """An operator's run: a shell whose WS_ADMIN_SECRET went stale was told how to send a secret, and the
    server said nothing of the attempts. (A server of its own: the log's limit per address is per worker.)"""
    server = start_server()
    missing = server.broadcast(GOOD, secret=None)
    assert "'Authorization: Bearer <WS_ADMIN_SECRET>'" in missing.json()["error"]["message"]
    assert server.log_events("api.admin_secret_refused") == []
    wrong = server.broadcast(GOOD, secret="stale-" * 8)
    assert wrong.status_code == 401
    assert "not the server's admin secret (WS_ADMIN_SECRET)" in wrong.json()["error"]["message"]
    logged = server.wait_for_event("api.admin_secret_refused")
    assert logged["level"] == "warning" and logged["path"] == "/broadcast" and logged["remote"] == "127.0.0.1"
    assert "stale-" not in server.log_text()
    # One line a minute per address at most (anyone who reaches the port could write one per request).
    for _ in range(3):
        assert server.broadcast(GOOD, secret="stale-" * 8).status_code == 401
    assert server.broadcast(GOOD).status_code == 200  # a request after those: their lines would be before it
    server.wait_for_event("broadcast")
    assert len(server.log_events("api.admin_secret_refused")) == 1


def test_secret_is_accepted_as_bearer_or_legacy_header(server: Server):
    assert server.broadcast(GOOD).status_code == 200
    assert server.broadcast(GOOD, secret=None, headers={"X-Admin-Secret": ADMIN_SECRET}).status_code == 200
    assert server.broadcast(GOOD, secret=None, headers={"Authorization": f"bearer  {ADMIN_SECRET}"}).status_code == 200


BAD_BODIES = [
    ("not json", b"{nope", "invalid_json"),
    ("not utf-8", b"\xff\xfe", "invalid_json"),
    ("array", [1], "invalid_body"),
    ("no message", {"filter": {}}, "invalid_body"),
    ("message not object", {"message": "hi"}, "invalid_body"),
    ("no type", {"message": {"data": {}}}, "invalid_body"),
    ("lower-case type", {"message": {"type": "announcement"}}, "invalid_body"),
    ("type with dash", {"message": {"type": "QUEUE-UPDATE"}}, "invalid_body"),
    ("type too long", {"message": {"type": "A" * 65}}, "invalid_body"),
    ("extra message field", {"message": {"type": "A", "id": "x"}}, "invalid_body"),
    ("extra body field", {**GOOD, "channels": ["system:announcements"]}, "invalid_body"),
    ("misspelled filter key", {**GOOD, "filter": {"channel": ["system:announcements"]}}, "invalid_body"),
    ("filter not object", {**GOOD, "filter": ["x"]}, "invalid_body"),
    ("filter value not list", {**GOOD, "filter": {"roles": "admin"}}, "invalid_body"),
    ("filter value not strings", {**GOOD, "filter": {"userIds": [1]}}, "invalid_body"),
    ("filter empty string", {**GOOD, "filter": {"userIds": [""]}}, "invalid_body"),
    ("over 64 KiB", {"message": {"type": "A", "data": {"x": "y" * 66000}}}, "body_too_large"),
]


@pytest.mark.parametrize("name,body,code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_body_is_400_with_a_code_and_a_readable_message(server: Server, name, body, code):
    response = server.broadcast(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert len(error["message"]) > 10


def test_data_of_any_json_shape_arrives_exactly_and_missing_data_means_an_empty_object(server: Server):
    with server.connect("bob") as bob:
        for data in ({"message": "x"}, [1, 2], "text", 3, 2.5, True, None):
            response = server.broadcast({"message": {"type": "A" * 64, "data": data}, "filter": {"userIds": ["bob"]}})
            assert response.status_code == 200, response.text
            assert bob.expect("A" * 64)["data"] == data
        server.broadcast({"message": {"type": "NO_DATA"}, "filter": {"userIds": ["bob"]}})
        assert bob.expect("NO_DATA")["data"] == {}


def test_a_body_of_exactly_64_kib_is_accepted_and_one_byte_more_is_refused(server: Server):
    empty = json.dumps({"message": {"type": "A", "data": ""}})
    exact = json.dumps({"message": {"type": "A", "data": "x" * (65536 - len(empty))}})
    assert len(exact) == 65536 and server.broadcast(exact).status_code == 200
    over = server.broadcast(exact[:-2] + 'x"}}')
    assert over.status_code == 400 and over.json()["error"]["code"] == "body_too_large"


def test_delivered_message_is_type_and_data_exactly_plus_an_id_and_an_offset(server: Server):
    data = {"message": "<b>hello</b> ✓", "nested": {"list": [1, 2.5, None, True]}, "at": "2025-11-03T10:00:00Z"}
    with server.connect("bob", ["clinic:clinic-1:queue"]) as bob:
        result = server.broadcast(
            {"message": {"type": "QUEUE_UPDATE", "data": data}, "filter": {"channels": ["clinic:clinic-1:queue"]}}
        ).json()
        got = bob.expect("QUEUE_UPDATE")
    assert got == {"type": "QUEUE_UPDATE", "data": data, "id": result["id"], "offset": result["offset"]}
    assert result["ok"] is True and result["delivered"] == 1


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """A private server and five sockets: alice(admin), bob x2 (clinic-1), erin (nurse, clinic-1), carol (clinic-2)."""
    workdir = tmp_path_factory.mktemp("crowd")
    make_users(workdir / "realtime.db")
    srv = Server(workdir).start()
    clients = {
        "alice": srv.connect("alice", ["system:announcements", "clinic:clinic-2:queue"]),
        "bob1": srv.connect("bob", ["system:announcements", "clinic:clinic-1:queue"]),
        "bob2": srv.connect("bob"),
        "erin": srv.connect("erin", ["clinic:clinic-1:queue"]),
        "carol": srv.connect("carol", ["system:announcements", "clinic:clinic-2:queue"]),
    }
    yield srv, clients
    for client in clients.values():
        client.close()
    srv.stop()


FILTERS = [
    (None, ["alice", "bob1", "bob2", "carol", "erin"]),
    ({}, ["alice", "bob1", "bob2", "carol", "erin"]),
    ({"userIds": [], "roles": []}, ["alice", "bob1", "bob2", "carol", "erin"]),  # empty lists = not given
    ({"channels": ["system:announcements"]}, ["alice", "bob1", "carol"]),
    ({"userIds": ["bob"]}, ["bob1", "bob2"]),
    ({"clinicIds": ["clinic-1"]}, ["bob1", "bob2", "erin"]),
    ({"roles": ["admin", "nurse"]}, ["alice", "erin"]),
    ({"clinicIds": ["clinic-1"], "roles": ["sales_staff"]}, ["bob1", "bob2"]),
    ({"clinicIds": ["clinic-1", "clinic-2"], "channels": ["system:announcements"]}, ["bob1", "carol"]),
    ({"userIds": ["bob", "carol"], "channels": ["clinic:clinic-1:queue", "clinic:clinic-2:queue"]}, ["bob1", "carol"]),
    ({"userIds": ["bob"], "clinicIds": ["clinic-2"]}, []),
]


@pytest.mark.parametrize("flt,expected", FILTERS, ids=[json.dumps(f[0]) for f in FILTERS])
def test_each_filter_field_and_their_combination(crowd, flt, expected):
    srv, clients = crowd
    body = {"message": {"type": "ALERT", "data": {"n": 1}}}
    if flt is not None:
        body["filter"] = flt
    result = srv.broadcast(body).json()
    assert result["delivered"] == len(expected)
    for name, client in clients.items():
        if name in expected:
            assert client.expect("ALERT")["id"] == result["id"]
        else:
            assert client.nothing_within(0.05)


def test_health_counts_clients_by_role_and_clinic(crowd):
    srv, _ = crowd
    health = srv.health()
    assert health["ok"] is True
    assert health["clients"] == 5
    assert health["byRole"] == {"admin": 1, "sales_staff": 3, "nurse": 1}
    assert health["byClinic"] == {"clinic-1": 3, "clinic-2": 1}
    assert health["channels"] == 3 and isinstance(health["uptime"], float) and health["memory"]["rss"] > 0
    assert health["version"]


def test_health_is_public_json_and_not_cached(server: Server):
    response = requests.get(server.url + "/health", timeout=5)
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"


def test_unknown_api_path_is_a_json_404(server: Server):
    response = requests.get(server.url + "/api/nothing", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = requests.get(server.url + "/broadcast", timeout=5)
    assert response.status_code == 405 and response.json()["ok"] is False
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"] and "It takes " in response.json()["error"]["message"]
    html = requests.delete(server.url + "/", timeout=5, headers={"Accept": "text/html"})
    assert html.status_code == 405 and "GET" in html.headers["Allow"]  # the HTML error page carries it too


def test_broadcast_is_logged_with_filter_delivered_and_duration(server: Server):
    result = server.announce("logged", userIds=["nobody-here"])
    record = server.wait_for_event("broadcast", lambda e: e["id"] == result["id"])
    assert record["filter"] == {"userIds": ["nobody-here"]}
    assert record["delivered"] == 0 and record["durationMs"] >= 0
