"""Operations over a real gunicorn: /metrics, /health?history=1, request ids, and the broadcast log."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
import requests
from fake_supabase import SERVICE_KEY, FakeSupabase
from prometheus_client.parser import text_string_to_metric_families
from support import PRODUCTION, Resumer, Server, csrf_of, flask_cli, sign_in, wait_for

from relay.codes import Close

ANN = "system:announcements"
Q1 = "clinic:clinic-1:queue"

NAMES = [
    "realtime_connections",
    "realtime_connections_opened_total",
    "realtime_connections_closed_total",
    "realtime_auth_failures_total",
    "realtime_client_errors_total",
    "realtime_subscriptions",
    "realtime_broadcasts_total",
    "realtime_messages_delivered_total",
    "realtime_broadcast_duration_seconds_count",
    "realtime_broadcast_duration_seconds_bucket",
    "realtime_slow_consumers_total",
    "realtime_recoveries_total",
    "realtime_broker_up",
    "realtime_identity_up",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
]


def scrape(srv: Server, **headers) -> dict[tuple, float]:
    """``{(sample name, (label, value), ...): value}`` parsed by prometheus_client's own parser."""
    response = requests.get(srv.url + "/metrics", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def moved(before: dict, after: dict) -> dict:
    """Every sample of a ``realtime_`` counter that changed, and by how much."""
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key[0].startswith("realtime_") and key[0].endswith("_total") and after[key] != before.get(key, 0.0)
    }


def test_a_second_start_on_the_port_the_server_holds_leaves_its_metrics_alone(start_server):
    """Found by an operator's run: `make run` twice emptied the running server's metrics folder before the
    second one stopped at the bind, and its /metrics went blank until it restarted."""
    srv = start_server()
    srv.announce("counted")
    assert value(scrape(srv), "realtime_broadcasts_total", source="api") == 1
    second = Server(srv.workdir, srv.env_overrides, port=srv.port).start(wait=False)
    assert second.proc.wait(timeout=60) != 0  # the port is taken
    assert value(scrape(srv), "realtime_broadcasts_total", source="api") == 1
    srv.announce("and counted on")
    assert value(scrape(srv), "realtime_broadcasts_total", source="api") == 2


def test_a_start_empties_the_metrics_of_processes_that_are_gone_and_only_those(start_server, tmp_path):
    """A master sharing the folder (USR2's new master beside the old, --reuse-port) emptied the counters of
    workers that were serving (review)."""
    import os

    from prometheus_client.mmap_dict import MmapedDict

    folder = tmp_path / "metrics"
    folder.mkdir()
    for pid in (os.getpid(), 999_999_999):  # this test's process is alive; no process has the other
        MmapedDict(str(folder / f"counter_{pid}.db")).close()
    srv = start_server(PROMETHEUS_MULTIPROC_DIR=str(folder))
    assert (folder / f"counter_{os.getpid()}.db").exists() and not (folder / "counter_999999999.db").exists()
    assert scrape(srv)  # and the collector reads what stayed


def bad_json(srv: Server, user: str) -> None:
    with srv.connect(user) as client:
        client.send("{not json")
        assert client.expect("ERROR")["data"]["code"] == "invalid_json"


# -- /metrics ---------------------------------------------------------------------------------


def test_every_metric_is_there_and_counters_move_by_exactly_what_happened(start_server):
    srv = start_server(WS_CLOSE_TIMEOUT_MS=500)
    first = scrape(srv)
    for name in NAMES:
        assert any(key[0] == name for key in first), f"{name} missing from /metrics"
    assert value(first, "realtime_broker_up") == 1 and value(first, "realtime_identity_up") == 1

    bob = srv.connect("bob", [ANN, Q1])
    erin = srv.connect("erin", [ANN])
    with srv.open(srv.tokens.mint("bob", timestamp=1)) as stale:  # an expired token
        assert stale.closed_with()[0] == Close.UNAUTHORIZED
    with srv.open(srv.token("dave")) as disabled:
        assert disabled.closed_with()[0] == Close.FORBIDDEN
    bad_json(srv, "carol")  # connects, errs, closes 1000
    srv.announce("to both", channels=[ANN])
    srv.announce("to bob", channels=[Q1])
    admin = sign_in(srv, "alice@example.test")
    page = admin.get(srv.url + "/admin/broadcast", timeout=5)
    sent = admin.post(
        srv.url + "/api/admin/broadcast",
        json={"message": {"type": "ANNOUNCEMENT", "data": {"message": "from alice"}}, "filter": {"userIds": ["erin"]}},
        headers={"X-CSRF-Token": csrf_of(page.text)},
        timeout=5,
    )
    assert sent.status_code == 200, sent.text
    resumer = Resumer(srv, "erin")
    resumer.connect()
    resumer.drop()
    resumer.connect(epoch="not-the-epoch")  # not recovered
    resumer.close()
    wait_for(lambda: srv.health()["clients"] == 2)

    after = scrape(srv)
    assert moved(first, after) == {
        ("realtime_connections_opened_total",): 5,  # bob, erin, carol, the resumer twice
        ("realtime_connections_closed_total", ("code", "1000")): 2,  # carol, the resumer's second socket
        ("realtime_connections_closed_total", ("code", "1006")): 1,  # the resumer's dropped socket
        ("realtime_auth_failures_total", ("reason", "expired")): 1,
        ("realtime_auth_failures_total", ("reason", "user_disabled")): 1,
        ("realtime_client_errors_total", ("code", "invalid_json")): 1,
        ("realtime_broadcasts_total", ("source", "api")): 2,
        ("realtime_broadcasts_total", ("source", "admin")): 1,
        ("realtime_messages_delivered_total",): 4,  # 2 + 1 + erin's 1
        ("realtime_recoveries_total", ("result", "not_recovered")): 1,
    }
    assert value(after, "realtime_connections") == 2 and value(after, "realtime_subscriptions") == 3
    assert value(after, "realtime_broadcast_duration_seconds_count") == 3
    assert value(after, "realtime_broadcast_duration_seconds_bucket", le="+Inf") == 3
    bob.close()
    erin.close()


def test_a_slow_consumer_is_counted(start_server):
    from rawws import RawClient

    srv = start_server(WS_MAX_QUEUE_BYTES=65536, WS_CLOSE_TIMEOUT_MS=500)
    stalled = RawClient(srv.port, srv.token("carol"), rcvbuf=4096)
    stalled.read_json()
    stalled.send_json({"type": "SUBSCRIBE", "data": {"channels": [ANN]}})
    stalled.read_json()  # SUBSCRIBED; from here on it reads nothing
    for n in range(100):  # ~5 MB: more than its kernel buffers and queue hold
        srv.announce(f"{n}:" + "x" * 50_000, channels=[ANN])
        if srv.health()["clients"] == 0:
            break
    assert wait_for(lambda: value(scrape(srv), "realtime_slow_consumers_total") == 1, timeout=10)
    assert value(scrape(srv), "realtime_connections_closed_total", code="1013") == 1
    stalled.close()


def test_totals_are_the_whole_process_group_with_two_workers(start_server, redis_server):
    srv = start_server("-w", "2", REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    assert wait_for(lambda: srv.health()["workers"] == 2)
    clients = [srv.connect(user, [ANN]) for user in ("bob", "erin", "carol", "alice") * 4]
    assert wait_for(lambda: srv.health()["clients"] == 16)
    for n in range(3):
        assert srv.announce(f"n{n}", channels=[ANN])["delivered"] == 16
    # Gauges are sampled each second (the answering worker's at the scrape itself); counters at once.
    assert wait_for(lambda: value(scrape(srv), "realtime_subscriptions") == 16, timeout=5)
    # Whichever worker answers the scrape, the totals are both workers' (several scrapes, several workers).
    for _ in range(6):
        samples = scrape(srv)
        assert value(samples, "realtime_connections") == 16
        assert value(samples, "realtime_connections_opened_total") == 16
        assert value(samples, "realtime_broadcasts_total", source="api") == 3
        assert value(samples, "realtime_messages_delivered_total") == 48
        assert value(samples, "realtime_subscriptions") == 16
        assert value(samples, "realtime_broker_up") == 1
    for client in clients:
        client.close()
    assert wait_for(lambda: value(scrape(srv), "realtime_connections") == 0)
    assert value(scrape(srv), "realtime_connections_closed_total", code="1000") == 16


def test_a_dead_workers_open_sockets_leave_the_gauge_and_its_counts_stay_in_the_totals(start_server, redis_server):
    import os
    import signal

    srv = start_server("-w", "2", REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    assert wait_for(lambda: srv.health()["workers"] == 2)
    clients = [srv.connect(user) for user in ("bob", "erin", "carol", "alice") * 3]
    assert wait_for(lambda: sum(m["clients"] for m in srv.health()["cluster"]) == 12, timeout=5)
    cluster = srv.health()["cluster"]
    victim = max(cluster, key=lambda m: m["clients"])
    assert wait_for(lambda: value(scrape(srv), "realtime_connections") == 12, timeout=5)
    os.kill(victim["pid"], signal.SIGKILL)  # gunicorn's child_exit runs for it, then a new worker starts
    left = 12 - victim["clients"]
    assert wait_for(lambda: value(scrape(srv), "realtime_connections") == left, timeout=15)
    assert value(scrape(srv), "realtime_connections_opened_total") == 12  # totals never go down
    for client in clients:
        try:
            client.close()
        except Exception:
            pass


def test_metrics_need_the_token_in_production(start_server):
    base = PRODUCTION
    srv = start_server(**base, METRICS_TOKEN="m" * 40)
    assert requests.get(srv.url + "/metrics", timeout=5).status_code == 401
    wrong = requests.get(srv.url + "/metrics", headers={"Authorization": "Bearer " + "x" * 40}, timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
    assert value(scrape(srv, Authorization="Bearer " + "m" * 40), "realtime_broker_up") == 1
    closed = start_server(**base)  # no METRICS_TOKEN: closed to everyone
    refused = requests.get(closed.url + "/metrics", headers={"Authorization": "Bearer " + "m" * 40}, timeout=5)
    assert refused.status_code == 403 and "METRICS_TOKEN" in refused.json()["error"]["message"]
    public = start_server(**base, METRICS_PUBLIC="1")
    assert value(scrape(public), "realtime_broker_up") == 1


def test_a_weak_metrics_token_is_refused_at_start_in_production(start_server):
    srv = start_server(wait=False, **PRODUCTION, METRICS_TOKEN="short")
    assert srv.proc.wait(30) != 0
    assert "METRICS_TOKEN" in srv.log_text() and "short" not in srv.log_text()


# -- /health: the summary for anyone, the full report for the monitoring token -------------------

SUMMARY = {"ok", "status", "uptime", "memory", "clients", "byRole", "byClinic", "draining", "report"}


def test_in_production_health_tells_anyone_its_summary_and_the_metrics_token_its_full_report(start_server):
    """The full report names hosts, pids, files and errors, and history=1 merges every worker's hour
    (from Redis): an open port gave both to whoever asked. The original's fields stay public."""
    token = "m" * 40
    srv = start_server(**PRODUCTION, METRICS_TOKEN=token)
    bob = srv.connect("bob", [ANN])
    summary = requests.get(srv.url + "/health", timeout=5)
    assert summary.status_code == 200 and summary.headers["Cache-Control"] == "no-store"
    assert set(summary.json()) == SUMMARY
    assert summary.json()["report"] == "summary" and summary.json()["ok"] is True
    assert summary.json()["clients"] == 1 and summary.json()["byRole"] == {"sales_staff": 1}
    full = requests.get(srv.url + "/health", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    assert full["report"] == "full" and SUMMARY < set(full)
    assert {"cluster", "stream", "broker", "identity", "counters"} <= set(full) and "history" not in full
    with_history = requests.get(srv.url + "/health?history=1", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert len(with_history.json()["history"]) == 60
    wrong = {"Authorization": "Bearer " + "x" * 40}
    # A stale token on a plain /health (a load balancer's): still the summary, not a 401 that would pull the worker.
    stale = requests.get(srv.url + "/health", headers=wrong, timeout=5)
    assert stale.status_code == 200 and set(stale.json()) == SUMMARY
    for asked in (wrong, {}):  # history=1 with a wrong token, or none: refused, saying why
        refused = requests.get(srv.url + "/health?history=1", headers=asked, timeout=5)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert "METRICS_TOKEN" in refused.json()["error"]["message"]
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    bob.close()
    done = flask_cli(srv, "ws", "health", "--url", srv.url)  # the operator's command sends the token it has
    assert done.returncode == 0 and '"report": "full"' in done.stdout, done.stdout + done.stderr

    closed = start_server(**PRODUCTION)  # no METRICS_TOKEN: the summary, and nobody gets more
    assert set(requests.get(closed.url + "/health", timeout=5).json()) == SUMMARY
    refused = requests.get(closed.url + "/health?history=1", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert refused.status_code == 403 and "METRICS_TOKEN" in refused.json()["error"]["message"]
    assert wait_for(lambda: "/health answers its summary only" in closed.log_text())
    done = flask_cli(closed, "ws", "health", "--url", closed.url)
    assert done.returncode == 0 and '"report": "summary"' in done.stdout, done.stdout + done.stderr
    public = start_server(**PRODUCTION, HEALTH_PUBLIC="1")
    assert requests.get(public.url + "/health?history=1", timeout=5).json()["report"] == "full"


def test_the_dashboards_last_hour_is_for_admins(server: Server):
    """The charts read the last hour from /admin/last-hour, behind the admin's sign-in, so that they
    work in production where /health's history needs the monitoring token."""
    json_please = {"Accept": "application/json"}
    anonymous = requests.get(server.url + "/admin/last-hour", headers=json_please, timeout=5)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    staff = sign_in(server, "bob@example.test").get(server.url + "/admin/last-hour", headers=json_please, timeout=5)
    assert staff.status_code == 403 and staff.json()["error"]["code"] == "forbidden"
    alice = sign_in(server, "alice@example.test")
    dashboard = alice.get(server.url + "/admin", timeout=5).text
    assert 'data-history-url="/admin/last-hour"' in dashboard  # what the charts read

    def last_hour() -> dict:
        answer = alice.get(server.url + "/admin/last-hour", headers=json_please, timeout=5)
        assert answer.status_code == 200 and answer.headers["Cache-Control"] == "no-store"
        return answer.json()

    before = sum(minute["broadcasts"] for minute in last_hour()["history"])  # the server is shared by tests
    server.announce("counted")
    report = last_hour()
    assert len(report["history"]) == 60 and report["historyScope"] == "worker"
    assert sum(minute["broadcasts"] for minute in report["history"]) == before + 1


# -- /health?history=1 ------------------------------------------------------------------------


def test_health_history_counts_what_happened_by_minute(start_server):
    srv = start_server(WS_CLOSE_TIMEOUT_MS=500)
    assert "history" not in srv.health()
    bob = srv.connect("bob", [ANN])
    for _ in range(3):
        with srv.open(srv.tokens.mint("bob", timestamp=1)) as stale:
            stale.closed_with()
    bad_json(srv, "erin")
    bad_json(srv, "erin")
    for n in range(4):
        srv.announce(f"n{n}", channels=[ANN])
    drop = Resumer(srv, "carol")
    drop.connect()
    drop.drop()  # an abnormal close (1006)
    wait_for(lambda: srv.health()["clients"] == 1)

    report = requests.get(srv.url + "/health?history=1", timeout=5).json()
    history = report["history"]
    assert len(history) == 60 and report["historyScope"] == "worker"
    assert [m["start"] for m in history] == sorted(m["start"] for m in history)
    assert history[-1]["start"] <= time.time() < history[-1]["start"] + 60

    def total(field):
        return sum(m[field] if isinstance(m[field], int) else sum(m[field].values()) for m in history)

    assert total("connects") == 4 and total("broadcasts") == 4 and total("delivered") == 4
    merged: dict[str, int] = {}
    for minute in history:
        for code, n in minute["disconnects"].items():
            merged[code] = merged.get(code, 0) + n
    assert merged == {"1000": 2, "1006": 1}
    assert {k: v for m in history for k, v in m["authFailures"].items()} == {"expired": 3}
    assert sum(m["clientErrors"].get("invalid_json", 0) for m in history) == 2
    assert max(m["connectionsMax"] for m in history) == 2
    busy = [m for m in history if m["broadcasts"]]
    assert all(m["broadcastP50Ms"] is not None and m["broadcastP99Ms"] >= m["broadcastP50Ms"] for m in busy)
    rates = report["errorRates"]["15m"]
    assert rates == {
        "authFailuresPerMin": 0.2,
        "clientErrorsPerMin": round(2 / 15, 3),
        "abnormalCloseShare": round(1 / 3, 4),
        "closes": 3,
    }
    assert requests.get(srv.url + "/health?history=maybe", timeout=5).json()["error"]["code"] == "invalid_query"
    bob.close()


def test_health_history_is_the_clusters_with_redis(start_server, redis_server):
    one = start_server(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    two = start_server(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    for srv, count in ((one, 2), (two, 3)):
        for n in range(count):
            srv.announce(f"{n}")

    def broadcasts(srv: Server) -> int:
        report = requests.get(srv.url + "/health?history=1", timeout=5).json()
        assert report["historyScope"] == "cluster"
        return sum(m["broadcasts"] for m in report["history"])

    # workers share their hour every other second
    assert wait_for(lambda: broadcasts(one) == 5 and broadcasts(two) == 5, timeout=10)


# -- request ids and log lines ------------------------------------------------------------------


def test_every_answer_has_a_request_id_and_its_log_lines_carry_it(server: Server):
    mine = requests.post(
        server.url + "/broadcast",
        json={"message": {"type": "ANNOUNCEMENT", "data": {}}},
        headers={"Authorization": "Bearer test-admin-secret-0123456789-abcdefghijklmnop", "X-Request-Id": "lb-7:abc"},
        timeout=5,
    )
    assert mine.headers["X-Request-Id"] == "lb-7:abc"
    line = server.wait_for_event("broadcast", lambda e: e["id"] == mine.json()["id"])
    assert line["requestId"] == "lb-7:abc"
    made = requests.get(server.url + "/health", headers={"X-Request-Id": "bad id\twith spaces"}, timeout=5)
    assert made.headers["X-Request-Id"] != "bad id\twith spaces" and len(made.headers["X-Request-Id"]) == 16
    assert requests.get(server.url + "/nowhere", timeout=5).headers["X-Request-Id"]


def test_every_line_about_a_socket_names_its_client_and_user(server: Server):
    with server.connect("bob", [ANN]) as bob:
        bob.send({"type": "UNSUBSCRIBE", "data": {"channels": [ANN]}})
        bob.expect("UNSUBSCRIBED")
        client_id = bob.client_id
    record = server.wait_for_event("ws.disconnect", lambda e: e["clientId"] == client_id)
    lines = [e for e in server.log_events() if e.get("clientId") == client_id]
    assert {e["event"] for e in lines} >= {"ws.connect", "ws.subscribe", "ws.disconnect"}
    assert all(e["userId"] == "bob" for e in lines), lines
    assert record["code"] == 1000


# -- the broadcast log --------------------------------------------------------------------------


def log_csv(srv: Server, session: requests.Session, **query) -> list[dict]:
    answer = session.get(srv.url + "/admin/log.csv", params=query, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "text/csv; charset=utf-8"
    return list(csv.DictReader(io.StringIO(answer.text)))


def test_the_log_keeps_every_broadcast_with_its_sender_filter_and_count(start_server):
    srv = start_server()
    bob = srv.connect("bob", [Q1])
    by_service = srv.broadcast(
        {"message": {"type": "QUEUE_UPDATE", "data": {"queue": ["A1", "=1+1"]}}, "filter": {"channels": [Q1]}}
    ).json()
    admin = sign_in(srv, "alice@example.test")
    form = admin.get(srv.url + "/admin/broadcast", timeout=5)
    admin.post(
        srv.url + "/admin/broadcast",
        data={"csrf_token": csrf_of(form.text), "message": "lunch at noon", "type": "ANNOUNCEMENT", "channel": ANN},
        timeout=5,
    )
    rows = log_csv(srv, admin)
    assert [r["type"] for r in rows] == ["ANNOUNCEMENT", "QUEUE_UPDATE"]
    newest, oldest = rows
    assert (newest["source"], newest["sender"], newest["channels"]) == ("admin", "alice", ANN)
    assert '"lunch at noon"' in newest["preview"]
    assert oldest["id"] == by_service["id"] and oldest["offset"] == str(by_service["offset"])
    assert (oldest["source"], oldest["sender"], oldest["delivered"]) == ("api", "service", "1")
    assert json.loads(oldest["filter"]) == {"channels": [Q1]} and oldest["preview"].startswith('{"queue"')
    page = admin.get(srv.url + "/admin/log", params={"channel": Q1}, timeout=5)
    assert page.status_code == 200 and by_service["id"] in page.text and "lunch at noon" not in page.text
    # What is not a filter stays out of the page's links (?endpoint= reached url_for: a 500).
    odd = admin.get(srv.url + "/admin/log", params={"channel": Q1, "endpoint": "x", "_external": "1"}, timeout=5)
    assert odd.status_code == 200 and by_service["id"] in odd.text and "_external" not in odd.text
    bob.close()


def test_the_log_pages_filters_and_survives_a_restart(start_server, tmp_path):
    srv = start_server()
    ids = [srv.announce(f"n{n}", type_="ALERT" if n % 3 == 0 else "ANNOUNCEMENT")["id"] for n in range(55)]
    srv.stop()
    again = Server(srv.workdir, srv.env_overrides, port=0)
    again.env["REALTIME_DB"] = srv.env["REALTIME_DB"]
    again.start()
    try:
        admin = sign_in(again, "alice@example.test")
        assert [r["id"] for r in log_csv(again, admin)] == ids[::-1]
        first = admin.get(again.url + "/admin/log", timeout=5).text
        assert ids[-1] in first and ids[5] in first and ids[4] not in first  # 50 a page, newest first
        older = admin.get(again.url + "/admin/log", params={"page": 1, "until": "2999-01-01"}, timeout=5).text
        assert all(i in older for i in ids[:5]) and ids[5] not in older
        alerts = log_csv(again, admin, type="ALERT")
        assert [r["id"] for r in alerts] == [ids[n] for n in range(54, -1, -1) if n % 3 == 0]
        assert log_csv(again, admin, sender="alice") == []
        assert len(log_csv(again, admin, since="1h")) == 55 and log_csv(again, admin, until="2000-01-01") == []
        bad = admin.get(again.url + "/admin/log", params={"since": "last tuesday"}, timeout=5)
        assert bad.status_code == 400 and "use 30m, 2h, 7d" in bad.text
        assert admin.get(again.url + "/admin/log.csv", params={"page": "x"}, timeout=5).status_code == 200
        assert requests.get(again.url + "/admin/log.csv", timeout=5, allow_redirects=False).status_code in (302, 401)
    finally:
        again.stop()


def test_the_log_is_the_same_on_two_instances_sharing_redis_and_the_store(start_server, redis_server):
    one = start_server(REDIS_URL=redis_server.url)
    two = start_server(REDIS_URL=redis_server.url, REALTIME_DB=one.env["REALTIME_DB"])
    sent = [one.announce("from one")["id"], two.announce("from two")["id"], one.announce("one again")["id"]]
    admins = [(srv, sign_in(srv, "alice@example.test")) for srv in (one, two)]

    def views():  # each instance writes its rows within its batch interval (0.2 s)
        return [[r["id"] for r in log_csv(srv, admin)] for srv, admin in admins]

    assert wait_for(lambda: views() == [sent[::-1]] * 2, timeout=5), views()


def test_the_log_command_prints_the_last_hour(start_server):
    srv = start_server()
    srv.announce("visible in the log", channels=[ANN])
    done = flask_cli(srv, "ws", "log", "--since", "1h")
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert "ANNOUNCEMENT" in line and "visible in the log" in line and "by service" in line and ANN in line
    as_csv = flask_cli(srv, "ws", "log", "--csv", "--type", "NOPE")
    assert as_csv.returncode == 0 and as_csv.stdout.startswith("at,id,offset,")
    bad = flask_cli(srv, "ws", "log", "--since", "soon")
    assert bad.returncode == 2 and "use 30m, 2h, 7d" in bad.stderr
    two = flask_cli(srv, "ws", "log", "--channel", f"{ANN},system:maintenance")
    assert two.returncode == 2 and "channel names one channel" in two.stderr
    lower = flask_cli(srv, "ws", "log", "--type", "announcement")
    assert lower.returncode == 2 and "did you mean ANNOUNCEMENT?" in lower.stderr
    earlier = flask_cli(srv, "ws", "log", "--until", "2h")  # the hour before it (was refused: since 1h)
    assert earlier.returncode == 0 and "no broadcasts in that window" in earlier.stderr
    assert flask_cli(srv, "ws", "log", "--until", "0m").stdout.count("visible in the log") == 1
    epoch = flask_cli(srv, "ws", "log", "--until", "1970-01-01T00:00:00Z")  # 0: was "since is after until"
    assert epoch.returncode == 0 and "no broadcasts in that window" in epoch.stderr, epoch.stderr
    for timeout in ("nan", "-1", "inf", "0"):  # were tracebacks from the socket, or "Operation now in progress"
        refused = flask_cli(srv, "ws", "health", "--timeout", timeout)
        assert refused.returncode == 2 and "Invalid value for '--timeout'" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


@pytest.fixture
def supabase_site(start_server):
    fake = FakeSupabase().start()
    fake.add_user("boss@clinic.test", profile={"role": "admin", "clinic_id": None}, password="pw-correct-horse")
    srv = start_server(users=False, **fake.site_env())
    yield srv, fake
    fake.stop()


def test_with_supabase_the_log_is_written_to_its_table_and_read_back(supabase_site):
    srv, fake = supabase_site
    answer = srv.announce("into supabase", channels=[ANN])
    assert wait_for(lambda: answer["id"] in fake.log_rows, timeout=5)
    row = fake.log_rows[answer["id"]]
    assert (row["type"], row["channels"], row["sender"], row["stream_offset"]) == (
        "ANNOUNCEMENT",
        [ANN],
        "service",
        answer["offset"],
    )
    writes = [c for c in fake.calls("/rest/v1/broadcast_log") if c.method == "POST"]
    assert writes and all(c.headers["authorization"] == f"Bearer {SERVICE_KEY}" for c in writes)
    admin = sign_in(srv, "boss@clinic.test", "pw-correct-horse")
    assert [r["id"] for r in log_csv(srv, admin)] == [answer["id"]]
    fake.mode = "error"  # Supabase down: the page says so, broadcasts still go out and are written later
    down = admin.get(srv.url + "/admin/log", timeout=10)
    assert down.status_code == 503 and "cannot be read right now" in down.text
    later = srv.announce("while supabase is down")
    assert srv.health()["broadcastLog"]["queued"] >= 1
    fake.mode = "ok"
    assert wait_for(lambda: later["id"] in fake.log_rows, timeout=15)
