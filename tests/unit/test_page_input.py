"""Input to the HTMX pages that used to end in a 500: each gets an answer a person can read."""

from __future__ import annotations

import pytest
from support import PASSWORD, csrf_of, make_users

from app import create_app


@pytest.fixture
def signed_in(tmp_path):
    """A test client signed in as ``login``, and its CSRF token."""
    make_users(tmp_path / "users.db")
    app = create_app(
        {
            "REALTIME_DB": str(tmp_path / "users.db"),
            "REALTIME_INSTANCE_PATH": str(tmp_path / "instance"),
            "SECRET_KEY": "unit-test-session-key-0123456789abcdefghij",
            "TESTING": True,
        }
    )

    def sign_in(login: str):
        client = app.test_client()
        csrf = csrf_of(client.get("/login").get_data(as_text=True))
        form = {"login": login, "password": PASSWORD, "csrf_token": csrf}
        assert client.post("/login", data=form).status_code == 302
        return client, csrf_of(client.get("/").get_data(as_text=True))

    return sign_in


@pytest.mark.parametrize(
    "message, shown",
    [
        (None, "(no details)"),
        ("", "(no details)"),
        ("not json", "(no details)"),
        ('{"type": "CLINIC_ALERT"}', "(no details)"),
        ('{"type": "CLINIC_ALERT", "data": null}', "(no details)"),
        ('{"type": "CLINIC_ALERT", "data": [1, 2]}', "[1, 2]"),
        ('{"type": "CLINIC_ALERT", "data": {"message": "\\ud800"}}', "(no details)"),  # not text a page can hold
        ('{"type": "CLINIC_ALERT", "data": {"level": "urgent", "message": "Room 3"}}', "Room 3"),
    ],
    ids=["no-message", "empty", "not-json", "no-data", "null-data", "list-data", "surrogate", "an-alert"],
)
def test_the_alert_fragment_renders_whatever_message_it_is_given(signed_in, message, shown):
    client, token = signed_in("bob")
    form = {} if message is None else {"message": message}
    answer = client.post("/clinics/clinic-1/alerts/render", data=form, headers={"X-CSRF-Token": token})
    assert answer.status_code == 200, answer.get_data(as_text=True)[:300]
    assert shown in answer.get_data(as_text=True)


@pytest.mark.parametrize("page", ["\u00b2", "\u0663", "-1", "1.5", "10001"])
def test_a_log_page_that_is_not_a_page_number_is_a_400_that_says_so(signed_in, page):
    client, _ = signed_in("alice")
    for path in ("/admin/log", "/admin/log.csv"):
        answer = client.get(path, query_string={"page": page})
        assert answer.status_code in (200, 400), (path, answer.status_code)  # never a 500
    answer = client.get("/admin/log", query_string={"page": page})
    assert answer.status_code == 400 and "page must be a whole number" in answer.get_data(as_text=True)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("type", "\x00", "type may not contain control characters"),
        ("sender", "a\x1bb", "sender may not contain control characters"),
        ("channel", "system:announcements,system:maintenance", "channel names one channel"),
    ],
)
def test_a_log_filter_no_broadcast_could_match_is_a_400_that_says_so(signed_in, field, value, says):
    """A NUL reached Supabase's store, which answered with an error taken for an outage (503); a comma
    made the embedded store match broadcasts sent to both channels (found by review)."""
    client, _ = signed_in("alice")
    for path in ("/admin/log", "/admin/log.csv"):
        answer = client.get(path, query_string={field: value})
        assert answer.status_code == 400 and says in answer.get_data(as_text=True), (path, answer.status_code)


def test_a_form_of_more_parts_than_werkzeug_reads_is_413_body_too_large_not_an_internal_error(signed_in):
    """Werkzeug refuses a form of over 1,000 parts itself: its 413 carried the code for our bugs."""
    client, _ = signed_in("alice")
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\n\r\n'
    body = part * 1001 + b"--b--\r\n"
    assert len(body) < 64 * 1024  # under the route's own limit: werkzeug's is what refuses it
    answer = client.post("/api/admin/broadcast", data=body, content_type="multipart/form-data; boundary=b")
    assert answer.status_code == 413
    assert answer.get_json()["error"]["code"] == "body_too_large"


def test_a_page_renders_a_last_value_only_from_before_its_position():
    """The queue page lists the latest alert, and the page is replayed what came after its position: one
    from after it, rendered too, would be listed twice."""
    from flask import Flask, g

    from blueprints.pages import from_before_render
    from relay.envelope import Envelope

    alert = Envelope("CLINIC_ALERT", {"message": "Fridge B is warm"})
    with Flask("test").app_context():
        g.stream_at = ("e1", 10)
        assert from_before_render(alert.placed("e1", 10))
        assert not from_before_render(alert.placed("e1", 11))  # replayed to the page: not rendered
        assert from_before_render(alert.placed("e0", 99))  # a stream that ended before this one began
        g.stream_at = None  # no position rendered: nothing is replayed
        assert from_before_render(alert.placed("e1", 11))
