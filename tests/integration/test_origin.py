"""Browser origins: same site and WS_ALLOWED_ORIGINS may open sockets; others get 403 before the upgrade."""

import json

import pytest
from support import Server
from websockets.exceptions import InvalidStatus


def refused_with(srv: Server, origin: str) -> int:
    """The HTTP status a socket from ``origin`` is refused with (its JSON body checked too)."""
    with pytest.raises(InvalidStatus) as refused:
        srv.connect("bob", origin=origin)
    response = refused.value.response
    error = json.loads(response.body)["error"]
    assert error["code"] == "foreign_origin" and "WS_ALLOWED_ORIGINS" in error["message"]  # how to fix it
    return response.status_code


def test_foreign_origin_is_refused_with_403_and_logged_once_a_minute_per_address(start_server):
    """(A server of its own: the log's limit per address is per worker.)"""
    server = start_server()
    assert refused_with(server, "http://evil.example") == 403
    logged = server.wait_for_event("ws.origin_refused", lambda e: e["origin"] == "http://evil.example")
    assert logged["remote"] == "127.0.0.1" and logged["notLoggedBefore"] == 0 and logged["level"] == "warning"
    assert refused_with(server, "http://[::1") == 403  # no URL at all (was a 500)
    for n in range(3):  # a refusal costs its sender one request: not a line each
        assert refused_with(server, f"http://evil-{n}.example") == 403
    with server.connect("bob"):  # a line after those: theirs would be before it
        pass
    server.wait_for_event("ws.connect", lambda e: e["userId"] == "bob")
    assert len(server.log_events("ws.origin_refused")) == 1
    assert "unhandled error" not in server.log_text()


def test_same_origin_and_no_origin_are_allowed(server: Server):
    with server.connect("bob", origin=f"http://127.0.0.1:{server.port}"):
        pass
    with server.connect("bob"):  # servers and CLIs send no Origin
        pass


def test_allowed_origins_list(start_server):
    srv = start_server(WS_ALLOWED_ORIGINS="https://app.example.com, https://admin.example.com/")
    with srv.connect("bob", origin="https://admin.example.com"):
        pass
    assert refused_with(srv, "https://app.example.com.evil.example") == 403
    assert refused_with(srv, "http://app.example.com") == 403  # scheme matters
