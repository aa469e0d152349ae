"""Deploys: SIGTERM closes every socket with 1012, and refuses new ones with 1012 while it drains."""

import datetime as dt
import os
import signal
import time

import requests
from rawws import RawClient
from support import wait_for
from websockets.exceptions import ConnectionClosed

from relay.codes import Close


def test_sigterm_closes_every_socket_with_1012_and_refuses_arrivals(start_server):
    srv = start_server(WS_CLOSE_TIMEOUT_MS=8000, WS_DRAIN_TIMEOUT_MS=8000)
    clients = [srv.connect(user, ["system:announcements"]) for user in ("alice", "bob", "carol", "erin") * 5]
    # This one never answers the close frame, which keeps the worker draining for WS_CLOSE_TIMEOUT_MS.
    stubborn = RawClient(srv.port, srv.token("bob"))
    assert srv.wait_clients(21)["clients"] == 21

    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    codes = [client.closed_with(timeout=5) for client in clients]
    assert codes == [(Close.SERVICE_RESTART, "service restart")] * len(clients)
    assert time.monotonic() - started < 6  # not one after another, nor behind the stubborn one's 8 s

    # Still draining (the stubborn socket): a newcomer is told 1012 at once, never CONNECTED.
    late = srv.open(srv.token("bob"))
    try:
        first = late.ws.recv(timeout=2)
    except ConnectionClosed as closed:
        assert closed.rcvd.code == Close.SERVICE_RESTART
    else:
        raise AssertionError(f"a socket arriving during the drain was admitted: {first}")

    assert srv.proc.wait(timeout=30) == 0
    stubborn.close()
    log = srv.log_text()
    assert '"event": "drain.done"' in log
    assert "Worker graceful timeout" not in log  # gunicorn never had to kill anything
    assert "Logging error" not in log and "Traceback" not in log


def test_sighup_reload_closes_sockets_with_1012_and_clients_can_reconnect(start_server):
    srv = start_server()
    clients = [srv.connect("bob") for _ in range(5)]
    old_pid = srv.health()["pid"]
    srv.proc.send_signal(signal.SIGHUP)
    assert [client.closed_with(timeout=10)[0] for client in clients] == [Close.SERVICE_RESTART] * 5
    # A browser retries until it lands on the new worker; the old one answers 1012 meanwhile.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client = srv.connect("bob")
        except (ConnectionClosed, AssertionError, OSError):
            time.sleep(0.1)
            continue
        break
    else:
        raise AssertionError("no worker accepted a socket after the reload")
    # The old worker answers 503 (draining) until it exits, about a second later.
    deadline = time.monotonic() + 10
    while _alive(old_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(old_pid)
    assert srv.health()["pid"] != old_pid
    client.send({"type": "PING"})
    client.expect("PONG")
    client.close()
    assert srv.proc.poll() is None  # the master kept running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_while_draining_health_and_broadcast_answer_503_and_the_drain_is_bounded(start_server):
    srv = start_server(WS_CLOSE_TIMEOUT_MS=20_000, WS_DRAIN_TIMEOUT_MS=1500)
    stubborn = RawClient(srv.port, srv.token("bob"))  # never answers the close frame: the drain waits for it
    assert srv.wait_clients(1)["clients"] == 1
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: requests.get(srv.url + "/health", timeout=5).status_code == 503, timeout=5)
    health = requests.get(srv.url + "/health", timeout=5).json()
    assert health["status"] == "draining" and health["draining"] is True
    refused = srv.broadcast({"message": {"type": "ANNOUNCEMENT", "data": {"message": "too late"}}})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
    assert refused.headers["Retry-After"] == "1"
    assert srv.proc.wait(timeout=15) == 0
    # WS_DRAIN_TIMEOUT_MS, not the 20 s close timeout, bounded the wait for the stubborn socket.
    assert time.monotonic() - started < 10
    done = srv.wait_for_event("drain.done")
    assert done["complete"] is False and done["clients"] == 0
    begun = srv.wait_for_event("drain.start")
    waited = (dt.datetime.fromisoformat(done["ts"]) - dt.datetime.fromisoformat(begun["ts"])).total_seconds()
    assert 1.4 <= waited < 4.5, waited  # WS_DRAIN_TIMEOUT_MS=1500, neither less nor the 5 s default
    stubborn.close()
