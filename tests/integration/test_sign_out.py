"""Signing out ends the session on the server: a copy of the cookie taken before is refused
(relay.signouts), across a restart with the embedded store, across workers with Redis."""

import pytest
import requests
from support import ADMIN_SECRET, Server, csrf_of, flask_cli, make_users, sign_in

NEW_PASSWORD = "a new password, long enough"


def copy_of(session: requests.Session) -> str:
    """The session cookie as a thief or a backup would hold it: replayed as is on every request,
    whatever the server answers (a browser would drop it when told to)."""
    return session.cookies["clinic_session"]


def sign_out(srv: Server, session: requests.Session) -> None:
    home = session.get(srv.url + "/", timeout=5)
    answer = session.post(srv.url + "/logout", data={"csrf_token": csrf_of(home.text)}, timeout=5)
    assert answer.status_code == 200 and answer.url.endswith("/login")


def ws_auth(srv: Server, holder: requests.Session | str) -> int:
    """The status of ``GET /api/ws/auth`` for a signed-in browser, or for a copied cookie replayed."""
    if isinstance(holder, str):
        return requests.get(
            srv.url + "/api/ws/auth", headers={"Cookie": f"clinic_session={holder}"}, timeout=5
        ).status_code
    return holder.get(srv.url + "/api/ws/auth", timeout=5).status_code


def test_a_copy_of_the_cookie_is_refused_after_sign_out_and_other_sign_ins_keep_working(server: Server):
    laptop = sign_in(server, "bob")
    tablet = sign_in(server, "bob")
    stolen = copy_of(laptop)
    assert ws_auth(server, stolen) == 200
    sign_out(server, laptop)
    assert ws_auth(server, laptop) == 401
    assert ws_auth(server, stolen) == 401
    page = requests.get(
        server.url + "/", headers={"Cookie": f"clinic_session={stolen}"}, allow_redirects=False, timeout=5
    )
    assert page.status_code == 302 and page.headers["Location"].startswith("/login")
    assert ws_auth(server, tablet) == 200  # only the session that signed out ended
    assert ws_auth(server, sign_in(server, "bob")) == 200


def test_the_embedded_store_remembers_sign_outs_across_a_restart(tmp_path):
    make_users(tmp_path / "realtime.db")
    srv = Server(tmp_path).start()
    try:
        browser = sign_in(srv, "carol")
        stolen = copy_of(browser)
        kept = sign_in(srv, "carol")
        sign_out(srv, browser)
        srv.stop()
        srv.start()
        assert ws_auth(srv, stolen) == 401
        assert ws_auth(srv, kept) == 200
    finally:
        srv.stop()


def test_with_redis_every_host_refuses_the_copy_and_an_outage_signs_nobody_out(tmp_path, redis_server):
    shared = {"REDIS_URL": redis_server.url, "REALTIME_DB": str(tmp_path / "realtime.db")}
    make_users(tmp_path / "realtime.db")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    host_a = Server(tmp_path / "a", shared).start()
    host_b = Server(tmp_path / "b", shared).start()
    try:
        browser = sign_in(host_a, "bob")
        stolen = copy_of(browser)
        kept = sign_in(host_a, "bob")
        sign_out(host_a, browser)
        assert ws_auth(host_b, stolen) == 401  # the other host knows
        assert ws_auth(host_b, kept) == 200

        # Signed out everywhere through one host: the sign-ins and the sockets on the other end too.
        socket = host_b.connect("bob")
        ended = requests.post(
            host_a.url + "/api/users/bob/sign-out", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}, timeout=5
        )
        assert ended.status_code == 200
        assert ended.json() == {"ok": True, "userId": "bob", "disconnected": 1, "workers": 2, "missingWorkers": 0}
        assert socket.closed_with()[0] == 4403
        assert ws_auth(host_b, kept) == 401
        kept = sign_in(host_b, "bob")
        assert ws_auth(host_a, kept) == 200  # signing in again, at once, holds

        redis_server.stop()
        down = kept.get(host_b.url + "/api/ws/auth", timeout=10)
        assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
        assert "Set-Cookie" not in down.headers  # the browser keeps its session through the outage
        redis_server.start()  # same port (and, without persistence, an empty Redis: see the README)
        assert ws_auth(host_a, kept) == 200
    finally:
        host_a.stop()
        host_b.stop()


def test_a_sign_out_form_from_before_the_last_sign_in_signs_nobody_out_and_says_so(server: Server):
    browser = sign_in(server, "bob")
    old_page = browser.get(server.url + "/", timeout=5)
    sign_in(server, "bob", session=browser)  # a new session, a new CSRF token
    answer = browser.post(server.url + "/logout", data={"csrf_token": csrf_of(old_page.text)}, timeout=5)
    assert answer.status_code == 400 and "Not signed out" in answer.text
    assert ws_auth(server, browser) == 200


def test_a_new_password_ends_every_sign_in_of_that_user_and_only_theirs(start_server):
    srv = start_server()
    laptop, other = sign_in(srv, "bob"), sign_in(srv, "carol")
    stolen = copy_of(laptop)
    socket = srv.connect("bob")
    done = flask_cli(srv, "users", "set-password", "bob", "--password", NEW_PASSWORD)
    assert done.returncode == 0, done.stderr
    assert "password of bob changed; every sign-in of bob has ended\n1 open socket(s) closed" in done.stdout
    assert socket.closed_with()[0] == 4403
    assert ws_auth(srv, laptop) == 401 and ws_auth(srv, stolen) == 401
    assert ws_auth(srv, other) == 200
    assert sign_in(srv, "bob").last.status_code == 401  # the old password
    assert ws_auth(srv, sign_in(srv, "bob", NEW_PASSWORD)) == 200


def test_an_operator_signs_a_user_out_everywhere_and_a_typo_signs_nobody_out(start_server):
    srv = start_server()
    browser = sign_in(srv, "carol")
    assert "is not a user id" in flask_cli(srv, "users", "sign-out", "no spaces").stderr
    typo = flask_cli(srv, "users", "sign-out", "carl")
    assert typo.returncode != 0 and "no user 'carl'" in typo.stderr
    assert ws_auth(srv, browser) == 200
    done = flask_cli(srv, "users", "sign-out", "carol")
    assert done.returncode == 0 and "every sign-in of carol has ended\n0 open socket(s) closed" in done.stdout
    assert ws_auth(srv, browser) == 401
    again = sign_in(srv, "carol")
    assert ws_auth(srv, again) == 200
    # The server out of reach: the sign-ins end all the same, and the command says what is left to do.
    away = flask_cli(srv, "users", "sign-out", "carol", "--url", "http://127.0.0.1:9")
    assert away.returncode == 1 and "every sign-in of carol has ended" in away.stdout
    assert "their open sockets were not closed now (cannot reach" in away.stderr
    assert "run 'flask users sign-out carol --url http://127.0.0.1:9'" in away.stderr
    assert ws_auth(srv, again) == 401
    # A --url that is not one: refused before anything changes.
    latest = sign_in(srv, "carol")
    wrong = flask_cli(srv, "users", "sign-out", "carol", "--url", "127.0.0.1:9")
    assert wrong.returncode == 1 and "--url must start with http://" in wrong.stderr
    # ...nor is one whose port is not a number (it used to pass, end the sign-ins, then crash).
    wrong = flask_cli(srv, "users", "sign-out", "carol", "--url", "http://127.0.0.1:abc")
    assert wrong.returncode == 1 and "--url has a port that is not a number" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert ws_auth(srv, latest) == 200


def test_the_sign_out_api_needs_the_admin_secret_a_valid_id_and_a_known_user(server: Server):
    url = server.url + "/api/users/{}/sign-out"
    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    assert requests.post(url.format("bob"), timeout=5).status_code == 401
    bad = requests.post(url.format("no%20spaces"), headers=admin, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_body"
    nobody = requests.post(url.format("nobody-here"), headers=admin, timeout=5)
    assert nobody.status_code == 404 and nobody.json()["error"]["code"] == "unknown_user"


def test_the_sign_out_everywhere_button_ends_every_sign_in_and_socket_of_that_person_only(start_server):
    srv = start_server()
    laptop, phone, colleague = sign_in(srv, "bob"), sign_in(srv, "bob"), sign_in(srv, "carol")
    phone_socket, colleague_socket = srv.connect("bob"), srv.connect("carol")
    home = laptop.get(srv.url + "/", timeout=5)
    stolen = copy_of(laptop)  # with the CSRF token the page was given, as a thief's copy would be
    assert 'name="everywhere"' in home.text
    answer = laptop.post(srv.url + "/logout", data={"csrf_token": csrf_of(home.text), "everywhere": "1"}, timeout=5)
    assert answer.status_code == 200 and answer.url.endswith("/login")
    assert ws_auth(srv, phone) == 401 and ws_auth(srv, stolen) == 401
    assert phone_socket.closed_with()[0] == 4403
    assert ws_auth(srv, colleague) == 200 and colleague_socket.nothing_within(0.3)

    # The thief's copy, signed out, cannot sign its owner out again: it only signs itself out.
    again = sign_in(srv, "bob")
    replayed = requests.post(
        srv.url + "/logout",
        data={"csrf_token": csrf_of(home.text), "everywhere": "1"},
        headers={"Cookie": f"clinic_session={stolen}"},
        allow_redirects=False,
        timeout=5,
    )
    assert replayed.status_code == 302
    assert ws_auth(srv, again) == 200


def test_a_token_minted_before_a_sign_out_everywhere_opens_no_socket_after_it(start_server):
    srv = start_server()
    # Handed out before (a fetch still in flight, or a thief's copy), not yet used.
    bobs, carols = srv.token("bob"), srv.token("carol")
    done = requests.post(
        srv.url + "/api/users/bob/sign-out", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}, timeout=5
    )
    assert done.status_code == 200, done.text
    assert srv.open(bobs).closed_with() == (4401, "token signed out")
    srv.wait_for_event("ws.auth_failed", lambda e: e.get("reason") == "signed_out" and e.get("userId") == "bob")
    assert srv.open(carols).expect("CONNECTED")["data"]["userId"] == "carol"  # nobody else's
    assert srv.connect("bob").hello["userId"] == "bob"  # minted since: a sign-in after it


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_a_socket_opened_with_a_token_from_before_a_sign_out_its_worker_never_heard_closes_at_the_recheck(
    start_server, tmp_path, broker, request
):
    """The close of a sign-out everywhere reaches the workers listening then: one that was not (its
    Redis listener reconnecting, the CLI not reaching it) learns it from the store at its re-check."""
    env = {"WS_IDENTITY_RECHECK_MS": "1000"}
    if broker == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    srv = start_server(**env)
    old = srv.token("bob")
    bob, carol = srv.open(old), srv.connect("carol")
    assert bob.expect("CONNECTED")["data"]["userId"] == "bob"
    # Recorded in the store only, as the CLI does when it cannot reach the server: nobody closed bob's socket.
    away = flask_cli(srv, "users", "sign-out", "bob", "--url", "http://127.0.0.1:9")
    assert away.returncode == 1 and "every sign-in of bob has ended" in away.stdout
    assert bob.closed_with(timeout=10) == (4403, "signed out everywhere")
    srv.wait_for_event("ws.revoked", lambda e: e.get("reason") == "signed_out" and e.get("userId") == "bob")
    assert carol.nothing_within(0.3)
    assert srv.open(old).closed_with() == (4401, "token signed out")  # and its token opens nothing more
    assert srv.connect("bob").hello["userId"] == "bob"


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_the_cli_disconnects_a_user_and_a_server_it_cannot_reach_closes_their_sockets_at_the_recheck(
    start_server, broker, request
):
    """`flask users disconnect`: the server at --url closes the sockets at once. One the CLI cannot reach
    (or a worker that does not hear it) closes them at its re-check, from the record; sockets opened
    since stay, and the user's sign-ins and tokens are untouched."""
    env = {"WS_IDENTITY_RECHECK_MS": "1000"}
    if broker == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    srv = start_server(**env)
    bob, carol = srv.connect("bob"), srv.connect("carol")
    done = flask_cli(srv, "users", "disconnect", "bob", "--url", srv.url)
    assert done.returncode == 0, done.stderr
    assert "1 open socket(s) closed" in done.stdout
    assert bob.closed_with() == (4403, "disconnected by an administrator")
    again, minted = srv.connect("bob"), srv.token("bob")
    away = flask_cli(srv, "users", "disconnect", "bob", "--url", "http://127.0.0.1:9")
    assert away.returncode == 1 and "recorded" in away.stdout and "flask users disconnect bob" in away.stderr
    assert again.closed_with(timeout=10) == (4403, "disconnected by an administrator")
    after = srv.open(minted)  # a socket opened since stays, even with a token minted before (not a sign-out)
    assert after.expect("CONNECTED")["data"]["userId"] == "bob"
    assert srv.wait_rechecks(2)
    assert after.nothing_within(0.1) and carol.nothing_within(0.1)  # two re-checks later, both still open
    bad = flask_cli(srv, "users", "disconnect", "a b", "--url", srv.url)
    assert bad.returncode == 1 and "not a user id" in bad.stderr
    assert "WARNING" not in done.stderr
    # An id the identity source does not know: done all the same (a user removed from it may still have
    # sockets open), but said, as a typo would otherwise look like success (an operator's run).
    typo = flask_cli(srv, "users", "disconnect", "bobb", "--url", srv.url)
    assert typo.returncode == 0 and "WARNING: no user 'bobb' in sqlite: check the id" in typo.stderr
