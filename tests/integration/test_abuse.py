"""Holding against abuse over a real gunicorn: sign-in throttling, per-user caps, trickling bodies,
oversized bodies, security headers, key rotation."""

from __future__ import annotations

import base64
import hashlib
import socket
import time

import pytest
import requests
from support import PASSWORD, PRODUCTION, Server, csrf_of, make_users, set_cookie, sign_in, wait_for

from relay.codes import Close
from relay.tokens import TokenService

# -- sign-in throttling -----------------------------------------------------------------------


def test_after_five_wrong_passwords_even_the_right_one_waits_and_other_accounts_do_not(server: Server):
    session = requests.Session()
    for _ in range(5):
        assert sign_in(server, "erin@example.test", "wrong guess", session=session).last.status_code == 401
    refused = sign_in(server, "erin@example.test", PASSWORD, session=session).last  # the right password
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) == 30
    assert "Too many failed sign-ins" in refused.text and "try again in 30 seconds" in refused.text
    assert sign_in(server, "carol@example.test", PASSWORD).last.status_code == 302  # someone else: fine
    record = server.wait_for_event("login.throttled", lambda e: e.get("login") == "erin@example.test")
    assert record["remote"] == "127.0.0.1" and record["retryAfter"] == 30 and "password" not in record
    assert "wrong guess" not in server.log_text() and PASSWORD not in server.log_text()


def test_a_browser_that_signed_in_before_is_not_locked_out_by_a_guesser(start_server):
    """The device cookie (relay.devices): a guesser who knows the email blocks every other browser,
    not the one the person signed in from before, signed out since; that one keeps a limit of its own."""
    srv = start_server()
    laptop = sign_in(srv, "bob@example.test")
    assert laptop.last.status_code == 302
    device_cookie = set_cookie(laptop.last, "clinic_device")
    assert "bob" not in device_cookie
    for attribute in ("HttpOnly", "Path=/login", "SameSite=Strict", "Max-Age=7776000"):
        assert attribute in device_cookie, device_cookie
    home = laptop.get(srv.url + "/", timeout=5)
    laptop.post(srv.url + "/logout", data={"csrf_token": csrf_of(home.text)}, timeout=5)
    assert laptop.cookies.get("clinic_device")  # a sign-out keeps it: it grants nothing else

    guesser = requests.Session()
    for _ in range(5):
        assert sign_in(srv, "bob@example.test", "wrong guess", session=guesser).last.status_code == 401
    assert sign_in(srv, "bob@example.test", PASSWORD, session=guesser).last.status_code == 429
    assert sign_in(srv, "bob@example.test", PASSWORD, session=laptop).last.status_code == 302
    record = srv.wait_for_event("login", lambda e: e.get("userId") == "bob" and e.get("knownDevice"))
    assert "clinic_device" not in srv.log_text() and laptop.cookies["clinic_device"] not in srv.log_text()

    for _ in range(5):  # the laptop's own mistakes count against the laptop
        assert sign_in(srv, "bob@example.test", "typo", session=laptop).last.status_code == 401
    assert sign_in(srv, "bob@example.test", PASSWORD, session=laptop).last.status_code == 429
    failed = srv.wait_for_event("login_failed", lambda e: e.get("knownDevice") is True)
    assert failed["login"] == "bob@example.test" and record["knownDevice"] is True
    for _ in range(5):
        assert sign_in(srv, "carol@example.test", "wrong", session=guesser).last.status_code == 401
    # The laptop's cookie is for bob only: to carol's account it is a stranger, blocked like the rest.
    assert sign_in(srv, "carol@example.test", PASSWORD, session=laptop).last.status_code == 429
    throttled = srv.wait_for_event("login.throttled", lambda e: e.get("login") == "carol@example.test")
    assert throttled["knownDevice"] is False


def test_the_throttle_is_shared_by_every_instance_with_redis(start_server, redis_server):
    host_a = start_server(REDIS_URL=redis_server.url)
    host_b = start_server(REDIS_URL=redis_server.url, REALTIME_DB=host_a.env["REALTIME_DB"])
    for _ in range(5):
        assert sign_in(host_a, "bob@example.test", "wrong").last.status_code == 401
    refused = sign_in(host_b, "bob@example.test", PASSWORD).last  # another host, the right password
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) in (29, 30)
    assert sign_in(host_b, "carol@example.test", PASSWORD).last.status_code == 302


def test_parallel_guesses_are_counted_before_any_password_is_checked(start_server):
    """Fifty guesses at once: the throttle counts each before checking, so at most five are checked."""
    from concurrent.futures import ThreadPoolExecutor

    srv = start_server()
    sessions = []
    for _ in range(50):
        session = requests.Session()
        session.token = csrf_of(session.get(srv.url + "/login", timeout=5).text)
        sessions.append(session)

    def guess(session):
        form = {"login": "erin@example.test", "password": "guess", "csrf_token": session.token}
        return session.post(srv.url + "/login", data=form, timeout=30, allow_redirects=False).status_code

    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(guess, sessions))
    assert statuses.count(401) == 5 and statuses.count(429) == 45, statuses


def wrong_from(srv: Server, account: str, forwarded: str) -> int:
    session = requests.Session()
    token = csrf_of(session.get(srv.url + "/login", timeout=5).text)
    form = {"login": account, "password": "wrong", "csrf_token": token}
    headers = {"X-Forwarded-For": forwarded}
    return session.post(srv.url + "/login", data=form, headers=headers, timeout=10, allow_redirects=False).status_code


def test_behind_a_trusted_proxy_each_client_address_has_its_own_limit(start_server):
    srv = start_server(TRUSTED_PROXIES=1)
    assert [wrong_from(srv, f"nobody-{n}@example.test", "10.0.0.1") for n in range(20)] == [401] * 20
    assert wrong_from(srv, "nobody-else@example.test", "10.0.0.1") == 429  # that address is slowed down
    assert wrong_from(srv, "nobody-else@example.test", "10.0.0.2") == 401  # another clinic is not
    record = srv.wait_for_event("login.throttled")
    assert record["remote"] == "10.0.0.1"


def test_without_trusted_proxies_a_forwarded_for_header_is_ignored(server: Server):
    """A client cannot dodge the address limit by sending its own X-Forwarded-For."""
    assert wrong_from(server, "spoof@example.test", "203.0.113.9") == 401
    assert server.wait_for_event("login_failed", lambda e: e.get("login") == "spoof@example.test")["remote"] == (
        "127.0.0.1"
    )


# -- connection caps ----------------------------------------------------------------------------


def test_a_socket_over_the_per_user_cap_is_closed_4429(start_server):
    srv = start_server(WS_MAX_CONNECTIONS_PER_USER=3)
    held = [srv.connect("bob") for _ in range(3)]
    with srv.open(srv.token("bob")) as fourth:
        assert fourth.closed_with() == (Close.TOO_MANY_CONNECTIONS, "too many connections for this user")
    with srv.connect("carol"):  # others are not counted against bob
        pass
    held[0].close()
    assert wait_for(lambda: srv.health()["clients"] == 2)
    with srv.connect("bob"):  # a place came free
        pass
    for client in held[1:]:
        client.close()


def test_the_cap_holds_across_instances_with_redis(start_server, redis_server):
    """Two instances on one Redis: the sockets bob holds on A count on B (within a heartbeat)."""
    shared = dict(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200, WS_MAX_CONNECTIONS_PER_USER=4)
    host_a = start_server(**shared)
    host_b = start_server(**shared, REALTIME_DB=host_a.env["REALTIME_DB"])
    held = [host_a.connect("bob") for _ in range(3)] + [host_b.connect("bob")]
    assert wait_for(lambda: all(srv.health()["clients"] == 4 for srv in (host_a, host_b)))  # both beats are in
    time.sleep(1)  # and each instance's next beats (every 0.2 s) have counted the other's users
    for srv in (host_b, host_a):
        with srv.open(srv.token("bob")) as extra:
            assert extra.closed_with() == (Close.TOO_MANY_CONNECTIONS, "too many connections for this user")
    with host_b.connect("carol"):  # someone else is not counted against bob
        pass
    for client in held:
        client.close()


# -- slow and oversized request bodies ------------------------------------------------------------


def trickler(port: int) -> socket.socket:
    """A POST /login that announces 60,000 bytes and sends one every 2 seconds."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 3000\r\n\r\nlogin="
    )
    return sock


def test_hundreds_of_trickling_bodies_are_cut_off_and_real_clients_are_served_meanwhile(start_server):
    import threading

    srv = start_server(HTTP_REQUEST_TIMEOUT_MS=8000)
    slow, opened = [], []
    for _ in range(300):
        slow.append(trickler(srv.port))
        opened.append(time.monotonic())
    stop = threading.Event()

    def trickle():  # a byte every half second on every one of them: busy, never done
        while not stop.wait(0.5):
            for sock in slow:
                try:
                    sock.sendall(b"x")
                except OSError:
                    pass

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        time.sleep(1.0)  # the tricklers are in full swing
        with srv.connect("bob") as bob:  # a real client, meanwhile
            bob.send({"type": "PING"})
            bob.expect("PONG")
        assert requests.get(srv.url + "/health", timeout=5).status_code == 200
        for sock in slow:  # served while all 300 still trickle: none has been answered or cut yet
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
            sock.settimeout(30)
        answers, cut_after = [], []
        for sock, at in zip(slow, opened, strict=True):
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except OSError:
                pass
            answers.append(data)
            cut_after.append(time.monotonic() - at)
    finally:
        stop.set()
        feeder.join(5)
        for sock in slow:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
    assert b"nosniff" in answers[0] and b"Referrer-Policy: same-origin" in answers[0]
    # At the 8 s deadline from the headers (sent as each opened), though bytes kept arriving.
    assert 7.9 < min(cut_after) and max(cut_after) < 30, (min(cut_after), max(cut_after))


ASKED = 200  # requests for the 52 KB htmx file: 10 MB of answers


def non_reader(port: int, requests_: int = ASKED) -> socket.socket:
    """A client that asks for a large file many times over and never reads: its receive window closes,
    and the server's write of the answers waits on it (past what the kernel's send buffer, up to 4 MB, holds)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    ask = b"GET /static/vendor/htmx-2.0.11.min.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock.sendall(ask * requests_)
    return sock


def test_clients_that_never_read_their_answers_are_cut_off_and_do_not_fill_the_server(start_server):
    """A write that waited forever (gunicorn's sockets have no timeout) held a request slot for good:
    WS_WORKER_CONNECTIONS such clients, and nobody else was accepted (found by review)."""
    srv = start_server(WS_WORKER_CONNECTIONS=10, HTTP_SEND_TIMEOUT_MS=1500, HTTP_REQUEST_TIMEOUT_MS=1500)
    stuck = [non_reader(srv.port) for _ in range(10)]
    try:
        time.sleep(0.5)  # every slot is taken by a write that cannot go on
        started = time.monotonic()
        assert requests.get(srv.url + "/health", timeout=20).status_code == 200  # once a slot frees
        assert time.monotonic() - started < 10
        with srv.connect("bob") as bob:  # and sockets too
            bob.send({"type": "PING"})
            bob.expect("PONG")
        time.sleep(3)  # one accepted late (a slot was the harness's) is past its own deadline by now
        for sock in stuck:  # each was closed mid-answer: far less than the answers asked for
            received = 0
            try:
                while chunk := sock.recv(65536):
                    received += len(chunk)
            except OSError:
                pass
            assert received < ASKED * 52_000, received
        # A keep-alive connection's next request, its body a second late (within HTTP_REQUEST_TIMEOUT_MS),
        # is read and answered: the send timeout left on the socket does not cut it.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(kept).startswith("HTTP/1.1 200")
            kept.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 12\r\n\r\nlogin=")
            time.sleep(1)
            kept.sendall(b"x&pw=y")
            assert read_response(kept).startswith("HTTP/1.1 4")  # answered (no CSRF token), not cut
        cut = srv.wait_for_event("http.send_timeout", lambda e: True)
        assert cut["level"] == "warning" and cut["timeoutMs"] == 1500
        assert "Traceback" not in srv.log_text() and "Socket error" not in srv.log_text()
    finally:
        for sock in stuck:
            sock.close()


def test_slow_headers_and_idle_keep_alive_connections_are_closed(server: Server):
    """gunicorn's keepalive (5 s) bounds both: headers that never end, and a connection left idle."""
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # and never the end
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert read_response(idle).startswith("HTTP/1.1 200")
    started = time.monotonic()
    with slow, idle:
        assert slow.recv(4096) == b"" and idle.recv(4096) == b""  # closed by the server
    assert time.monotonic() - started < 10


def test_headers_and_upgrades_trickling_in_are_cut_off_at_the_request_timeout(start_server):
    """HTTP_REQUEST_TIMEOUT_MS below 5 s also bounds headers and upgrade requests, bytes arriving or not."""
    srv = start_server(HTTP_REQUEST_TIMEOUT_MS=2000)
    upgrade = b"GET /ws?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=15) for _ in range(2)]
    socks[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    socks[1].sendall(upgrade)
    started, closed_at = time.monotonic(), [None, None]
    while None in closed_at and time.monotonic() - started < 12:
        for n, sock in enumerate(socks):
            if closed_at[n] is not None:
                continue
            try:
                sock.sendall(b"X-More: y\r\n")  # a header line now and then, never the blank line
                sock.settimeout(0.3)
                if sock.recv(4096) == b"":
                    closed_at[n] = time.monotonic() - started
            except TimeoutError:
                pass
            except OSError:
                closed_at[n] = time.monotonic() - started
    for sock in socks:
        sock.close()
    assert all(at is not None and 1.5 < at < 4.5 for at in closed_at), closed_at  # 2 s, not gunicorn's 5


def test_a_body_announced_larger_than_its_route_needs_is_refused_unread(server: Server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\nX-Request-Id: req-413\r\n\r\n"
        )
        head = sock.recv(4096)  # answered at once, though not a byte of the body was sent
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert b"X-Request-Id: req-413" in head  # answered outside Flask, with the id all answers carry
    big = server.broadcast(b'{"message":{"type":"A","data":"' + b"x" * 70_000 + b'"}}')
    assert big.status_code == 400 and big.json()["error"]["code"] == "body_too_large"  # the original contract


def read_response(sock: socket.socket) -> str:
    """One HTTP response with a Content-Length, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)  # the socket's timeout bounds each wait
        assert chunk, "the server closed before the whole head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed before the whole body"
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


UPGRADE = "GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@pytest.mark.parametrize(
    "headers, status",
    [
        ("Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n", 400),  # no key (found by the live fuzz)
        ("Connection: keep-alive\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n", 400),
        ("Connection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n", 426),
    ],
)
def test_a_malformed_upgrade_is_refused_with_a_clear_error_not_a_500(server: Server, headers: str, status: int):
    request = UPGRADE.format(token=server.token("bob")) + headers + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request.encode())
        answer = read_response(sock)
    assert answer.startswith(f"HTTP/1.1 {status} "), answer
    assert '"code": "bad_upgrade"' in answer or '"code":"bad_upgrade"' in answer
    # A refused upgrade is an ordinary answer: the after-request hooks that skip answered upgrades ran.
    assert "X-Request-Id: " in answer and "X-Content-Type-Options: nosniff" in answer, answer
    if status == 426:
        assert "Sec-WebSocket-Version: 13" in answer
    plain = requests.get(server.url + "/ws", timeout=5)
    assert plain.status_code == 400 and plain.json()["error"]["code"] == "bad_upgrade"
    assert "unhandled error" not in server.log_text()


@pytest.mark.parametrize("host", ["xn--zz", "ex\u00e9mple.test", None])
def test_an_upgrade_whose_host_is_not_a_host_name_is_refused_400_not_500(server: Server, host: str | None):
    """The handshake decodes the Host as IDNA and raised on one that is not, or on none (found by review)."""
    request = UPGRADE.format(token=server.token("bob"))
    request = request.replace("Host: 127.0.0.1\r\n", f"Host: {host}\r\n" if host is not None else "")
    request += "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request.encode("latin-1"))
        answer = read_response(sock)
    assert answer.startswith("HTTP/1.1 400 "), answer
    assert "valid Host header" in answer and "bad_upgrade" in answer
    assert "unhandled error" not in server.log_text()


def test_a_browsers_full_upgrade_is_answered_without_compression_or_subprotocol(server: Server):
    """A browser sends a dozen headers; the handshake gets only the five it needs (blueprints/socket.py)."""
    browser_headers = (
        "Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nSec-WebSocket-Protocol: chat\r\n"
        "Origin: http://127.0.0.1\r\nCookie: clinic_session=not-a-session\r\nPragma: no-cache\r\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0\r\nAccept-Language: en-US,en;q=0.9\r\n"
        "Accept-Encoding: gzip, deflate, br\r\nX-Request-Id: browser-upgrade-1\r\n"
    )
    request = UPGRADE.format(token=server.token("bob")) + browser_headers + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        head, rest = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        # The handshake answered the key it was given (RFC 6455 4.2.2: base64 of SHA-1 of key + GUID).
        accept = base64.b64encode(hashlib.sha1(b"AQIDBAUGBwgJCgsMDQ4PEA==" + WEBSOCKET_GUID).digest())
        assert b"Sec-WebSocket-Accept: " + accept in head and b"extensions" not in head.lower(), head
        assert b"sec-websocket-protocol" not in head.lower(), head
        while len(rest) < 2:
            rest += sock.recv(4096)
    assert rest[0] == 0x81, rest[:2]  # a final text frame, RSV1 clear: not compressed
    # The request id was bound before the headers were dropped.
    assert wait_for(lambda: '"requestId":"browser-upgrade-1"' in server.log_text().replace(" ", ""))


# -- headers --------------------------------------------------------------------------------------

PAGES = ["/", "/admin", "/admin/broadcast", "/admin/log", "/clinics/clinic-1/queue", "/login", "/no/such/page"]


@pytest.mark.parametrize("path", PAGES)
def test_every_page_carries_a_strict_content_security_policy_and_the_other_headers(server: Server, path):
    session = sign_in(server, "alice@example.test")
    response = session.get(server.url + path, timeout=5)
    policy = response.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"  # Back after sign-out shows nothing cached
    assert "Strict-Transport-Security" not in response.headers  # development over http
    import re

    inline = [tag for tag in re.findall(r"<script\b[^>]*>", response.text, re.I) if "src=" not in tag]
    assert inline == [] and " style=" not in response.text  # nothing inline to allow
    assert not re.search(r"\son[a-z]+\s*=", response.text, re.I)  # no inline event handlers either


def test_api_answers_carry_nosniff_too_and_production_adds_hsts(start_server):
    srv = start_server(**PRODUCTION)
    health = requests.get(srv.url + "/health", timeout=5)
    assert health.headers["X-Content-Type-Options"] == "nosniff"
    assert health.headers["Strict-Transport-Security"].startswith("max-age=31536000")


def test_signing_in_rotates_the_session(server: Server):
    session = requests.Session()
    before = csrf_of(session.get(server.url + "/login", timeout=5).text)
    old_cookie = session.cookies.get("clinic_session")
    sign_in(server, "bob@example.test", session=session)
    assert session.cookies.get("clinic_session") != old_cookie
    after = csrf_of(session.get(server.url + "/", timeout=5).text)
    assert after != before  # the form token from before the sign-in is worthless now
    refused = session.post(server.url + "/logout", data={"csrf_token": before}, timeout=5, allow_redirects=False)
    assert refused.status_code == 400 and "Not signed out" in refused.text
    assert session.get(server.url + "/api/ws/auth", timeout=5).status_code == 200


def test_any_origin_is_refused_in_production(start_server):
    srv = start_server(wait=False, **PRODUCTION, WS_ALLOWED_ORIGINS="*")
    assert srv.proc.wait(timeout=30) != 0
    assert "cannot start: WS_ALLOWED_ORIGINS=* would let every web site" in srv.log_text()


# -- token key rotation -------------------------------------------------------------------------------


def test_tokens_signed_with_the_previous_secret_still_connect_during_a_rotation(tmp_path):
    make_users(tmp_path / "realtime.db")
    old = "old-token-secret-0123456789-abcdefghijklmnop"
    srv = Server(tmp_path, {"WS_TOKEN_SECRET_PREVIOUS": old}).start()
    try:
        with srv.open(TokenService(old, 600_000).mint("bob")) as handed_out_before:
            handed_out_before.expect("CONNECTED")
        with srv.open(srv.token("bob")) as new:
            new.expect("CONNECTED")
        with srv.open(TokenService("neither-key-0123456789-abcdefghijklmnopq", 600_000).mint("bob")) as forged:
            assert forged.closed_with()[0] == Close.UNAUTHORIZED
    finally:
        srv.stop()
