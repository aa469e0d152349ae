"""Browser origins: same site and WS_ALLOWED_ORIGINS may open sockets; others get 403 before the upgrade."""

import pytest
from support import Server
from websockets.exceptions import InvalidStatus


def test_foreign_origin_is_refused_with_403(server: Server):
    with pytest.raises(InvalidStatus) as refused:
        server.connect("bob", origin="http://evil.example")
    assert refused.value.response.status_code == 403
    server.wait_for_event("ws.origin_refused", lambda e: e["origin"] == "http://evil.example")


def test_same_origin_and_no_origin_are_allowed(server: Server):
    with server.connect("bob", origin=f"http://127.0.0.1:{server.port}"):
        pass
    with server.connect("bob"):  # servers and CLIs send no Origin
        pass


def test_allowed_origins_list(start_server):
    srv = start_server(WS_ALLOWED_ORIGINS="https://app.example.com, https://admin.example.com/")
    with srv.connect("bob", origin="https://admin.example.com"):
        pass
    with pytest.raises(InvalidStatus):
        srv.connect("bob", origin="https://app.example.com.evil.example")
    with pytest.raises(InvalidStatus):
        srv.connect("bob", origin="http://app.example.com")  # scheme matters
