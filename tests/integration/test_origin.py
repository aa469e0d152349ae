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


def test_foreign_origin_is_refused_with_403(server: Server):
    assert refused_with(server, "http://evil.example") == 403
    server.wait_for_event("ws.origin_refused", lambda e: e["origin"] == "http://evil.example")
    assert refused_with(server, "http://[::1") == 403  # no URL at all (was a 500)
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
