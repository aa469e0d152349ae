"""The cookie session: opened for pages, never for a socket upgrade (which authenticates with its token)."""

from __future__ import annotations

import time

import pytest
from flask import session
from support import make_users

from app import create_app


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


# -- how long a sign-in holds (auth.current_user) --------------------------------------------

HOUR = 3600


def home_with(app, tmp_path, contents: dict):
    """GET / with a cookie signed by the app's key holding ``contents``: 200 signed in, 302 not."""
    make_users(tmp_path / "users.db")
    with app.test_request_context("/"):
        cookie = app.session_interface.get_signing_serializer(app).dumps(contents)
    client = app.test_client()
    client.set_cookie("clinic_session", cookie)
    return client.get("/")


def test_a_current_sign_in_opens_the_pages(app, tmp_path):
    response = home_with(app, tmp_path, {"user_id": "bob", "sid": "s1", "since": int(time.time()) - 11 * HOUR})
    assert response.status_code == 200 and "bob" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "contents",
    [
        {"user_id": "bob"},  # signed before sign-ins had an id and a start
        {"user_id": "bob", "since": int(time.time())},
        {"user_id": "bob", "sid": "", "since": int(time.time())},
        {"user_id": "bob", "sid": "s1", "since": str(int(time.time()))},
        {"user_id": "bob", "sid": "s1", "since": int(time.time()) - 12 * HOUR - 5},  # past the default 12 h
        {"user_id": "bob", "sid": "s1", "since": int(time.time()) + HOUR},  # from the future
    ],
    ids=["no-id-no-start", "no-id", "empty-id", "start-not-a-number", "expired", "future"],
)
def test_a_sign_in_that_no_longer_holds_is_sent_to_sign_in(app, tmp_path, contents):
    response = home_with(app, tmp_path, contents)
    assert response.status_code == 302 and response.headers["Location"].startswith("/login")


def test_the_lifetime_is_a_setting(tmp_path):
    short = create_app(
        {
            "REALTIME_DB": str(tmp_path / "users.db"),
            "REALTIME_INSTANCE_PATH": str(tmp_path / "instance"),
            "SECRET_KEY": "unit-test-session-key-0123456789abcdefghij",
            "SESSION_LIFETIME_HOURS": "1",
            "TESTING": True,
        }
    )
    assert short.permanent_session_lifetime.total_seconds() == HOUR
    two_hours_ago = {"user_id": "bob", "sid": "s1", "since": int(time.time()) - 2 * HOUR}
    assert home_with(short, tmp_path, two_hours_ago).status_code == 302
