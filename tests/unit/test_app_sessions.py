"""The cookie session: opened for pages, never for a socket upgrade (which authenticates with its token)."""

from __future__ import annotations

import time

import pytest
from flask import session
from support import PASSWORD, csrf_of, make_users

from app import create_app
from blueprints import auth
from relay.signouts import SqliteSignouts


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


@pytest.mark.parametrize("age", [11 * HOUR, 0, -60], ids=["11-hours-old", "just-now", "another-hosts-clock-ahead"])
def test_a_current_sign_in_opens_the_pages(app, tmp_path, age):
    response = home_with(app, tmp_path, {"user_id": "bob", "sid": "s1", "since": int(time.time()) - age})
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


def settings_for(tmp_path, **extra) -> dict:
    return {
        "REALTIME_DB": str(tmp_path / "users.db"),
        "REALTIME_INSTANCE_PATH": str(tmp_path / "instance"),
        "SECRET_KEY": "unit-test-session-key-0123456789abcdefghij",
        "TESTING": True,
        **extra,
    }


def signed_in_client(app):
    client = app.test_client()
    page = client.get("/login")
    answer = client.post(
        "/login", data={"login": "bob", "password": PASSWORD, "csrf_token": csrf_of(page.get_data(as_text=True))}
    )
    assert answer.status_code == 302
    return client


def test_a_sign_out_is_remembered_for_the_longest_lifetime_so_raising_the_setting_brings_nothing_back(tmp_path):
    make_users(tmp_path / "users.db")
    one_hour = create_app(settings_for(tmp_path, SESSION_LIFETIME_HOURS="1"))
    client = signed_in_client(one_hour)
    with one_hour.test_request_context("/"):
        cookie = client.get_cookie("clinic_session").value
        contents = one_hour.session_interface.get_signing_serializer(one_hour).loads(cookie)
    home = client.get("/").get_data(as_text=True)
    assert client.post("/logout", data={"csrf_token": csrf_of(home)}).status_code == 302

    signouts = one_hour.extensions["realtime"].signouts
    sid, user, signed_in = contents["sid"], contents["user_id"], contents["since"]
    started_ms = contents["since_ms"]
    assert started_ms // 1000 == signed_in
    assert signouts.ended(sid, user, started_ms, signed_in + 2 * HOUR)  # past this setting's lifetime: still known
    assert signouts.ended(sid, user, started_ms, signed_in + 719 * HOUR)
    assert not signouts.ended(sid, user, started_ms, signed_in + 721 * HOUR)  # past any lifetime: forgotten


def test_signing_a_user_out_everywhere_ends_their_open_sign_in_and_is_remembered_as_long_as_any_could_last(
    tmp_path,
):
    make_users(tmp_path / "users.db")
    app = create_app(settings_for(tmp_path))
    client = signed_in_client(app)
    assert client.get("/").status_code == 200
    realtime = app.extensions["realtime"]
    time.sleep(0.002)  # a millisecond after the sign-in, at least
    before = time.time()
    realtime.sign_out_everywhere("bob", by="test")
    answer = client.get("/")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/login")
    assert signed_in_client(app).get("/").status_code == 200  # signing in again, at once, holds
    started_ms = int(before * 1000) - 1
    assert realtime.signouts.ended("any", "bob", started_ms, before + 719 * HOUR)
    assert not realtime.signouts.ended("any", "bob", started_ms, before + 721 * HOUR)  # past any lifetime


def unusable_signouts(tmp_path) -> SqliteSignouts:
    """A sign-out store whose file cannot be opened: every call raises SignoutsUnavailable."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    return SqliteSignouts(str(blocker / "realtime.db"))


def test_a_sign_out_store_that_cannot_answer_refuses_pages_with_503_and_logout_still_clears_the_cookie(
    tmp_path, monkeypatch
):
    logged = []
    monkeypatch.setattr(auth, "event", lambda name, **fields: logged.append(name))
    make_users(tmp_path / "users.db")
    app = create_app(settings_for(tmp_path))
    client = signed_in_client(app)
    home = client.get("/").get_data(as_text=True)
    app.extensions["realtime"].signouts = unusable_signouts(tmp_path)

    assert client.get("/").status_code == 503
    refused = client.get("/api/ws/auth")
    assert refused.status_code == 503 and refused.json["error"]["code"] == "unavailable"
    assert "sign-in cannot be checked" in refused.json["error"]["message"]  # not "identity service": it is up
    answer = client.post("/logout", data={"csrf_token": csrf_of(home)})
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/login")
    assert client.get_cookie("clinic_session") is None
    assert "logout.unrecorded" in logged


def test_signing_out_everywhere_that_cannot_be_recorded_keeps_the_person_signed_in_and_says_so(tmp_path):
    make_users(tmp_path / "users.db")
    app = create_app(settings_for(tmp_path))
    client = signed_in_client(app)
    home = client.get("/").get_data(as_text=True)
    realtime = app.extensions["realtime"]
    working, realtime.signouts = realtime.signouts, unusable_signouts(tmp_path)
    answer = client.post("/logout", data={"csrf_token": csrf_of(home), "everywhere": "1"})
    assert answer.status_code == 503 and "could not be ended" in answer.get_data(as_text=True)
    # Readable but not writable: the same answer.
    realtime.signouts = unusable_signouts(tmp_path)
    realtime.signouts.ended = working.ended
    answer = client.post("/logout", data={"csrf_token": csrf_of(home), "everywhere": "1"})
    assert answer.status_code == 503 and "could not be ended" in answer.get_data(as_text=True)
    realtime.signouts = working
    assert client.get("/").status_code == 200  # still signed in, and may try again


def test_a_sign_out_everywhere_while_the_password_is_being_checked_ends_that_sign_in_too(tmp_path, monkeypatch):
    """The password changes while a sign-in with the old one is being checked: that sign-in must not
    come out of it with a session that starts after the change."""
    make_users(tmp_path / "users.db")
    app = create_app(settings_for(tmp_path))
    realtime = app.extensions["realtime"]
    check = realtime.directory.authenticate

    def changed_meanwhile(login, password):
        user = check(login, password)
        time.sleep(0.002)
        realtime.sign_out_everywhere("bob", by="test")
        time.sleep(0.002)
        return user

    monkeypatch.setattr(realtime.directory, "authenticate", changed_meanwhile)
    answer = signed_in_client(app).get("/")
    assert answer.status_code == 302 and answer.headers["Location"].startswith("/login")


def test_a_cookie_from_before_sign_ins_had_milliseconds_is_ended_by_a_sign_out_everywhere(tmp_path):
    app = create_app(settings_for(tmp_path))
    older = {"user_id": "bob", "sid": "s1", "since": int(time.time())}  # whole seconds, no since_ms
    assert home_with(app, tmp_path, older).status_code == 200
    app.extensions["realtime"].sign_out_everywhere("bob", by="test")
    client = app.test_client()
    with app.test_request_context("/"):
        client.set_cookie("clinic_session", app.session_interface.get_signing_serializer(app).dumps(older))
    assert client.get("/").status_code == 302  # counted from the start of its second: ended


def test_the_sign_out_api_answers_503_and_closes_nothing_while_the_store_cannot_record_it(tmp_path, monkeypatch):
    make_users(tmp_path / "users.db")
    admin_secret = "unit-test-admin-secret-0123456789abcdefghij"
    app = create_app(settings_for(tmp_path, WS_ADMIN_SECRET=admin_secret))
    realtime = app.extensions["realtime"]
    realtime.signouts = unusable_signouts(tmp_path)
    closed: list[str] = []
    monkeypatch.setattr(realtime, "disconnect_user", closed.append)
    secret = {"Authorization": f"Bearer {admin_secret}"}
    answer = app.test_client().post("/api/users/bob/sign-out", headers=secret)
    assert answer.status_code == 503 and answer.json["error"]["code"] == "unavailable"
    assert answer.headers["Retry-After"] == "1"
    assert closed == []  # all or nothing: the sockets stay for a retry that also records the sign-out


# -- Flask's per-function async check, made once ------------------------------------------------


def test_each_hook_and_view_is_checked_for_async_once_not_per_request(app, monkeypatch):
    import inspect

    checked: list = []
    original = inspect.iscoroutinefunction

    def counting(func):
        checked.append(func)
        return original(func)

    monkeypatch.setattr(inspect, "iscoroutinefunction", counting)
    client = app.test_client()
    assert client.get("/health").status_code == 200
    first = len(checked)
    assert first >= 3  # the view and the app-wide before/after hooks at least
    for _ in range(3):
        assert client.get("/health").status_code == 200
    assert len(checked) == first  # nothing asked again


def test_the_async_checks_kept_are_bounded_and_shared_by_a_methods_instances(app):
    class View:
        def dispatch(self):
            return "ok"

    before = len(app._is_async)
    first, second = app.ensure_sync(View().dispatch), app.ensure_sync(View().dispatch)
    assert first() == second() == "ok" and len(app._is_async) == before + 1  # one entry per function
    for n in range(app.ASYNC_CHECKS_KEPT + 500):  # callables made per request are not all kept
        assert app.ensure_sync(lambda n=n: n)() == n
    assert len(app._is_async) == app.ASYNC_CHECKS_KEPT
