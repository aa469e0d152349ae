"""The response Flask-Sock returns for an answered upgrade is never sent: the hooks leave it alone."""

from __future__ import annotations

from flask import Response, g, request

from blueprints.socket import _UPGRADED, upgraded


def finished(app, environ: dict) -> Response:
    with app.test_request_context("/ws", environ_base=environ):
        app.preprocess_request()
        return app.process_response(Response("{}", mimetype="text/html"))


def test_an_answered_upgrade_gets_no_headers_it_would_never_send(app):
    response = finished(app, {_UPGRADED: True})
    assert "X-Request-Id" not in response.headers
    assert "X-Content-Type-Options" not in response.headers
    assert "Content-Security-Policy" not in response.headers


def test_a_refused_upgrade_is_an_ordinary_answer_with_every_header(app):
    response = finished(app, {})
    assert response.headers["X-Request-Id"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in response.headers


def test_upgraded_is_false_outside_the_socket_view(app):
    with app.test_request_context("/ws"):
        assert upgraded() is False


def test_the_handshake_is_handed_only_the_headers_it_reads(app):
    """simple-websocket re-parses every HTTP_* key through h11; the hooks have read theirs by then."""
    browser = {
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": "AQIDBAUGBwgJCgsMDQ4PEA==",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Extensions": "permessage-deflate",
        "Cookie": "clinic_session=x",
        "User-Agent": "Mozilla/5.0",
        "Accept-Language": "en",
        "X-Request-Id": "kept-for-the-logs",
    }
    with app.test_request_context("/ws", headers=browser, base_url="http://127.0.0.1"):
        assert app.preprocess_request() is None  # a valid upgrade: on to the view
        assert {key for key in request.environ if key.startswith("HTTP_")} == {
            "HTTP_HOST",
            "HTTP_UPGRADE",
            "HTTP_CONNECTION",
            "HTTP_SEC_WEBSOCKET_KEY",
            "HTTP_SEC_WEBSOCKET_VERSION",
        }
        assert g.request_id == "kept-for-the-logs"  # read before they were dropped
