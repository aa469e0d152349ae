"""realtime.js follows relay/codes.py for every close code, in real Chromium.

The page talks to the real server; Playwright sits on the socket (``route_web_socket``
with ``connect_to_server``: every frame passes through unchanged) so that a test
can end the page's socket with any close code, including those a correct
browser can never provoke from the real server (1002, 1007). Where the real
server can produce a code, a test makes it do so (1009 from an oversized frame,
1013 from a full server).
"""

from __future__ import annotations

import json
import re
import time

import pytest
import requests
from playwright.sync_api import expect
from support import ADMIN_SECRET, sign_in_elsewhere, sign_out_elsewhere, wait_for

from relay.codes import Close

SOCKET = re.compile(r"/ws\?token=")


class Sockets:
    """The page's sockets, each proxied to the real server; ``close(code)`` ends the newest from the server's side.

    Playwright's sync API runs the proxy's handlers only while the test calls Playwright: a wait on
    ``sent`` or ``held`` calls it too (:func:`proxied`), or it may see nothing arrive.
    """

    def __init__(self, page):
        self.routes = []
        self.created: list[float] = []
        self.refuse_with: int | None = None  # set: new sockets are closed with this code before they get in
        self.silent = False  # set: new sockets open, but nothing reaches the server or comes back from it
        self.drop = lambda message: False  # page -> server messages for which this is true are lost
        self.hold = lambda message: False  # ...are held back until release()
        self.rewrite = lambda message: message  # ...and reach the server as this returns them
        # set: server -> page messages of new sockets reach the page as this returns them (they pass
        # only while the test calls Playwright, see proxied)
        self.rewrite_in = None
        self.held: list[tuple] = []
        self.sent: list[str] = []  # every page -> server message
        page.route_web_socket(SOCKET, self._route)

    def _route(self, ws) -> None:
        self.created.append(time.monotonic())
        self.routes.append(ws)
        if self.refuse_with is not None:
            ws.close(code=self.refuse_with, reason="refused by the test")
        elif not self.silent:
            server = ws.connect_to_server()
            ws.on_message(lambda message: self._pass(server, message))
            if self.rewrite_in is not None:
                rewrite = self.rewrite_in
                server.on_message(lambda message: ws.send(rewrite(message)))

    def _pass(self, server, message) -> None:
        self.sent.append(message)
        if self.hold(message):
            self.held.append((server, message))
        elif not self.drop(message):
            server.send(self.rewrite(message))

    def release(self) -> None:
        held, self.held = self.held, []
        for server, message in held:
            server.send(message)

    def close(self, code: int, reason: str = "from the test") -> None:
        """The page's side only: the server's stays open, as with a network that died unnoticed."""
        self.routes[-1].close(code=code, reason=reason)


def proxied(page, predicate, timeout: float = 10):
    """``wait_for(predicate)``, calling Playwright at each try: the proxy's handlers run only then (see Sockets)."""
    return wait_for(lambda: page.wait_for_timeout(20) or predicate(), timeout=timeout)


def wait_live(page) -> None:
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "open", timeout=15_000)


def subscribe_since_position(page, channel: str) -> None:
    """Subscribe the page to ``channel`` since its position now: a SUBSCRIBE ``since``, which holds its broadcasts."""
    page.evaluate(
        "(channel) => { const at = window.realtime.position;"
        " window.realtime.subscribe([channel], { since: { epoch: at.epoch, offset: at.offset } }); }",
        channel,
    )


def other_epoch_for(answer: str, rewritten: list, wanted=lambda frame: True):
    """A ``Sockets.rewrite_in`` giving ``answer`` frames that ``wanted`` picks another epoch (originals noted)."""

    def rewrite(message):
        frame = json.loads(message) if isinstance(message, str) else {}
        if frame.get("type") != answer or not wanted(frame):
            return message
        rewritten.append(frame)
        return json.dumps({**frame, "data": {**frame["data"], "epoch": "another-stream"}})

    return rewrite


def restart_through(page, sockets, rewrite) -> None:
    """Close the page's socket 1012; its next one (the second) passes the server's frames through ``rewrite``."""
    sockets.rewrite_in = rewrite
    sockets.close(Close.SERVICE_RESTART)
    assert proxied(page, lambda: page.evaluate("window.realtime.stats.sockets") == 2)
    wait_live(page)


def retries(page) -> list[dict]:
    return page.evaluate("window.realtime.retries")


def wait_retry(page, count: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(got := retries(page)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(got) >= count, got
    return got


@pytest.fixture
def site(start_server):
    return start_server()


@pytest.fixture
def live(site, web):
    """A signed-in page whose sockets pass through the test, and the console errors it printed."""
    page = web(site, "bob", "about:blank")  # signed in, on a page with no socket of its own to race the route
    sockets = Sockets(page)
    errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(site.url + "/")
    wait_live(page)
    return page, sockets, errors


BACKOFF = [
    Close.NORMAL,
    Close.POLICY_VIOLATION,
    Close.INTERNAL_ERROR,
    Close.TRY_AGAIN_LATER,
    Close.KEEPALIVE_TIMEOUT,
    Close.REPLACED,  # on the page's current socket: some other copy resumed its session
]


@pytest.mark.parametrize("code", BACKOFF, ids=[str(int(c)) for c in BACKOFF])
def test_codes_that_say_back_off_reconnect_after_a_growing_jittered_wait(live, code):
    page, sockets, errors = live
    sockets.refuse_with = code  # the next two attempts are refused the same way before they get in
    sockets.close(code)
    decisions = wait_retry(page, 3)[:3]
    assert [(d["code"], d["action"]) for d in decisions] == [(code, "backoff")] * 3
    assert [d["windowMs"] for d in decisions] == [500, 1000, 2000]  # the window doubles
    assert all(250 <= d["delayMs"] <= d["windowMs"] for d in decisions)  # fully jittered, never below 250 ms
    sockets.refuse_with = None
    wait_live(page)  # and it is back on a new socket to the real server
    assert errors == []


def test_1012_reconnects_at_once_with_a_little_jitter_and_no_backoff(live):
    page, sockets, errors = live
    sockets.close(Close.SERVICE_RESTART, "service restart")
    [decision] = wait_retry(page, 1)
    assert decision["action"] == "restart" and 250 <= decision["delayMs"] <= 1000
    wait_live(page)
    assert page.evaluate("window.realtime.attempt") == 0  # its delay is the decision's, checked above
    assert errors == []


def test_repeated_1012_without_getting_in_falls_back_to_backoff(live):
    page, sockets, _ = live
    page.evaluate("window.realtime.options.maxQuickRestarts = 1; window.realtime.restarts = 1")
    sockets.close(Close.SERVICE_RESTART)
    assert wait_retry(page, 1)[0]["action"] == "backoff"


def test_a_server_that_admits_then_closes_1012_again_and_again_sees_the_client_back_off(live):
    """Getting in did not count the quick restarts over: a worker closing every socket with 1012 (a
    stream gap, again and again) had all its clients back within a second, every time (found by review)."""
    page, sockets, errors = live
    limit = page.evaluate("window.realtime.options.maxQuickRestarts")
    for _ in range(limit + 1):
        count = len(retries(page)) + 1
        sockets.close(Close.SERVICE_RESTART, "stream gap")
        wait_retry(page, count)
        wait_live(page)  # admitted again (CONNECTED), then closed again at once
    assert [d["action"] for d in retries(page)] == ["restart"] * limit + ["backoff"]


def test_quick_restarts_start_over_once_a_connection_lasted(live):
    page, sockets, errors = live
    page.evaluate("window.realtime.options.stableMs = 300")
    limit = page.evaluate("window.realtime.options.maxQuickRestarts")
    for _ in range(limit + 1):
        time.sleep(0.5)  # longer than stableMs: a deploy now and then, not a storm
        count = len(retries(page)) + 1
        sockets.close(Close.SERVICE_RESTART, "service restart")
        wait_retry(page, count)
        wait_live(page)
    assert [d["action"] for d in retries(page)] == ["restart"] * (limit + 1)


def test_a_token_request_that_never_answers_is_given_up_and_retried(live):
    """A network that died without an offline event: the request would wait for minutes, and every other
    way back in with it (found by review)."""
    page, sockets, errors = live
    page.evaluate("window.realtime.options.idleMs = 300; window.realtime.options.pongTimeoutMs = 300")
    held: list = []
    page.route("**/api/ws/auth", lambda route: held.append(route))  # never answered
    sockets.close(Close.SERVICE_RESTART)
    decisions = wait_retry(page, 2)
    assert [(d["code"], d["action"]) for d in decisions[:2]] == [(Close.SERVICE_RESTART, "restart"), (None, "backoff")]
    assert held  # it was asked, and given up on
    page.unroute("**/api/ws/auth")
    wait_live(page)


def test_a_first_connection_that_took_several_attempts_is_given_what_was_broadcast_meanwhile(site, web):
    """The page was rendered before the socket could open: what was broadcast meanwhile is not on it.
    The page's client knows where the stream was at the render, and is replayed what came after; a
    client that does not (no ``since``) tells its page to refetch."""
    page = web(site, "bob", "about:blank")
    page.route("**/api/ws/auth", lambda route: route.fulfill(status=503, body="{}"))
    page.goto(site.url + "/")
    proxied(page, lambda: len(retries(page)) >= 1)
    page.evaluate(
        "async () => { const { RealtimeClient } = await import('/static/js/realtime.js');"
        " window.__second = new RealtimeClient({ target: document.createElement('div') });"
        " window.__second.subscribe(['system:announcements']); window.__second.start();"
        " window.__resyncs = [0, 0]; window.realtime.onResync(() => window.__resyncs[0]++);"
        " window.__second.onResync(() => window.__resyncs[1]++); }"
    )
    proxied(page, lambda: len(page.evaluate("window.__second.retries")) >= 1)
    body = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "while you waited"}}, "filter": {}}
    sent = requests.post(
        site.url + "/broadcast", json=body, headers={"Authorization": f"Bearer {ADMIN_SECRET}"}, timeout=10
    )
    assert sent.status_code == 200 and sent.json()["delivered"] == 0
    page.unroute("**/api/ws/auth")
    wait_live(page)
    expect(page.locator("#toasts .toast-text")).to_have_text("while you waited")
    assert proxied(page, lambda: page.evaluate("window.__second.status") == "open")
    assert proxied(page, lambda: page.evaluate("window.__resyncs") == [0, 1])
    assert page.evaluate("window.realtime.retries[0].action") == "backoff"
    page.evaluate("window.__second.stop()")


def test_a_first_connection_made_once_the_browser_is_back_online_tells_the_page_to_refetch(site, web):
    """Started offline: no attempt was made, so none failed, but the page is older than its socket."""
    page = web(site, "bob")
    page.context.set_offline(True)
    page.evaluate(
        "async () => { const { RealtimeClient } = await import('/static/js/realtime.js');"
        " window.__second = new RealtimeClient({ target: document.createElement('div') });"
        " window.__resyncs = 0; window.__second.onResync(() => window.__resyncs++); window.__second.start(); }"
    )
    assert page.evaluate("window.__second.status") == "offline"
    page.context.set_offline(False)
    assert proxied(page, lambda: page.evaluate("window.__second.status") == "open")
    assert proxied(page, lambda: page.evaluate("window.__resyncs") == 1)
    page.evaluate("window.__second.stop()")


def test_a_server_frame_with_a_field_of_another_type_does_not_stop_the_client(live):
    """The server never sends these; a list that is not one must still not throw halfway through."""
    page, sockets, errors = live
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    sockets.routes[-1].send('{"type":"SUBSCRIBED","data":{"channels":5}}')
    sockets.routes[-1].send('{"type":"SUBSCRIBED","data":{"channels":{"a":1}}}')
    epoch = page.evaluate("window.realtime.position.epoch")
    hello = {"clientId": "c", "epoch": epoch, "offset": 1, "recovered": True, "channels": 5, "refused": {"a": 1}}
    sockets.routes[-1].send(json.dumps({"type": "CONNECTED", "data": hello}))
    page.evaluate("window.realtime.subscribe(['clinic:clinic-1:alerts'])")
    assert proxied(page, lambda: any("clinic:clinic-1:alerts" in message for message in sockets.sent))
    page.wait_for_timeout(200)
    assert page_errors == [] and page.evaluate("window.realtime.status") == "open"


@pytest.mark.parametrize(
    "mangled", ["not json {", '{"data": {}}', "null", "[1, 2]"], ids=["text", "no-type", "null", "list"]
)
def test_a_mangled_frame_is_reported_and_what_it_was_is_replayed_on_a_new_socket(site, web, mangled):
    """A frame that is not a message was dropped in silence: a broadcast something in between mangled was
    never shown, and nothing said so. The socket is not trusted after one: the client resumes on a new
    one, and the replay brings the broadcast (its position had not moved)."""
    page = web(site, "bob", "about:blank")
    errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    mangled_once: list[str] = []

    def route(ws) -> None:
        server = ws.connect_to_server()

        def to_page(message) -> None:
            if "mangle me" in message and not mangled_once:
                mangled_once.append(message)
                message = mangled
            ws.send(message)

        server.on_message(to_page)

    page.route_web_socket(SOCKET, route)
    page.goto(site.url + "/")
    wait_live(page)
    page.evaluate("window.__resyncs = 0; document.body.addEventListener('realtime:resync', () => window.__resyncs++)")
    body = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "mangle me"}}, "filter": {}}
    assert site.broadcast(body).json()["delivered"] == 1
    expect(page.locator("#toasts .toast-text", has_text="mangle me")).to_have_count(1)  # replayed, once
    assert mangled_once and any("not a message" in e and "resuming" in e for e in errors), errors
    assert page.evaluate("window.realtime.stats.sockets") == 2
    assert page.evaluate("window.__resyncs") == 0  # recovered: nothing to refetch
    wait_live(page)


def test_a_tab_told_signed_out_tries_again_when_its_person_comes_back_to_it(live, site):
    """Signed out in another tab, the page's next connection was refused (401 from the token endpoint)
    and the client stopped for good: signed in again elsewhere, this tab stayed "Signed out", its page
    frozen, until reloaded. Now coming back to it (the window focused, the tab visible) tries once more;
    still signed out, that one try is all."""
    page, sockets, _ = live
    sign_out_elsewhere(page, site)  # the open socket stays (a plain sign-out): a restart ends it
    sockets.close(Close.SERVICE_RESTART, "deploy")
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "unauthorized")
    fetches = page.evaluate("window.realtime.stats.authFetches")
    page.evaluate("window.dispatchEvent(new Event('focus'))")  # back to the tab, still signed out
    assert proxied(page, lambda: page.evaluate("window.realtime.stats.authFetches") == fetches + 1)
    page.wait_for_timeout(1000)  # and nothing more
    assert page.evaluate("window.realtime.stats") == {"authFetches": fetches + 1, "sockets": 1}
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "unauthorized")

    body = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "while away"}}, "filter": {}}
    assert site.broadcast(body).status_code == 200
    sign_in_elsewhere(page, site)
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # the tab shown again
    wait_live(page)
    assert page.evaluate("window.realtime.stats.sockets") == 2
    expect(page.locator("#toasts .toast-text", has_text="while away")).to_have_count(1)  # resumed: replayed
    body = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "and after"}}, "filter": {}}
    assert site.broadcast(body).json()["delivered"] >= 1
    expect(page.locator("#toasts .toast-text", has_text="and after")).to_have_count(1)


def test_a_tab_whose_user_was_disabled_tries_again_on_return_and_stops_again(live, site):
    """4403 (the user disabled) is also "unauthorized": coming back tries once, and is refused once."""
    page, sockets, _ = live
    sockets.refuse_with = Close.FORBIDDEN
    sockets.close(Close.FORBIDDEN, "user disabled")
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "unauthorized")
    page.evaluate("window.dispatchEvent(new Event('focus'))")
    assert proxied(page, lambda: len(sockets.routes) == 2)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "unauthorized")
    page.wait_for_timeout(1000)
    assert len(sockets.routes) == 2 and retries(page) == []
    sockets.refuse_with = None
    page.evaluate("window.dispatchEvent(new Event('focus'))")  # enabled again meanwhile
    wait_live(page)


@pytest.mark.parametrize("code", [Close.PROTOCOL_ERROR, Close.INVALID_PAYLOAD], ids=["1002", "1007"])
def test_protocol_errors_stop_show_an_error_status_and_tell_the_developer(live, code):
    page, sockets, errors = live
    page.evaluate(
        "window.__error = null; document.body.addEventListener('realtime:error', e => window.__error = e.detail)"
    )
    sockets.close(code, "bad frame")
    status = page.locator("#rt-status")
    expect(status).to_have_attribute("data-status", "error")
    expect(status).to_have_attribute("aria-label", "Live updates: Connection error (see the console)")
    assert page.evaluate("window.__error") == {"code": code, "reason": "bad frame"}
    assert any(str(int(code)) in e and "broke the WebSocket protocol" in e for e in errors), errors
    page.wait_for_timeout(1500)  # Playwright's wait: the proxy sees a new socket only while it runs
    assert len(sockets.routes) == 1 and retries(page) == []  # it did not loop


def test_4403_stops_as_unauthorized(live):
    page, sockets, _ = live
    sockets.close(Close.FORBIDDEN, "user disabled")
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "unauthorized")
    page.wait_for_timeout(1500)  # Playwright's wait: the proxy sees a new socket only while it runs
    assert len(sockets.routes) == 1 and retries(page) == []  # it did not come back
    assert page.evaluate("window.realtime.status") == "unauthorized"


def test_back_to_the_tab_a_quiet_socket_is_asked_at_once_and_a_dead_one_replaced(live):
    """After a laptop's sleep the socket looked live until the next idle check (up to 25 s, or a minute in a
    hidden tab) and its PONG timeout: the tab shown again (or the network back) asks it at once (found by review)."""
    page, sockets, _ = live
    sockets.drop = lambda message: '"PING"' in message  # the network died unnoticed: nothing answers
    page.wait_for_function("() => Date.now() - window.realtime.lastHeard > 1100")  # a quiet socket
    before = len(sockets.sent)
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # the tab is shown again
    assert proxied(page, lambda: any('"PING"' in m for m in sockets.sent[before:]), timeout=5)  # not in 25 s
    assert proxied(page, lambda: len(sockets.routes) == 2, timeout=30)  # no PONG within 10 s: a new socket
    sockets.drop = lambda message: False
    wait_live(page)


@pytest.mark.parametrize("code", [Close.FORBIDDEN, Close.PROTOCOL_ERROR], ids=["4403", "1002"])
def test_a_page_whose_connection_gave_up_reloads_itself_a_minute_later(site, web, code):
    """A wall screen nobody touches showed its last state for good once its connection gave up (a session
    ended at a deploy's reconnect, a broken proxy), with only the status label changed (found by review)."""
    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    page.clock.install()  # time flows as usual; fast_forward jumps it, running the timers on the way
    page.goto(site.url + "/")
    wait_live(page)
    page.evaluate("window.__same_page = true")
    sockets.close(code, "gave up")
    gave_up = "unauthorized" if code == Close.FORBIDDEN else "error"
    expect(page.locator("#rt-status")).to_have_attribute("data-status", gave_up)
    page.clock.fast_forward(50_000)
    assert page.evaluate("window.__same_page") is True  # not before the minute
    page.clock.fast_forward(15_000)
    page.wait_for_function("() => window.__same_page === undefined", timeout=15_000)  # a new page
    wait_live(page)  # bob's session still works: a new connection


def test_the_server_closing_1009_is_reported_and_the_client_reconnects(site, web):
    """A real 1009, straight from the server (no proxy): a frame over 64 KiB, written past the client's own guard."""
    page = web(site, "bob")
    errors: list[str] = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    wait_live(page)
    page.evaluate("window.realtime.ws.send('x'.repeat(70000))")
    [decision] = wait_retry(page, 1)
    assert decision["code"] == Close.MESSAGE_TOO_BIG and decision["action"] == "backoff"
    assert any("1009" in e and "will not be resent" in e for e in errors), errors
    wait_live(page)


def test_the_client_refuses_to_send_an_oversized_message(live):
    page, sockets, errors = live
    assert page.evaluate("window.realtime.send({type: 'PING', pad: 'x'.repeat(70000)})") is False
    assert any("over 65536 bytes" in e for e in errors)
    assert page.evaluate("window.realtime.status") == "open"  # nothing was sent, nothing was closed


def test_a_full_server_answers_1013_and_the_client_backs_off(start_server, web):
    srv = start_server(WS_MAX_CLIENTS=1)
    with srv.connect("carol"):  # takes the one place
        page = web(srv, "bob")
        decision = wait_retry(page, 1)[0]
        assert decision["code"] == Close.TRY_AGAIN_LATER and decision["action"] == "backoff"
    wait_live(page)  # a place came free: the backoff got it in


def test_4429_too_many_sockets_backs_off_from_a_longer_first_wait(start_server, web):
    """Many tabs of one user over the cap must not retry in step: the first wait is drawn from 4 s, not 0.5 s."""
    srv = start_server(WS_MAX_CONNECTIONS_PER_USER=1)
    with srv.connect("bob"):  # bob's one place is taken (another tab)
        page = web(srv, "bob")
        decision = wait_retry(page, 1)[0]
        assert decision["code"] == Close.TOO_MANY_CONNECTIONS and decision["action"] == "backoff"
        assert decision["windowMs"] == 4000 and decision["delayMs"] >= 250
    wait_live(page)  # the other tab closed: the backoff got it in


def test_an_expired_token_is_replaced_at_once_and_without_backoff(site, web):
    calls = []

    def first_token_expired(route):
        calls.append(time.monotonic())
        if len(calls) == 1:
            stale = site.token("bob", timestamp=int(time.time() * 1000) - 3_600_000)
            route.fulfill(json={"wsUrl": site.ws_url, "token": stale, "userId": "bob"})
        else:
            route.continue_()

    page = web(site, "bob", "about:blank")  # sign in first (on a page with no socket), then watch the token endpoint
    page.route("**/api/ws/auth", first_token_expired)
    page.goto(site.url + "/")
    wait_live(page)
    assert page.evaluate("window.realtime.stats") == {"authFetches": 2, "sockets": 2}
    assert retries(page) == [{"code": Close.UNAUTHORIZED, "action": "token", "delayMs": 0, "windowMs": 0}]
    assert len(calls) == 2  # the second fetch followed the 4401 at once: delayMs 0, above
    site.wait_for_event("ws.auth_failed", lambda e: e["reason"] == "expired" and e["userId"] == "bob")


def test_tokens_that_keep_failing_back_off_then_end_in_unauthorized(site, web):
    def always_expired(route):
        stale = site.token("bob", timestamp=int(time.time() * 1000) - 3_600_000)
        route.fulfill(json={"wsUrl": site.ws_url, "token": stale, "userId": "bob"})

    page = web(site, "bob", "about:blank")  # signed in, on a page with no socket of its own
    page.route("**/api/ws/auth", always_expired)
    opened: list[float] = []
    page.on("websocket", lambda ws: opened.append(time.monotonic()))
    page.goto(site.url + "/")
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "unauthorized", timeout=30_000)
    decisions = retries(page)
    assert [d["action"] for d in decisions] == ["token", "backoff", "backoff", "backoff"]
    assert [d["windowMs"] for d in decisions[1:]] == [500, 1000, 2000]  # the window doubles
    assert all(250 <= d["delayMs"] <= d["windowMs"] for d in decisions[1:])
    gaps = [later - earlier for earlier, later in zip(opened, opened[1:], strict=False)]
    assert len(opened) == 5 and all(gap >= 0.2 for gap in gaps[1:]), gaps  # measured between sockets
    time.sleep(2)
    assert page.evaluate("window.realtime.stats")["sockets"] == 5  # and then it stopped
    expect(page.locator("#rt-status .rt-status-text")).to_have_text("Signed out")


def test_a_server_that_admits_then_closes_again_and_again_sees_the_client_back_off(live):
    """Getting in is not enough to start the backoff over: a connection must also last (stableMs)."""
    page, sockets, errors = live
    for _ in range(3):
        count = len(retries(page)) + 1
        sockets.close(Close.TRY_AGAIN_LATER, "slow consumer")
        wait_retry(page, count)
        wait_live(page)  # admitted again (CONNECTED), then closed again at once
    assert [d["windowMs"] for d in retries(page)] == [500, 1000, 2000]


def test_a_connection_that_lasted_starts_the_backoff_over(live):
    page, sockets, errors = live
    page.evaluate("window.realtime.options.stableMs = 300")
    for _ in range(2):
        time.sleep(0.5)  # longer than stableMs
        count = len(retries(page)) + 1
        sockets.close(Close.TRY_AGAIN_LATER, "slow consumer")
        wait_retry(page, count)
        wait_live(page)
    assert [d["windowMs"] for d in retries(page)] == [500, 500]


# -- what realtime.js does when the network loses something without closing ----------------------

QUEUE = "clinic:clinic-1:queue"
MAINTENANCE = "system:maintenance"
ALERTS = "clinic:clinic-1:alerts"


def test_a_socket_that_never_gets_its_connected_is_given_up_and_replaced(live):
    """The network died after the 101: nothing is sent before CONNECTED, so only a timer can tell."""
    page, sockets, errors = live
    page.evaluate("window.realtime.options.idleMs = 300; window.realtime.options.pongTimeoutMs = 300")
    sockets.silent = True
    sockets.close(Close.SERVICE_RESTART)  # the page reconnects at once, to a socket that says nothing
    decisions = wait_retry(page, 2)
    assert [(d["code"], d["action"]) for d in decisions[:2]] == [(Close.SERVICE_RESTART, "restart"), (4000, "backoff")]
    sockets.silent = False
    wait_live(page)
    assert errors == []


def test_broadcasts_held_for_a_subscribe_never_answered_are_replayed_on_a_new_socket(live, site):
    """A SUBSCRIBE `since` holds the page's broadcasts until it is answered. One lost on its way (a proxy)
    held them for good, on a socket that looked alive (its PONGs kept coming): an announcement never shown.
    Past idleMs + pongTimeoutMs the page resumes on a new socket, which replays what was held."""
    page, sockets, errors = live
    warnings: list[str] = []
    page.on("console", lambda msg: msg.type == "warning" and warnings.append(msg.text))
    page.evaluate("window.realtime.options.idleMs = 1000; window.realtime.options.pongTimeoutMs = 1000")
    sockets.drop = lambda message: QUEUE in message and "since" in message
    subscribe_since_position(page, QUEUE)
    assert proxied(page, lambda: any(QUEUE in m and "since" in m for m in sockets.sent))
    sockets.drop = lambda message: False
    body = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "held meanwhile"}}, "filter": {}}
    assert site.broadcast(body).json()["delivered"] == 1  # to the page's socket, which holds it
    shown = page.locator("#toasts .toast-text", has_text="held meanwhile")
    expect(shown).to_have_count(1, timeout=15_000)  # replayed on the new socket, once
    assert page.evaluate("window.realtime.stats.sockets") == 2
    assert [d["code"] for d in retries(page)] == [4000]
    assert any("SUBSCRIBE went unanswered" in w for w in warnings), warnings
    wait_live(page)
    assert errors == []


def test_a_subscribe_lost_with_the_ping_that_asked_after_it_is_found_by_the_next_ping(live, site):
    """Counted PONGs: a PING lost too (the same proxy) made every later PONG one short, and a first version
    never saw its PING answered: broadcasts held for good again. Each round sends another PING, whose
    PONG is counted as the lost one's."""
    page, sockets, errors = live
    warnings: list[str] = []
    page.on("console", lambda msg: msg.type == "warning" and warnings.append(msg.text))
    page.evaluate(
        "() => { window.__ticks = []; window.realtime.onMessage((m) => m.type === 'TICK' && __ticks.push(m.data.n));"
        " window.realtime.options.idleMs = 1000; window.realtime.options.pongTimeoutMs = 1000; }"
    )
    lost: list[str] = []

    def lose(message: str) -> bool:  # the SUBSCRIBE, then the first PING after it
        if (QUEUE in message and "since" in message and not lost) or ('"PING"' in message and len(lost) == 1):
            lost.append(message)
            return True
        return False

    sockets.drop = lose
    subscribe_since_position(page, QUEUE)
    sent = 0
    deadline = time.monotonic() + 20
    while page.evaluate("window.realtime.stats.sockets") == 1 and time.monotonic() < deadline:
        body = {"message": {"type": "TICK", "data": {"n": sent}}, "filter": {}}
        site.broadcast(body)  # frames keep coming: no idle PING, and the PINGs sent are the hold's
        sent += 1
        page.wait_for_timeout(300)
    assert len(lost) == 2, lost  # the SUBSCRIBE and a PING
    assert page.evaluate("window.realtime.stats.sockets") == 2
    assert any("SUBSCRIBE went unanswered" in w for w in warnings), warnings
    wait_live(page)
    assert proxied(page, lambda: page.evaluate("window.__ticks") == list(range(sent)))  # replayed, in order
    assert [d["code"] for d in retries(page)] == [4000]
    assert errors == []


def test_a_subscribe_answered_late_behind_a_long_replay_keeps_its_socket(live, site):
    """The deadline above must not cut a replay that is only slow (megabytes on a slow link): frames keep
    arriving, and the PING sent at the deadline is answered after the SUBSCRIBE's answer, which releases
    the hold. A first version abandoned at the deadline itself: the next socket replayed the same
    megabytes and hit the same deadline, again and again."""
    page, sockets, errors = live
    page.evaluate(
        "() => { window.__ticks = []; window.realtime.onMessage((m) => m.type === 'TICK' && __ticks.push(m.data.n));"
        " window.realtime.options.idleMs = 1000; window.realtime.options.pongTimeoutMs = 1000; }"
    )
    # Everything from the SUBSCRIBE on waits in the proxy, in order: the link is slow.
    sockets.hold = lambda message: bool(sockets.held) or (QUEUE in message and "since" in message)
    subscribe_since_position(page, QUEUE)
    assert proxied(page, lambda: len(sockets.held) == 1)
    asked = time.monotonic()
    probed = "!!(window.realtime.holding && window.realtime.holding.probes && window.realtime.holding.probes.length)"
    sent = 0
    while not page.evaluate(probed) and time.monotonic() < asked + 15:
        body = {"message": {"type": "TICK", "data": {"n": sent}}, "filter": {}}
        assert site.broadcast(body).json()["delivered"] == 1  # arrives, held by the page: the socket is alive
        sent += 1
        page.wait_for_timeout(300)
    assert page.evaluate(probed) and time.monotonic() - asked >= 2  # the deadline (idleMs + pongTimeoutMs) passed
    assert sent >= 3 and any('"PING"' in message for _, message in sockets.held)  # held behind the SUBSCRIBE
    sockets.hold = lambda message: False
    sockets.release()
    assert proxied(page, lambda: len(page.evaluate("window.__ticks")) == sent)
    assert page.evaluate("window.__ticks") == list(range(sent))  # shown once the answer came, in order
    assert proxied(page, lambda: not page.evaluate(probed))  # its PONG came: nothing held, nothing asked
    assert page.evaluate("window.realtime.stats.sockets") == 1 and retries(page) == []
    assert errors == []


def test_a_pong_from_another_stream_is_not_trusted_the_page_resumes_on_a_new_socket(live):
    """Broadcasts carry no epoch: were the stream reset under an open socket (the server closes 1012
    "stream reset" first), the new stream's low offsets would look already seen. A PONG naming another
    epoch than the page's is not trusted: the page resumes on a new socket (which is told epoch_changed)."""
    page, sockets, errors = live
    warnings: list[str] = []
    page.on("console", lambda msg: msg.type == "warning" and warnings.append(msg.text))
    rewritten: list[dict] = []
    restart_through(page, sockets, other_epoch_for("PONG", rewritten, lambda frame: not rewritten))
    position = page.evaluate("window.realtime.position")
    page.evaluate("window.realtime._ping(window.realtime.ws)")
    assert proxied(page, lambda: page.evaluate("window.realtime.stats.sockets") == 3)
    assert rewritten and rewritten[0]["data"]["epoch"] == position["epoch"]
    assert any("no longer the one this page follows" in w for w in warnings), warnings
    wait_live(page)
    assert page.evaluate("window.realtime.position.epoch") == position["epoch"]  # the real stream, resumed
    assert [d["code"] for d in retries(page)] == [Close.SERVICE_RESTART, 4000]
    assert errors == []


def test_a_subscribed_from_another_stream_is_not_trusted_before_what_it_held_is_shown(live, site):
    """The SUBSCRIBED a hold waits for names another epoch: the broadcasts held with it are not shown from
    that socket (they would have moved the position in a stream that is not the page's), but replayed on
    the next one, once."""
    page, sockets, errors = live
    page.evaluate(
        "() => { window.__shown = []; window.realtime.onMessage((m) => m.type === 'ANNOUNCEMENT'"
        " && __shown.push([m.data.message, window.realtime.stats.sockets])); }"
    )
    rewritten: list[dict] = []
    restart_through(
        page, sockets, other_epoch_for("SUBSCRIBED", rewritten, lambda f: QUEUE in f["data"].get("channels", []))
    )
    sockets.rewrite_in = None  # the socket after it: as the server sent it
    sockets.hold = lambda message: QUEUE in message and "since" in message
    subscribe_since_position(page, QUEUE)
    assert proxied(page, lambda: len(sockets.held) == 1)
    body = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "held"}}, "filter": {}}
    assert site.broadcast(body).json()["delivered"] == 1  # held by the page, behind the SUBSCRIBE
    sockets.hold = lambda message: False
    sockets.release()  # answered, with another epoch
    assert proxied(page, lambda: page.evaluate("window.realtime.stats.sockets") == 3)
    assert rewritten
    assert proxied(page, lambda: page.evaluate("window.__shown") == [["held", 3]])  # replayed, not shown from 2
    page.wait_for_timeout(300)
    assert page.evaluate("window.__shown") == [["held", 3]]
    assert errors == []


def test_a_subscribe_lost_with_its_socket_is_refetched_after_a_recovered_resume(live, site):
    """The SUBSCRIBE left, but the server never had it (lost with the socket): the resumed session lacks the
    channel and the replay did not cover it, so the page is told to refetch it. A channel the server
    refused is not (it has nothing to miss)."""
    page, sockets, errors = live
    page.evaluate(
        "() => { window.__resyncs = [];"
        " window.realtime.onResync((d) => window.__resyncs.push([d.reason, d.channels || []])); }"
    )
    page.evaluate(
        "() => { window.__errors = []; window.realtime.onMessage((m) => m.type === 'ERROR' && __errors.push(m)); }"
    )
    page.evaluate("window.realtime.subscribe(['clinic:clinic-2:queue'])")  # not bob's clinic: refused
    assert wait_for(lambda: len(page.evaluate("window.__errors")) == 1, timeout=10)
    sockets.drop = lambda message: QUEUE in message
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'])")
    assert proxied(page, lambda: any(QUEUE in m for m in sockets.sent))
    sockets.drop = lambda message: False
    sockets.close(Close.SERVICE_RESTART)
    assert wait_for(lambda: page.evaluate("window.__resyncs") == [["not_restored", [QUEUE]]], timeout=10)
    wait_live(page)
    assert page.evaluate("window.__resyncs") == [["not_restored", [QUEUE]]]


@pytest.mark.parametrize("case", ["replayed", "not replayed", "ended in a hold"])
def test_a_channel_the_last_socket_held_but_the_restored_session_lacks_is_replayed_not_refetched(live, site, case):
    """The worker left had not saved a SUBSCRIBE it answered (it was killed, or the page came back on another
    worker first): the resumed session lacks the channel, though every broadcast of it up to the page's
    position reached the page. It is asked since the position the page resumed from: what it missed is
    replayed with the rest, once and in order, and the page is not told to refetch it; if that cannot be
    replayed, only it is refetched. Not when that socket ended while broadcasts were held: the position
    stayed behind where the channel was taken. (The proxy takes the channel out of the resume's
    CONNECTED: a worker killed within its quarter-second save is not a test.)"""
    page, sockets, errors = live
    page.evaluate(
        "() => { window.__resyncs = []; window.__shown = [];"
        " window.realtime.onResync((d) => window.__resyncs.push([d.reason, d.channels || []]));"
        " window.realtime.onMessage((m) => m.type === 'ANNOUNCEMENT' && __shown.push(m.data.message)); }"
    )
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'])")
    assert proxied(page, lambda: page.evaluate("window.realtime.unanswered.size") == 0)
    queue_only = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "before"}}, "filter": {"channels": [QUEUE]}}
    assert site.broadcast(queue_only).json()["delivered"] == 1
    assert proxied(page, lambda: page.evaluate("window.__shown") == ["before"])
    resumed_from = page.evaluate("window.realtime.position.offset")
    if case == "ended in a hold":
        sockets.hold = lambda message: ALERTS in message and "since" in message
        subscribe_since_position(page, ALERTS)
        assert proxied(page, lambda: len(sockets.held) == 1)

    connected: list[dict] = []

    def without_the_queue(message):
        frame = json.loads(message) if isinstance(message, str) else {}
        kind, data = frame.get("type"), frame.get("data") or {}
        if kind == "CONNECTED" and data.get("recovered") is True:
            connected.append(data)
            channels = [name for name in data["channels"] if name != QUEUE]
            return json.dumps({**frame, "data": {**data, "channels": channels}})
        if case == "not replayed" and kind == "SUBSCRIBED" and data.get("channels") == [QUEUE] and "recovered" in data:
            return json.dumps({**frame, "data": {**data, "recovered": False, "reason": "history_gone"}})
        return message

    sockets.refuse_with = Close.TRY_AGAIN_LATER  # away for a moment, while the queue moves on
    sockets.close(Close.SERVICE_RESTART)
    sockets.hold = lambda message: False
    wait_retry(page, 1)
    missed = {"message": {"type": "ANNOUNCEMENT", "data": {"message": "missed"}}, "filter": {"channels": [QUEUE]}}
    assert site.broadcast(missed).status_code == 200
    before = len(sockets.sent)
    page.evaluate(f"window.realtime.subscribe(['{MAINTENANCE}'])")  # while away: never sent, nothing to resume
    sockets.rewrite_in = without_the_queue
    sockets.refuse_with = None
    wait_live(page)
    subscribes = lambda: [json.loads(m)["data"] for m in sockets.sent[before:] if '"SUBSCRIBE"' in m]  # noqa: E731
    assert proxied(page, lambda: page.evaluate("window.__shown") == ["before", "missed"])
    page.wait_for_timeout(300)
    assert page.evaluate("window.__shown") == ["before", "missed"]  # once
    resyncs = page.evaluate("window.__resyncs")
    if case == "ended in a hold":
        [asked] = subscribes()  # all of them since CONNECTED, and refetched
        assert set(asked["channels"]) == {QUEUE, ALERTS, MAINTENANCE}
        assert asked["since"]["offset"] == connected[0]["offset"] != resumed_from
        assert ["not_restored", [QUEUE, ALERTS, MAINTENANCE]] in resyncs
    else:
        held, unheld = subscribes()  # in this order, each with its own since
        assert held["channels"] == [QUEUE] and held["since"]["offset"] == resumed_from  # not CONNECTED's offset
        assert unheld["channels"] == [MAINTENANCE] and unheld["since"]["offset"] == connected[0]["offset"]
        refetched = [["not_restored", [MAINTENANCE]]] + ([["history_gone", [QUEUE]]] if case == "not replayed" else [])
        assert resyncs == refetched  # only what was not replayed, never the whole page
    assert errors == []


def test_a_subscriber_swapped_for_an_equal_one_does_not_ask_for_the_last_value_again(site, web):
    """An htmx swap of a fragment that asks for its channel's last value: the new copy shows the same
    state; asking again would re-render every fragment of the channel (and a fragment that swaps itself
    in on each message would ask forever)."""
    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    page.goto(site.url + "/clinics/clinic-1/queue")
    wait_live(page)
    assert proxied(page, lambda: any('"last":true' in m and QUEUE in m for m in sockets.sent))
    before = len(sockets.sent)
    page.evaluate(
        f"() => {{ const old = document.querySelector('[data-realtime-channels=\"{QUEUE}\"]');"
        " old.replaceWith(old.cloneNode(true)); }"
    )
    page.evaluate("window.realtime.send({type: 'PING'})")  # after whatever the swap made the page send
    assert proxied(page, lambda: any('"PING"' in m for m in sockets.sent[before:]))
    assert [m for m in sockets.sent[before:] if "SUBSCRIBE" in m] == []
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'], {{ last: true }})")  # a second subscriber still asks
    assert proxied(page, lambda: any('"last":true' in m for m in sockets.sent[before:]))
    # Nor does one inside a parent re-rendered around it (one re-rendered on each message of its channel
    # would ask forever), and the channel's last value is still asked for after a reconnect.
    page.evaluate(
        f"() => {{ const old = document.querySelector('[data-realtime-channels=\"{QUEUE}\"]');"
        " const parent = document.createElement('div'); old.replaceWith(parent); parent.append(old); }"
    )
    before = len(sockets.sent)
    page.evaluate(
        "() => { const p = document.querySelector('#queue').parentElement; p.replaceWith(p.cloneNode(true)); }"
    )
    page.evaluate("window.realtime.send({type: 'PING'})")
    assert proxied(page, lambda: any('"PING"' in m for m in sockets.sent[before:]))
    assert [m for m in sockets.sent[before:] if "SUBSCRIBE" in m and QUEUE in m] == []
    assert page.evaluate(f"window.realtime.wantsLast.has('{QUEUE}')")


def test_once_no_subscriber_wants_a_channels_last_value_resubscriptions_stop_asking_for_it(site, web):
    """A fragment that asked for it left while a plain subscriber of the channel stays: each later
    resubscription would otherwise bring the last value again, marked ``last``, as if it were news."""
    page = web(site, "bob", "about:blank")
    page.goto(site.url + "/clinics/clinic-1/queue")
    wait_live(page)
    fragments = f'[data-realtime-channels="{QUEUE}"][data-realtime-last="true"]'
    wanting = page.evaluate(f"document.querySelectorAll('{fragments}').length")
    assert wanting >= 1 and page.evaluate(f"window.realtime.wantsLast.get('{QUEUE}')") == wanting
    page.evaluate(
        f"() => {{ window.realtime.subscribe(['{QUEUE}']); window.realtime.subscribe(['{QUEUE}'], {{ last: true }}); }}"
    )
    page.evaluate(f"window.realtime.unsubscribe(['{QUEUE}'], {{ last: true }})")
    assert page.evaluate(f"window.realtime.wantsLast.get('{QUEUE}')") == wanting  # the fragments still want it
    page.evaluate(f"() => document.querySelectorAll('{fragments}').forEach((element) => element.remove())")
    page.wait_for_function(f"() => !window.realtime.wantsLast.has('{QUEUE}')", timeout=5000)  # site.js saw them go
    assert page.evaluate(f"window.realtime.refs.has('{QUEUE}')")  # the plain subscriber keeps the channel


def test_a_channel_refused_then_allowed_is_refetched(live, site):
    """The user could not read it (another clinic's queue), then could: what the page shows of it is from
    before, and no replay covered it (found by review)."""
    from support import flask_cli

    page, sockets, errors = live
    page.evaluate(
        "() => { window.__resyncs = [];"
        " window.realtime.onResync((d) => window.__resyncs.push([d.reason, d.channels || []])); }"
    )
    other = "clinic:clinic-2:queue"
    page.evaluate(f"window.realtime.subscribe(['{other}'])")  # bob is clinic-1's: refused
    assert wait_for(lambda: page.evaluate("window.realtime.refused.size") == 1, timeout=10)
    moved = flask_cli(site, "users", "set-clinic", "bob", "clinic-2")
    assert moved.returncode == 0, moved.stderr
    sockets.close(Close.SERVICE_RESTART)  # the next connection subscribes it again, and it is taken
    assert wait_for(lambda: page.evaluate("window.__resyncs") == [["granted", [other]]], timeout=15)


def record(page, *types: str) -> None:
    """``window.__got``: every message of these types the page receives from now on."""
    page.evaluate(
        f"() => {{ if (window.__stop) window.__stop(); const got = (window.__got = []); const types = {list(types)!r};"
        " window.__stop = window.realtime.onMessage((m) => types.includes(m.type) && got.push(m)); }"
    )


def subscribed(channel: str) -> str:
    """A script: whether a recorded SUBSCRIBED names ``channel``."""
    return f"window.__got.some((m) => m.type === 'SUBSCRIBED' && m.data.channels.includes('{channel}'))"


RESUMED = "window.__got.filter((m) => m.type === 'CONNECTED' && m.data.recovered)"  # a script: recorded resumes


def resume(page, sockets) -> tuple[int, dict]:
    """End the page's socket with 1012 and wait for its recovered CONNECTED (recorded): how many messages
    the page had sent before, and that CONNECTED's data."""
    before = len(sockets.sent)
    sockets.close(Close.SERVICE_RESTART)
    assert wait_for(lambda: page.evaluate(RESUMED), timeout=15)
    return before, page.evaluate(RESUMED)[0]["data"]


def test_the_socket_a_page_comes_back_from_is_closed_by_the_server_4409_not_left_open(live, site):
    """The page's side ended, the server's still open (a network that died unnoticed): until a keep-alive
    ping went unanswered, up to a minute, it counted among the user's sockets, written to for nobody."""
    page, sockets, errors = live
    record(page, "CONNECTED")
    assert wait_for(lambda: site.health()["clients"] == 1)
    old = page.evaluate("window.realtime.position.clientId")
    _, hello = resume(page, sockets)
    assert hello["recovered"] is True
    closed = site.wait_for_event("ws.disconnect", lambda e: e["clientId"] == old, timeout=10)
    assert (closed["code"], closed["reason"]) == (Close.REPLACED, "resumed on another socket")
    assert site.health()["clients"] == 1
    assert page.evaluate("window.realtime.status") == "open" and errors == []


def test_fifty_subscribers_added_at_once_send_one_subscribe(live):
    """An htmx swap that brings fifty fragments of one channel, each asking for its last value: fifty
    SUBSCRIBEs would be over the server's burst of 40 messages, and it closes such a socket with 1008."""
    page, sockets, errors = live
    record(page, "SUBSCRIBED")
    before = len(sockets.sent)
    page.evaluate(f"() => {{ for (let i = 0; i < 50; i++) window.realtime.subscribe(['{QUEUE}'], {{ last: true }}); }}")
    page.evaluate("window.realtime.subscribe(['system:maintenance'])")  # a later task: answered after those
    answered = "window.__got.some((m) => m.data.channels.includes('system:maintenance'))"
    assert wait_for(lambda: page.evaluate(answered) or retries(page), timeout=10)
    assert retries(page) == [] and page.evaluate("window.realtime.status") == "open"
    subscribes = [m for m in sockets.sent[before:] if "SUBSCRIBE" in m]
    assert len(subscribes) == 2 and '"last":true' in subscribes[0], subscribes
    assert errors == []


def test_a_task_that_drops_a_channel_and_takes_it_again_keeps_it_and_one_that_takes_and_drops_does_not(live):
    """What leaves at the end of a task is what is still true then: an htmx swap that removes a channel's
    last fragment and brings a new one must not end with an UNSUBSCRIBE after the SUBSCRIBE."""
    page, sockets, errors = live
    channel = "system:maintenance"
    record(page, "SUBSCRIBED", "UNSUBSCRIBED")
    answered = subscribed(channel)
    page.evaluate(f"window.realtime.subscribe(['{channel}'])")
    assert wait_for(lambda: page.evaluate(answered), timeout=10)
    page.evaluate("window.__got.length = 0")
    before = len(sockets.sent)
    page.evaluate(f"() => {{ window.realtime.unsubscribe(['{channel}']); window.realtime.subscribe(['{channel}']); }}")
    assert wait_for(lambda: page.evaluate(answered), timeout=10)  # the answer: what it sent has passed the proxy
    assert [m for m in sockets.sent[before:] if "SUBSCRIBE" in m] == [
        f'{{"type":"SUBSCRIBE","data":{{"channels":["{channel}"]}}}}'
    ]
    before = len(sockets.sent)
    page.evaluate(
        "() => { window.realtime.subscribe(['system:announcements', 'user:bob:notifications']);"
        " window.realtime.unsubscribe(['user:bob:notifications', 'system:announcements']); }"
    )
    unsubscribed = "window.__got.filter((m) => m.type === 'UNSUBSCRIBED')"
    assert wait_for(lambda: page.evaluate(unsubscribed), timeout=10)
    assert [m for m in sockets.sent[before:] if "SUBSCRIBE" in m] == [
        '{"type":"UNSUBSCRIBE","data":{"channels":["user:bob:notifications"]}}'
    ]
    assert page.evaluate(unsubscribed)[0]["data"]["channels"] == []  # never held: the server removed nothing
    assert page.evaluate("window.realtime.channels").count("system:announcements") == 1  # site.js's own


def test_fifty_subscribers_removed_at_once_send_one_unsubscribe(live):
    """An htmx swap that removes fifty fragments, each the last of its channel: fifty UNSUBSCRIBEs would
    be over the server's burst of 40 messages."""
    page, sockets, errors = live
    names = [f"clinic:c-{i}:queue" for i in range(50)]  # bob may read none of them: refused, still wanted
    page.evaluate(f"window.realtime.subscribe({names!r})")
    assert wait_for(lambda: page.evaluate("window.realtime.refused.size") == 50, timeout=10)
    record(page, "UNSUBSCRIBED")
    before = len(sockets.sent)
    page.evaluate(f"() => {{ for (const name of {names!r}) window.realtime.unsubscribe([name]); }}")
    assert wait_for(lambda: page.evaluate("window.__got.length") == 1 or retries(page), timeout=10)
    assert retries(page) == [] and page.evaluate("window.realtime.status") == "open"
    assert len([m for m in sockets.sent[before:] if "UNSUBSCRIBE" in m]) == 1
    assert errors == []


def test_a_name_no_channel_can_have_is_refused_by_the_page_alone_and_the_rest_of_its_task_is_subscribed(live):
    """Sent, a name the server cannot read (an unpaired surrogate) makes it refuse the whole message: the
    channels of every fragment swapped in with it would be neither held nor refused, and never answered."""
    page, sockets, errors = live
    record(page, "SUBSCRIBED", "ERROR")
    before = len(sockets.sent)
    page.evaluate("window.realtime.subscribe(['system:maintenance', 'clinic:\\ud800:queue', 'x'.repeat(201), 42])")
    assert wait_for(lambda: page.evaluate(subscribed("system:maintenance")), timeout=10)
    assert page.evaluate("window.realtime.refused.size") == 3 and page.evaluate("window.realtime.unanswered.size") == 0
    assert [m for m in sockets.sent[before:] if "SUBSCRIBE" in m] == [
        '{"type":"SUBSCRIBE","data":{"channels":["system:maintenance"]}}'
    ]
    assert len(errors) == 3 and all("no channel can be named" in error for error in errors), errors
    assert [m for m in page.evaluate("window.__got") if m["type"] == "ERROR"] == []  # the server saw none of them
    record(page, "CONNECTED")
    resume(page, sockets)  # which asks again for what the session lacks: refused again, not said again
    assert page.evaluate("window.realtime.refused.size") == 3 and len(errors) == 3, errors


def test_more_channels_than_one_subscribe_may_name_are_asked_in_several(live):
    """Over 200 names the server refuses the whole SUBSCRIBE without naming any channel: the page would
    not know which were refused. Sent 200 at a time, each is answered by name."""
    page, sockets, errors = live
    record(page, "ERROR")
    names = [f"clinic:c-{i}:queue" for i in range(250)]  # bob may read none of them
    page.evaluate(f"window.realtime.subscribe({names!r})")
    assert wait_for(lambda: page.evaluate("window.realtime.refused.size") == 250, timeout=10)
    assert {m["data"]["code"] for m in page.evaluate("window.__got")} == {"forbidden_channel"}
    assert page.evaluate("window.realtime.unanswered.size") == 0
    record(page, "UNSUBSCRIBED", "ERROR")
    page.evaluate(f"window.realtime.unsubscribe({names!r})")
    assert wait_for(lambda: page.evaluate("window.__got.length") == 2, timeout=10)
    assert [m["type"] for m in page.evaluate("window.__got")] == ["UNSUBSCRIBED", "UNSUBSCRIBED"]


def test_a_last_value_asked_while_a_plain_subscribe_was_unanswered_is_asked_again_after_a_drop(live):
    """A plain SUBSCRIBE's answer says nothing of a later `last` one of the same channel: when that one
    is lost with its socket and the session comes back holding the channel, the value is asked again."""
    page, sockets, errors = live
    channel = "system:maintenance"
    record(page, "SUBSCRIBED", "CONNECTED")
    sockets.hold = lambda m: '"SUBSCRIBE"' in m and channel in m and '"last"' not in m
    page.evaluate(f"window.realtime.subscribe(['{channel}'])")
    assert proxied(page, lambda: len(sockets.held) == 1)
    sockets.drop = lambda m: '"last":true' in m and channel in m
    page.evaluate(f"window.realtime.subscribe(['{channel}'], {{ last: true }})")
    assert proxied(page, lambda: any('"last":true' in m and channel in m for m in sockets.sent))
    sockets.hold = sockets.drop = lambda m: False
    sockets.release()  # the plain one reaches the server, which answers it
    assert wait_for(lambda: page.evaluate(subscribed(channel)), timeout=10)
    before, hello = resume(page, sockets)
    assert channel in hello["channels"]  # held all along: not resubscribed as lacking
    assert proxied(page, lambda: any('"last":true' in m and channel in m for m in sockets.sent[before:]))


def test_a_channel_the_resumed_session_may_no_longer_read_is_not_refetched(live, site):
    """Moved to another clinic while away: the session comes back without the old clinic's queue, which
    CONNECTED names as refused. Nothing of it is to be refetched (the ERRORs saying so come after CONNECTED,
    too late for the client's decision); the page is told, once, that the channel is no longer the user's."""
    from support import flask_cli

    page, sockets, errors = live
    page.evaluate(
        "() => { window.__resyncs = [];"
        " window.realtime.onResync((d) => window.__resyncs.push([d.reason, d.channels || []])); }"
    )
    record(page, "SUBSCRIBED", "CONNECTED")
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'])")
    assert wait_for(lambda: page.evaluate(subscribed(QUEUE)), timeout=10)
    # Offline: the page closes its socket, and the server's side goes too (a socket still open there when
    # bob moves would lose the queue from its session at once, and the resume would find nothing to refuse).
    page.context.set_offline(True)  # (Playwright forwards the close only while the test calls it: hence the wait)
    assert wait_for(lambda: page.wait_for_timeout(50) or site.health()["clients"] == 0, timeout=10)
    moved = flask_cli(site, "users", "set-clinic", "bob", "clinic-2")
    assert moved.returncode == 0, moved.stderr
    page.context.set_offline(False)
    assert wait_for(lambda: page.evaluate(RESUMED), timeout=15)
    assert page.evaluate(RESUMED)[0]["data"].get("refused") == [QUEUE], page.evaluate("window.__got")
    assert wait_for(lambda: page.evaluate(f"window.realtime.refused.has('{QUEUE}')"), timeout=10)
    page.evaluate("window.realtime.subscribe(['system:maintenance'])")  # answered after all of the resume's
    assert wait_for(lambda: page.evaluate(subscribed("system:maintenance")), timeout=10)
    assert page.evaluate("window.__resyncs") == [["revoked", [QUEUE]]]


def test_a_channel_dropped_and_taken_again_in_one_task_still_waits_for_the_answer_to_its_new_subscribe(live):
    """The answer to the SUBSCRIBE sent before the drop says nothing of the one sent after it (found by
    review: unsubscribe forgot the count, and the old answer then stood for the new one)."""
    page, sockets, errors = live
    channel = "system:maintenance"
    record(page, "SUBSCRIBED", "CONNECTED")
    sockets.hold = lambda m: '"SUBSCRIBE"' in m and channel in m
    page.evaluate(f"window.realtime.subscribe(['{channel}'], {{ last: true }})")
    assert proxied(page, lambda: len(sockets.held) == 1)
    sockets.hold = lambda m: False
    sockets.drop = lambda m: '"SUBSCRIBE"' in m and channel in m  # the second is lost with the socket
    page.evaluate(
        f"() => {{ window.realtime.unsubscribe(['{channel}']);"
        f" window.realtime.subscribe(['{channel}'], {{ last: true }}); }}"
    )
    assert proxied(page, lambda: len([m for m in sockets.sent if channel in m]) == 2)
    sockets.drop = lambda m: False
    sockets.release()  # the first is answered
    assert wait_for(lambda: page.evaluate(subscribed(channel)), timeout=10)
    before, hello = resume(page, sockets)
    assert channel in hello["channels"]
    asked = lambda: any('"last":true' in m and channel in m for m in sockets.sent[before:])  # noqa: E731
    assert proxied(page, asked)


def test_a_subscribe_made_when_the_socket_opens_is_sent_once(live):
    """A status listener that subscribes on "open" runs just before CONNECTED is handled: its channel
    goes out with the resume's own SUBSCRIBE, not once more on its own (found by review)."""
    page, sockets, errors = live
    channel = "system:maintenance"
    record(page, "SUBSCRIBED", "CONNECTED")
    page.evaluate(
        "() => { window.realtime.onStatus((s) => s === 'open' && window.__late"
        f" && window.realtime.subscribe([window.__late])); window.__late = '{channel}'; }}"
    )
    before, _ = resume(page, sockets)
    assert wait_for(lambda: page.evaluate(subscribed(channel)), timeout=10)
    page.evaluate("window.realtime.send({type: 'PING'})")  # after anything the resume sent
    assert proxied(page, lambda: any('"PING"' in m for m in sockets.sent[before:]))
    assert len([m for m in sockets.sent[before:] if '"SUBSCRIBE"' in m and channel in m]) == 1
