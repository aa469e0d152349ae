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


def test_a_log_reader_that_stops_reading_does_not_stop_the_worker(tmp_path):
    """Every connect, subscribe and close is logged; once a pipe's 64 KB are full, a write to it waits
    for the reader (journald under load, a container's log driver, ``| less``). That wait was the whole
    worker's: sockets, /health and broadcasts stopped with it. Lines now wait in the worker instead, and
    reach the reader in order, whole, once it reads again."""
    import select
    import threading

    import requests
    from support import make_users

    make_users(tmp_path / "realtime.db")
    # With gunicorn's access log on stdout (the same pipe): /health's line must not wait either.
    srv = Server(tmp_path, {}, ("--access-logfile", "-"), log_pipe=True).start()
    try:
        assert srv.proc is not None and srv.proc.stdout is not None
        pipe = srv.proc.stdout.fileno()
        with srv.connect("alice", ["system:announcements"]) as watcher:
            made = []
            for _ in range(300):  # ~750 bytes of log lines each: 220 KB, more than three pipes' worth
                with srv.connect("bob", ["system:announcements"]) as bob:
                    made.append(bob.client_id)
            # The reader has not read a byte: the pipe is full, and the worker still answers.
            assert requests.get(f"{srv.url}/health", timeout=10).status_code == 200
            assert srv.announce("still here", channels=["system:announcements"])["delivered"] >= 1
            assert watcher.expect("ANNOUNCEMENT")["data"]["message"] == "still here"
            assert select.select([pipe], [], [], 0)[0]  # (something to read: the writes did start)

            read: list[bytes] = []
            reader = threading.Thread(target=lambda: read.append(_read_until_quiet(pipe)), daemon=True)
            reader.start()
            reader.join(30)
        lines = b"".join(read).decode().splitlines()
        ours = [json.loads(line) for line in lines if line.startswith("{")]  # whole lines: each one parses
        connects = [e for e in ours if e.get("event") == "ws.connect" and e["userId"] == "bob"]
        assert [e["clientId"] for e in connects] == made  # every one, in order
        closes = {e["clientId"] for e in ours if e.get("event") == "ws.disconnect" and e["userId"] == "bob"}
        assert closes == set(made) and not [e for e in ours if e.get("event") == "log.dropped"]
        assert [line for line in lines if '"GET /health HTTP/1.1" 200' in line]  # gunicorn's access log's line
    finally:
        # The stop's own lines (the master's too) must not wait for a reader: read until the end.
        rest: list[bytes] = []
        pipe = srv.proc.stdout.fileno()
        reader = threading.Thread(target=lambda: rest.append(_read_until_quiet(pipe, 30.0)), daemon=True)
        reader.start()
        assert srv.stop() == 0
        reader.join(35)
        srv.proc.stdout.close()
    assert b"Worker exiting" in b"".join(rest)  # the worker's last lines are written before it exits


def _read_until_quiet(fd: int, quiet: float = 1.0, limit: float = 30.0) -> bytes:
    """Everything written to ``fd`` until nothing more comes for ``quiet`` seconds (``limit`` at most)."""
    import os
    import select
    import time

    chunks = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and select.select([fd], [], [], quiet)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
