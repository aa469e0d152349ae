"""The structured log: one JSON object per line, and every event the README lists, with its fields."""

import json
import signal

from support import Server, wait_for
from websockets.exceptions import ConnectionClosed

from relay.codes import Close


def test_every_documented_event_is_logged_as_one_json_line_with_its_fields(start_server):
    srv: Server = start_server()
    with srv.connect("bob") as bob:
        bob.send({"type": "SUBSCRIBE", "data": {"channels": ["clinic:clinic-1:queue", "clinic:clinic-2:queue"]}})
        bob.expect("ERROR")
        bob.expect("SUBSCRIBED")
        result = srv.announce("logged", channels=["clinic:clinic-1:queue"])
        bob.expect("ANNOUNCEMENT")
    with srv.open(srv.token("nobody")) as unknown:
        unknown.closed_with()
    with srv.connect("carol") as flooder:
        try:
            for _ in range(60):
                flooder.send({"type": "PING"})
        except ConnectionClosed:
            pass  # the server may close before the client has sent them all
        assert flooder.closed_with()[0] == Close.POLICY_VIOLATION

    checks = {
        "ws.connect": lambda e: (
            e["userId"] == "bob" and e["clientId"] and e["role"] == "sales_staff" and e["clinicId"] == "clinic-1"
        ),
        "ws.subscribe": lambda e: e["userId"] == "bob" and e["channels"] == ["clinic:clinic-1:queue"],
        "ws.subscribe_denied": lambda e: e["channel"] == "clinic:clinic-2:queue" and e["code"] == "forbidden_channel",
        "broadcast": lambda e: (
            e["id"] == result["id"]
            and e["filter"] == {"channels": ["clinic:clinic-1:queue"]}
            and e["delivered"] == 1
            and e["durationMs"] >= 0
            and e["source"] == "api"
        ),
        "ws.disconnect": lambda e: e["userId"] == "bob" and e["durationMs"] >= 0 and e["code"] == Close.NORMAL,
        "ws.auth_failed": lambda e: e["reason"] == "unknown_user" and e["userId"] == "nobody",
        "ws.rate_limited": lambda e: e["userId"] == "carol",
    }
    for name, check in checks.items():
        srv.wait_for_event(name, check)

    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(timeout=15)
    srv.wait_for_event("drain.start", lambda e: "clients" in e)
    srv.wait_for_event("drain.done", lambda e: e["complete"] is True)
    ours = [line for line in srv.log_text().splitlines() if line.startswith("{")]
    assert ours
    for line in ours:
        record = json.loads(line)
        assert {"ts", "level"} <= record.keys() and record["level"] in ("debug", "info", "warning", "error")


def test_a_sockets_token_is_redacted_from_gunicorns_own_logs(start_server):
    """A socket's token travels in its URL (the contract): gunicorn's access log, if an operator turns
    it on, and its error log ("Error handling request /ws?token=...") wrote it out, a live credential."""
    import requests

    srv: Server = start_server("--access-logfile", "-")
    token = srv.token("bob")
    with srv.open(token) as bob:  # answered: gunicorn logs no request for an upgrade it handed over
        bob.expect("CONNECTED")
    refused = requests.get(f"{srv.url}/ws?resume=1&token={token}", timeout=10)  # no upgrade: 400
    assert refused.status_code == 400  # answered over HTTP: an access log line, with its URL
    assert wait_for(lambda: "GET /ws?resume=1&token=[redacted] HTTP/1.1" in srv.log_text()), srv.log_text()[-2000:]
    assert token not in srv.log_text()
