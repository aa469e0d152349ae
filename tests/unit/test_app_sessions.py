"""The cookie session: opened for pages, never for a socket upgrade (which authenticates with its token)."""

from __future__ import annotations

from flask import session


def signed_cookie(app) -> str:
    with app.test_request_context("/"):
        return app.session_interface.get_signing_serializer(app).dumps({"user_id": "bob"})


def test_a_page_request_opens_the_cookie_session(app):
    cookie = signed_cookie(app)
    with app.test_request_context("/", headers={"Cookie": f"clinic_session={cookie}"}):
        app.preprocess_request()
        assert session.get("user_id") == "bob"


def test_an_upgrade_gets_the_null_session_even_with_a_valid_cookie(app):
    cookie = signed_cookie(app)
    with app.test_request_context("/ws", headers={"Cookie": f"clinic_session={cookie}"}):
        assert app.session_interface.is_null_session(session._get_current_object())
        assert session.get("user_id") is None
