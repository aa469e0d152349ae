"""The site in a real browser: toasts, the queue page, the admin pages, and reconnection.

Each test drives Debian's headless Chromium against a real gunicorn gevent
server. On failure, screenshots of every open page land in test-artifacts/.
"""

import os
import re
import signal
import time

import pytest
import requests
from playwright.sync_api import expect
from support import PASSWORD, Server, sign_in, sign_in_elsewhere, sign_out_elsewhere, wait_for

from relay.channels import channels


def wait_live(page) -> None:
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "open")


def answered(page) -> None:
    """Wait until every SUBSCRIBE the page sent is answered and nothing is held: a broadcast sent then
    reaches it once, live (one sent before may come twice: live, and replayed from the render)."""
    done = "window.realtime.status === 'open' && !window.realtime.holding && !window.realtime.unanswered.size"
    assert wait_for(lambda: page.evaluate(done), timeout=15)


def broadcast_until_delivered(srv: Server, body: dict, at_least: int = 1, timeout: float = 10) -> dict:
    """Send until someone got it: a page subscribes right after it connects, so retry briefly."""
    deadline = time.monotonic() + timeout
    while True:
        result = srv.broadcast(body).json()
        if result["delivered"] >= at_least or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.fixture
def site(start_server):
    return start_server()


def test_an_admin_announcement_pops_up_as_a_toast_for_staff(site, web):
    staff = web(site, "bob@example.test")
    wait_live(staff)
    admin = web(site, "alice@example.test", "/admin/broadcast")
    wait_live(admin)
    admin.select_option("select[name=channel]", "system:announcements")
    admin.fill("textarea[name=message]", "Flu clinic opens at 9:00 ✓")
    admin.click("#broadcast-panel button[type=submit]")
    expect(admin.locator("#broadcast-result")).to_have_text("Delivered to 2 clients.")
    toast = staff.locator("#toasts .toast")
    expect(toast).to_have_count(1)
    expect(toast.locator(".toast-text")).to_have_text("Flu clinic opens at 9:00 ✓")
    expect(staff.locator("#toasts")).to_have_attribute("aria-live", "polite")
    # the form was swapped in place (htmx), cleared, and the sent broadcast is listed below it
    expect(admin.locator("textarea[name=message]")).to_have_value("")
    expect(admin.locator("#recent-broadcasts tbody tr").first).to_contain_text("Flu clinic opens at 9:00 ✓")
    # dismissable
    staff.click("#toasts .toast-close")
    expect(toast).to_have_count(0)


SET_VISIBILITY = """state => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
    document.dispatchEvent(new Event("visibilitychange"));
}"""


def test_a_toast_that_comes_while_the_tab_is_hidden_waits_until_it_has_been_seen(site, web):
    """Toasts hid after 10 s whoever looked: an announcement that came while the tab was in the
    background was gone before its person came back to it. Its 10 s count only while the tab is shown."""
    page = web(site, "bob", "about:blank")
    page.clock.install()  # time flows as usual; fast_forward jumps it, running the timers on the way
    page.goto(site.url + "/")
    wait_live(page)
    shown = page.locator("#toasts .toast-text", has_text="seen in time")
    broadcast_until_delivered(site, {"message": {"type": "ANNOUNCEMENT", "data": {"message": "seen in time"}}})
    expect(shown).to_have_count(1)
    page.clock.fast_forward(11_000)
    expect(shown).to_have_count(0)  # a shown tab's toast hides after 10 s, as before

    page.evaluate(SET_VISIBILITY, "hidden")
    hidden = page.locator("#toasts .toast-text", has_text="while in the background")
    broadcast_until_delivered(
        site, {"message": {"type": "ANNOUNCEMENT", "data": {"message": "while in the background"}}}
    )
    expect(hidden).to_have_count(1)
    page.clock.fast_forward(60_000)
    expect(hidden).to_have_count(1)  # nobody has seen it yet
    page.evaluate(SET_VISIBILITY, "visible")
    page.clock.fast_forward(8_000)
    expect(hidden).to_have_count(1)  # shown for 8 s only
    page.clock.fast_forward(3_000)
    expect(hidden).to_have_count(0)

    read = page.locator("#toasts .toast-text", has_text="being read")
    broadcast_until_delivered(site, {"message": {"type": "ANNOUNCEMENT", "data": {"message": "being read"}}})
    read.hover()  # the pointer on it: it stays, even when the tab is shown again meanwhile
    page.evaluate(SET_VISIBILITY, "hidden")
    page.evaluate(SET_VISIBILITY, "visible")
    page.clock.fast_forward(30_000)
    expect(read).to_have_count(1)
    page.mouse.move(0, 0)
    page.clock.fast_forward(11_000)
    expect(read).to_have_count(0)


def test_many_toasts_fold_into_one_earlier_toast_that_can_be_reached_and_read(site, web):
    """Kept until seen, toasts piled up (a tab in the background through a shift: a hundred or more, a
    screenful to close one by one, DOM nodes without bound). Past six, the oldest fold into one "earlier"
    toast at the top, which lists the latest 50 of them in the order they came; it can be reached (the
    stack scrolls) and dismissed."""
    page = web(site, "bob")
    page.set_viewport_size({"width": 800, "height": 400})
    page.evaluate(SET_VISIBILITY, "hidden")  # nobody looking: none hides itself
    page.evaluate(
        "async () => { const { toast } = await import('/static/js/site.js');"
        " for (let n = 1; n <= 12; n++) toast('Announcement', `number ${n}`); }"
    )
    toasts = page.locator("#toasts > .toast")
    expect(toasts).to_have_count(7)
    earlier = toasts.first
    expect(earlier).to_have_class(re.compile(r"\btoast-earlier\b"))
    expect(earlier.locator("strong")).to_have_text("6 earlier notices")
    expect(toasts.nth(1).locator(".toast-text")).to_have_text("number 7")
    expect(toasts.last.locator(".toast-text")).to_have_text("number 12")
    earlier.locator("summary").click(timeout=3_000)  # reachable at the top of a stack taller than the window
    expect(earlier.locator("li")).to_have_text([f"number {n}" for n in range(1, 7)])
    expect(earlier.locator(".toast-unlisted")).to_be_hidden()
    toasts.nth(1).hover()  # "number 7", being read: the next oldest folds in its place
    page.evaluate("async () => (await import('/static/js/site.js')).toast('Announcement', 'number 13')")
    expect(toasts.nth(1).locator(".toast-text")).to_have_text("number 7")
    expect(earlier.locator("li").last).to_have_text("number 8")
    page.mouse.move(0, 0)
    page.evaluate("async () => (await import('/static/js/site.js')).toast('Announcement', 'number 14')")
    expect(earlier.locator("li")).to_have_text([f"number {n}" for n in range(1, 9)])  # in the order they came

    page.evaluate(
        "async () => { const { toast } = await import('/static/js/site.js');"
        " for (let n = 15; n <= 40; n++) toast('Announcement', `number ${n}`);"
        " toast('Not done', 'That did not go through').classList.add('toast-error');"
        " for (let n = 41; n <= 70; n++) toast('Announcement', `number ${n}`); }"
    )
    expect(toasts).to_have_count(7)  # still: the DOM does not grow with them
    expect(earlier.locator("strong")).to_have_text("65 earlier notices")
    expect(earlier.locator("li")).to_have_count(50)
    expect(earlier.locator("li").first).to_have_text("number 16")
    failed = earlier.locator("li", has_text="That did not go through")
    expect(failed).to_have_text("Not done: That did not go through")
    expect(failed).to_have_class("toast-error")
    expect(earlier.locator(".toast-unlisted")).to_have_text("and 15 older, not listed")
    earlier.locator(".toast-close").click(timeout=3_000)
    expect(toasts).to_have_count(6)
    expect(toasts.first.locator(".toast-text")).to_have_text("number 65")


def test_html_in_an_announcement_is_shown_as_text_and_runs_nothing(site, web):
    evil = '<img src=x onerror="window.__owned = 1"><b>bold?</b>'
    staff = web(site, "bob")
    wait_live(staff)
    admin = web(site, "alice", "/admin/broadcast")
    wait_live(admin)
    admin.fill("textarea[name=message]", evil)
    admin.click("#broadcast-panel button[type=submit]")
    expect(admin.locator("#broadcast-result")).to_contain_text("Delivered to")
    expect(staff.locator("#toasts .toast-text")).to_have_text(evil)
    assert staff.locator("#toasts img, #toasts b").count() == 0
    expect(admin.locator("#recent-broadcasts .message-cell").first).to_have_text(evil)
    assert admin.locator("#recent-broadcasts img").count() == 0
    time.sleep(0.3)
    assert staff.evaluate("window.__owned") is None and admin.evaluate("window.__owned") is None
    # and it went out exactly as typed, not pre-escaped
    with site.connect("carol", ["system:announcements"]) as carol:
        admin.fill("textarea[name=message]", evil)
        admin.click("#broadcast-panel button[type=submit]")
        assert carol.expect("ANNOUNCEMENT")["data"]["message"] == evil


def test_the_queue_page_updates_for_its_own_clinic_only(site, web):
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    expect(page.locator("#queue [data-queue-state=waiting]")).to_be_visible()
    page.evaluate("window.__same_page = true")

    queue = [{"number": 41, "name": "Somchai"}, {"number": 42, "name": "<Malee>", "room": "B"}]
    body = {
        "message": {"type": "QUEUE_UPDATE", "data": {"queue": queue, "at": "2025-11-03T09:15:00Z"}},
        "filter": {"channels": ["clinic:clinic-1:queue"]},
    }
    assert broadcast_until_delivered(site, body)["delivered"] == 1
    items = page.locator("#queue ol.queue li")
    expect(items).to_have_count(2)
    expect(items.nth(0)).to_contain_text("41")
    expect(items.nth(0)).to_contain_text("Somchai")
    expect(items.nth(1)).to_contain_text("<Malee>")
    expect(items.nth(1)).to_contain_text("room: B")
    expect(page.locator("#queue [data-updated]")).to_have_attribute("datetime", "2025-11-03T09:15:00Z")
    expect(page.locator("#queue [data-updated]")).to_have_text("2025-11-03 09:15:00 UTC")

    other = {
        "message": {"type": "QUEUE_UPDATE", "data": {"queue": [{"number": 7, "name": "Other clinic"}]}},
        "filter": {"channels": ["clinic:clinic-2:queue"]},
    }
    assert site.broadcast(other).json()["delivered"] == 0
    time.sleep(0.5)
    expect(items).to_have_count(2)
    expect(page.locator("#queue")).not_to_contain_text("Other clinic")

    odd = {
        "message": {"type": "QUEUE_UPDATE", "data": {"paused": True, "reason": "lunch"}},
        "filter": {"channels": ["clinic:clinic-1:queue"]},
    }
    site.broadcast(odd)
    expect(page.locator("#queue pre.raw")).to_contain_text('"reason": "lunch"')
    assert page.evaluate("window.__same_page") is True  # live updates, never a reload


def test_clinic_alerts_appear_on_the_queue_page(site, web):
    page = web(site, "erin", "/clinics/clinic-1/queue")
    answered(page)
    expect(page.locator("#alerts")).to_contain_text("No recent alerts.")
    body = {
        "message": {"type": "CLINIC_ALERT", "data": {"message": "Fridge B is warm", "level": "urgent"}},
        "filter": {"channels": ["clinic:clinic-1:alerts"]},
    }
    assert site.broadcast(body).json()["delivered"] == 1
    expect(page.locator("#alerts .alert-text")).to_have_text("Fridge B is warm")
    expect(page.locator("#alerts strong")).to_have_text("Urgent:")
    expect(page.locator("#alerts .rt-empty")).to_be_hidden()  # its placeholder is not true any more


def test_the_queue_page_opens_with_the_latest_alert_sent_before_it_once_then_adds_new_ones_above(site, web):
    """It said "No alerts yet." however recent the last alert was: the desk saw nothing until the next."""
    body = {
        "message": {"type": "CLINIC_ALERT", "data": {"message": "Room 3 needs a nurse"}},
        "filter": {"channels": ["clinic:clinic-1:alerts"]},
    }
    assert site.broadcast(body).status_code == 200
    plain = web(site, "erin", "/clinics/clinic-1/queue", javascript=False)  # rendered by the server
    expect(plain.locator("#alerts .alert-text")).to_have_text(["Room 3 needs a nurse"])
    expect(plain.locator("#alerts time")).to_contain_text("sent ")
    page = web(site, "erin", "/clinics/clinic-1/queue")
    answered(page)  # its first SUBSCRIBEs asked since the render: the alert, from before it, is not replayed
    expect(page.locator("#alerts .alert-text")).to_have_text(["Room 3 needs a nurse"])
    later = {"message": {"type": "CLINIC_ALERT", "data": {"message": "Room 5 is free"}}, "filter": body["filter"]}
    assert site.broadcast(later).json()["delivered"] == 1
    expect(page.locator("#alerts .alert-text")).to_have_text(["Room 5 is free", "Room 3 needs a nurse"])


def test_every_alert_of_a_burst_is_listed_newest_first_and_the_list_keeps_twenty(site, web):
    """The panel showed only the latest alert, and of a burst htmx rendered only the first and the
    last (it queues one request behind the one out): alerts a second apart were never on screen. Each
    is listed now, in order, newest first, the oldest dropped past twenty."""
    page = web(site, "erin", "/clinics/clinic-1/queue")
    answered(page)
    first = {
        "message": {"type": "CLINIC_ALERT", "data": {"message": "Alert 1"}},
        "filter": {"channels": ["clinic:clinic-1:alerts"]},
    }
    assert site.broadcast(first).json()["delivered"] == 1
    expect(page.locator("#alerts .alert-text")).to_have_text(["Alert 1"])
    for number in range(2, 26):  # back to back: each lands while the page is still rendering the one before
        body = {
            "message": {"type": "CLINIC_ALERT", "data": {"message": f"Alert {number}"}},
            "filter": {"channels": ["clinic:clinic-1:alerts"]},
        }
        assert site.broadcast(body).json()["delivered"] == 1
    expect(page.locator("#alerts .alert-text")).to_have_text([f"Alert {n}" for n in range(25, 5, -1)], timeout=15_000)
    assert page.locator("#alerts > *").count() == 20  # the placeholder went first, then the oldest alerts


def test_a_removed_channel_subscriber_unsubscribes(site, web):
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    deadline = time.monotonic() + 10
    while site.health()["subscriptions"] != 3 and time.monotonic() < deadline:  # announcements, alerts, queue
        time.sleep(0.1)
    assert site.health()["subscriptions"] == 3
    page.evaluate("document.getElementById('queue').remove()")
    while site.health()["subscriptions"] != 2 and time.monotonic() < deadline + 10:
        time.sleep(0.1)
    assert site.health()["subscriptions"] == 2
    assert sorted(page.evaluate("window.realtime.channels")) == ["clinic:clinic-1:alerts", "system:announcements"]


def test_status_shows_reconnecting_during_a_restart_and_recovers_without_a_reload(site, web, tmp_path):
    page = web(site, "bob")
    wait_live(page)
    page.evaluate("window.__same_page = true")
    site.stop()
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "reconnecting")
    expect(page.locator("#rt-status")).to_have_attribute("aria-label", "Live updates: Reconnecting…")

    again = Server(site.workdir, site.env_overrides, port=site.port).start()
    try:
        expect(page.locator("#rt-status")).to_have_attribute("data-status", "open", timeout=30_000)
        body = {
            "message": {"type": "ANNOUNCEMENT", "data": {"message": "back again"}},
            "filter": {"channels": ["system:announcements"]},
        }
        assert broadcast_until_delivered(again, body)["delivered"] == 1
        expect(page.locator("#toasts .toast-text")).to_have_text("back again")
        assert page.evaluate("window.__same_page") is True
    finally:
        again.stop()


def test_offline_is_shown_and_coming_back_online_reconnects_at_once(site, web):
    page = web(site, "bob")
    wait_live(page)
    before = page.evaluate("window.realtime.stats.sockets")
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    expect(page.locator("#rt-status")).to_have_attribute("aria-label", "Live updates: Offline")
    started = time.monotonic()
    page.context.set_offline(False)
    wait_live(page)
    assert time.monotonic() - started < 3  # at once, not after a backoff
    assert page.evaluate("window.realtime.stats.sockets") == before + 1
    body = {
        "message": {"type": "ANNOUNCEMENT", "data": {"message": "welcome back"}},
        "filter": {"channels": ["system:announcements"]},
    }
    assert broadcast_until_delivered(site, body)["delivered"] == 1
    expect(page.locator("#toasts .toast-text")).to_have_text("welcome back")


def test_a_silent_dead_connection_is_noticed_by_ping_and_replaced(start_server, web):
    srv = start_server(WS_CLIENT_IDLE_MS=500, WS_CLIENT_PONG_TIMEOUT_MS=700)
    page = web(srv, "bob")
    wait_live(page)
    worker = srv.health()["pid"]
    os.kill(worker, signal.SIGSTOP)  # TCP stays up, but nothing answers: a dead network path
    try:
        expect(page.locator("#rt-status")).to_have_attribute("data-status", "reconnecting", timeout=10_000)
    finally:
        os.kill(worker, signal.SIGCONT)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "open", timeout=30_000)
    assert page.evaluate("window.realtime.stats.sockets") >= 2


def test_channel_builders_are_the_same_in_the_browser_and_in_python(site, web):
    page = web(site, "bob")
    names = page.evaluate("""async () => {
        const { channels } = await import('/static/js/realtime.js');
        return [channels.system.announcements, channels.system.maintenance, channels.clinic.queue('c-1'),
                channels.clinic.alerts('c-1'), channels.user.notifications('u.1@x')];
    }""")
    assert names == [
        channels.system.announcements,
        channels.system.maintenance,
        channels.clinic.queue("c-1"),
        channels.clinic.alerts("c-1"),
        channels.user.notifications("u.1@x"),
    ]


def test_staff_get_a_403_page_on_admin_pages(site, web):
    page = web(site, "bob")
    for path in ("/admin", "/admin/broadcast"):
        response = page.goto(site.url + path)
        assert response.status == 403
        expect(page.locator("h1")).to_have_text("Forbidden")
        expect(page.locator(".error-page")).to_contain_text("not allowed")
    response = page.goto(site.url + "/clinics/clinic-2/queue")
    assert response.status == 403
    response = page.goto(site.url + "/no/such/page")
    assert response.status == 404
    expect(page.locator(".error-page .status")).to_have_text("404")


def test_admin_dashboard_shows_live_figures_and_a_maintenance_banner(site, web):
    admin = web(site, "alice", "/admin")
    wait_live(admin)
    with site.connect("carol"), site.connect("erin"):
        expect(admin.locator("[data-figure=clients]")).to_have_text("3", timeout=10_000)
        expect(admin.locator("table").nth(1)).to_contain_text("clinic-2")
    expect(admin.locator("#maintenance-banner .banner")).to_have_count(0)
    body = {
        "message": {
            "type": "MAINTENANCE",
            "data": {"message": "Down at 22:00 <for 10 min>", "at": "2025-11-03T21:00:00Z"},
        },
        "filter": {"channels": ["system:maintenance"]},
    }
    assert broadcast_until_delivered(site, body)["delivered"] == 1
    expect(admin.locator("#maintenance-banner .banner-text")).to_have_text("Down at 22:00 <for 10 min>")


def test_the_broadcast_form_works_without_javascript(site, web):
    page = web(site, "alice", "/admin/broadcast", javascript=False)
    with site.connect("carol", ["system:maintenance"]) as carol:
        page.select_option("select[name=channel]", "system:maintenance")
        page.fill("textarea[name=message]", "Planned downtime")
        page.click("#broadcast-panel button[type=submit]")
        expect(page.locator("#broadcast-result")).to_have_text("Delivered to 1 client.")
        message = carol.expect("MAINTENANCE")
        assert message["data"]["message"] == "Planned downtime" and message["data"]["at"]
    page.fill("textarea[name=message]", "   ")
    page.click("#broadcast-panel button[type=submit]")
    expect(page.locator("#broadcast-result .error")).to_have_text("Write a message.")


def test_home_page_says_who_you_are_and_links_by_role(site, web):
    staff = web(site, "bob")
    expect(staff.locator("h1")).to_contain_text("bob")
    expect(staff.locator("a[href='/clinics/clinic-1/queue']").first).to_be_visible()
    assert staff.locator("a[href='/admin']").count() == 0
    admin = web(site, "alice")
    expect(admin.locator("main a[href='/admin']")).to_be_visible()
    expect(admin.locator("main a[href='/admin/broadcast']")).to_be_visible()


def test_the_dashboard_charts_the_last_hour_and_they_move_when_broadcasts_are_sent(site, web):
    page = web(site, "alice@example.test", "/admin")
    for name in ("connections", "broadcasts", "errors"):
        expect(page.locator(f"#chart-{name} canvas")).to_have_count(1)  # uPlot drew it
    page.wait_for_function("() => window.dashboard && window.dashboard.updates >= 1")
    sent_before = page.evaluate("() => window.dashboard.data.reduce((n, m) => n + m.broadcasts, 0)")
    updates = page.evaluate("() => window.dashboard.updates")
    for n in range(3):
        site.announce(f"chart me {n}")
    page.wait_for_function(
        "([seen, want]) => window.dashboard.updates > seen && "
        "window.dashboard.data.reduce((n, m) => n + m.broadcasts, 0) === want",
        arg=[updates, sent_before + 3],
        timeout=15_000,
    )
    # the chart's own data moved, not only the page's copy of it
    plotted = page.evaluate("() => window.dashboard.charts.broadcasts.data[1].reduce((a, b) => a + b, 0)")
    assert plotted == sent_before + 3
    assert page.evaluate("() => window.dashboard.errors") == 0


def test_the_dashboards_chart_poll_waits_for_its_last_request_and_gives_up_on_one_that_hangs(site, web):
    """A poll every 3 s whatever the last one did piled requests up on a slow link, taking the browser's six
    connections to the site (which the socket's token request needs too) (found by review)."""
    page = web(site, "alice@example.test", "about:blank")
    asked: list[str] = []
    page.route("**/admin/last-hour*", lambda route: asked.append(route.request.url))  # never answered
    page.clock.install()  # time flows as usual; fast_forward jumps it, running the timers on the way
    page.goto(site.url + "/admin")
    wait_for(lambda: page.wait_for_timeout(20) or asked, timeout=10)
    page.clock.fast_forward(8_000)  # two more polls' worth: the first still waits
    page.wait_for_timeout(200)
    assert len(asked) == 1
    page.clock.fast_forward(5_000)  # given up at 9 s, and the next poll 3 s later
    assert wait_for(lambda: page.wait_for_timeout(20) or len(asked) == 2, timeout=10)
    assert page.evaluate("() => window.dashboard.errors") == 1


def test_the_dashboards_polled_figures_ask_nothing_while_the_tab_is_hidden(site, web):
    """Every 2 s whoever looked: an admin's tab left open all day asked ~20,000 times (found by review)."""
    page = web(site, "alice@example.test", "about:blank")
    asked: list[str] = []

    def count(route):
        asked.append(route.request.url)
        route.continue_()

    page.route("**/admin/stats*", count)
    page.clock.install()  # time flows as usual; fast_forward jumps it, running the timers on the way
    page.goto(site.url + "/admin")
    wait_for(lambda: page.wait_for_timeout(20) or asked, timeout=10)
    hide = "(state) => { Object.defineProperty(document, 'visibilityState', {get: () => state, configurable: true});"
    hide += " document.dispatchEvent(new Event('visibilitychange')); }"
    page.evaluate(hide, "hidden")
    page.wait_for_timeout(300)  # one asked just before stays answered
    before = len(asked)
    page.clock.fast_forward(10_000)  # five polls' worth
    page.wait_for_timeout(300)
    assert len(asked) == before
    page.evaluate(hide, "visible")
    page.clock.fast_forward(3_000)
    assert wait_for(lambda: page.wait_for_timeout(20) or len(asked) > before, timeout=10)  # and again once shown


def test_the_dashboard_shows_its_figures_without_javascript(site, web):
    site.announce("counted")
    page = web(site, "alice@example.test", "/admin", javascript=False)
    rates = page.locator("table.rates tbody tr")
    expect(rates).to_have_count(3)
    expect(page.locator("table.minutes tbody tr").first).to_contain_text("1")
    expect(page.locator("table.minutes")).to_contain_text("The last 15 minutes")


def test_a_guesser_who_knows_the_email_does_not_lock_out_the_browser_its_owner_signed_in_from(site, web):
    """Chromium keeps the device cookie through a sign-out and sends it back with the sign-in form
    (Path=/login, SameSite=Strict), so the account's block does not apply to it (relay.devices)."""
    own = web(site, "erin")
    own.click("form[action='/logout'] button[type=submit]")
    own.wait_for_url(site.url + "/login")
    guesser = requests.Session()
    for _ in range(5):
        assert sign_in(site, "erin@example.test", "guess", session=guesser).last.status_code == 401
    stranger = web(site, None, "/login")  # another browser, the right password: blocked
    stranger.fill("input[name=login]", "erin@example.test")
    stranger.fill("input[name=password]", PASSWORD)
    stranger.click("button[type=submit]")
    expect(stranger.locator("body")).to_contain_text("Too many failed sign-ins")
    own.goto(site.url + "/clinics/clinic-1/queue")  # sent to /login?next=..., as after a session ends
    own.fill("input[name=login]", "erin@example.test")
    own.fill("input[name=password]", PASSWORD)
    own.click("button[type=submit]")
    own.wait_for_url(site.url + "/clinics/clinic-1/queue")


def queue_body(*names: str) -> dict:
    entries = [{"number": n, "name": name} for n, name in enumerate(names, 1)]
    return {
        "message": {"type": "QUEUE_UPDATE", "data": {"queue": entries}},
        "filter": {"channels": ["clinic:clinic-1:queue"]},
    }


def test_a_queue_page_whose_sign_in_changed_in_another_tab_reloads_instead_of_freezing(site, web):
    """Signed in again in another tab, the page's CSRF token was stale: every update of its queue was
    refused 403 and not swapped in, under a "Live" status, with nothing said (ops review). It reloads,
    once a minute at most, and after that says so in the fragment."""
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    assert broadcast_until_delivered(site, queue_body("Somchai"))["delivered"] == 1
    expect(page.locator("#queue ol.queue li")).to_have_text(["1 Somchai"])
    page.evaluate("window.__before_reload = true")

    sign_in_elsewhere(page, site)
    site.broadcast(queue_body("Somchai", "Malee"))
    page.wait_for_function("window.__before_reload === undefined")  # reloaded, fresh token
    wait_live(page)
    expect(page.locator("#queue ol.queue li")).to_have_count(2)  # rendered from the last value
    sign_in_elsewhere(page, site)  # and again within the minute: no second reload, the fragment says what to do
    page.evaluate("window.__before_reload = true")
    assert broadcast_until_delivered(site, queue_body("Somchai", "Malee", "Niran"))["delivered"] == 1
    expect(page.locator("#queue [data-fragment-state=signed-out]")).to_contain_text("reload it")
    assert page.evaluate("window.__before_reload") is True


def test_a_queue_page_signed_out_in_another_tab_goes_to_the_sign_in_page_on_its_next_update(site, web):
    """A fragment's update without a session was redirected to the sign-in page, which htmx followed:
    the sign-in form was swapped into the queue card, and signing in there went to a POST-only address
    (405). The update is now a 401, and the page reloads to the sign-in page, then back to the queue."""
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    sign_out_elsewhere(page, site)
    broadcast_until_delivered(site, queue_body("Somchai"))  # the socket stays open after a plain sign-out
    page.wait_for_url("**/login?next=/clinics/clinic-1/queue")
    page.fill("input[name=login]", "bob")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(site.url + "/clinics/clinic-1/queue")
    expect(page.locator("#queue ol.queue li")).to_have_text(["1 Somchai"])


def test_a_form_that_fails_says_so_and_keeps_what_was_typed(start_server, redis_server, web):
    """Its 503 answer was never swapped in by htmx: the button came back and nothing was said (ops review)."""
    site = start_server(REDIS_URL=redis_server.url)
    admin = web(site, "alice", "/admin/broadcast")
    wait_live(admin)
    redis_server.stop()
    admin.fill("textarea[name=message]", "Lunch at noon")
    admin.click("#broadcast-panel button[type=submit]")
    expect(admin.locator("#toasts .toast-error")).to_contain_text("the server answered 503")
    expect(admin.locator("textarea[name=message]")).to_have_value("Lunch at noon")  # kept, to send again


class Refusals:
    """A route that answers the page's fragment renders with ``status`` while set (None: they pass), counting them."""

    def __init__(self, page, pattern: str):
        self.page, self.status, self.calls = page, None, 0
        page.route(pattern, self._answer)

    def _answer(self, route) -> None:
        self.calls += 1
        if self.status is None:
            route.continue_()
        else:
            route.fulfill(status=self.status, body="refused by the test")

    def wait_calls(self, count: int) -> None:
        """Until the page has asked ``count`` times (the route's handler runs only while Playwright is called)."""
        assert wait_for(lambda: self.page.wait_for_timeout(20) or self.calls >= count, timeout=10), self.calls
        assert self.calls == count, self.calls


RETRIES_MS = [2_000, 5_000, 15_000, 30_000]  # site.js's RETRY_MS: each retry comes within its value


def test_a_fragment_update_that_fails_is_asked_again_and_never_shown_over_a_newer_one(site, web):
    """A proxy's 502 (or the network) on a fragment's update left the old queue under a "Live" status;
    then it said so, until the next update (a deploy's restarting worker: a queue screen showed "reload"
    for what one more request would have fixed). It is asked again, four times over a minute; a newer
    update that lands first wins (the older state is never shown over it); after the fourth, it gives up."""
    page = web(site, "bob", "about:blank")
    page.clock.install()  # time flows as usual; fast_forward jumps it, running the timers on the way
    page.goto(site.url + "/clinics/clinic-1/queue")
    wait_live(page)
    entries = page.locator("#queue ol.queue li")
    note = page.locator("#queue [data-fragment-state]")
    assert broadcast_until_delivered(site, queue_body("Somchai"))["delivered"] == 1
    expect(entries).to_have_text(["1 Somchai"])
    renders = Refusals(page, "**/queue/render")
    renders.status = 502
    site.broadcast(queue_body("Somchai", "Malee"))
    expect(page.locator("#queue [data-fragment-state=retrying]")).to_contain_text("the server answered 502")
    expect(entries).to_have_text(["1 Somchai"])  # still shown, marked out of date
    renders.wait_calls(1)
    page.clock.fast_forward(RETRIES_MS[0])
    renders.wait_calls(2)  # refused again
    expect(page.locator("#queue [data-fragment-state=retrying]")).to_contain_text("Trying again")
    renders.status = None
    page.clock.fast_forward(RETRIES_MS[1])
    expect(entries).to_have_text(["1 Somchai", "2 Malee"])
    expect(note).to_have_count(0)
    renders.wait_calls(3)

    renders.status = 503
    site.broadcast(queue_body("A", "B", "C"))
    expect(note).to_contain_text("the server answered 503")
    renders.wait_calls(4)
    renders.status = None
    site.broadcast(queue_body("A", "B", "C", "D"))  # rendered before the retry comes
    expect(entries).to_have_count(4)
    expect(note).to_have_count(0)
    renders.wait_calls(5)
    page.clock.fast_forward(sum(RETRIES_MS))
    page.wait_for_timeout(500)
    assert renders.calls == 5  # not asked again: its place is gone
    expect(entries).to_have_count(4)

    renders.status = 503
    site.broadcast(queue_body("X"))
    renders.wait_calls(6)
    for n, wait_ms in enumerate(RETRIES_MS, 7):
        page.clock.fast_forward(wait_ms)
        renders.wait_calls(n)
    expect(page.locator("#queue [data-fragment-state=stale]")).to_contain_text("Reload the page to be sure")
    page.clock.fast_forward(sum(RETRIES_MS))
    page.wait_for_timeout(500)
    assert renders.calls == 10  # given up
    expect(entries).to_have_count(4)


def test_an_alert_that_cannot_be_shown_yet_is_shown_later_in_its_place_in_the_list(site, web):
    """In a list, the failure note goes where the alert would have been; the alerts before it stay, and
    those after it go above it. Asked again, the alert replaces its note there; given up, the note stays."""
    page = web(site, "bob", "about:blank")
    page.clock.install()
    page.goto(site.url + "/clinics/clinic-1/queue")
    answered(page)

    def alert(text: str) -> dict:
        body = {"message": {"type": "CLINIC_ALERT", "data": {"message": text}}}
        return site.broadcast({**body, "filter": {"channels": ["clinic:clinic-1:alerts"]}}).json()

    assert alert("first")["delivered"] == 1
    expect(page.locator("#alerts .alert-text")).to_have_text(["first"])
    renders = Refusals(page, "**/alerts/render")
    renders.status = 502
    alert("late")
    shown = page.locator("#alerts > :not(.rt-empty)")
    expect(shown).to_have_text([re.compile("the server answered 502"), re.compile("first")])
    renders.wait_calls(1)
    renders.status = None
    alert("third")
    expect(shown).to_have_text([re.compile("third"), re.compile("the server answered 502"), re.compile("first")])
    page.clock.fast_forward(RETRIES_MS[0])
    expect(page.locator("#alerts .alert-text")).to_have_text(["third", "late", "first"])  # in its place
    expect(page.locator("#alerts [data-fragment-state]")).to_have_count(0)

    renders.status = 503
    alert("lost")  # marked in its own place
    renders.wait_calls(4)
    for n, wait_ms in enumerate(RETRIES_MS, 5):
        page.clock.fast_forward(wait_ms)
        renders.wait_calls(n)
    failed = [re.compile("answered 503.*Reload the page"), re.compile("third"), re.compile("late"), re.compile("first")]
    expect(shown).to_have_text(failed)


def test_the_dashboards_figures_that_cannot_be_polled_say_so_in_place_not_in_toasts(site, web):
    """Every failed poll (each 2 s) would have stacked a toast (review of the toasts for failed forms)."""
    admin = web(site, "alice", "/admin")
    wait_live(admin)
    polls = []

    def refuse(route):
        polls.append(route.request.url)
        route.fulfill(status=503, body="restarting")

    admin.route("**/admin/stats*", refuse)
    expect(admin.locator("#stats [data-fragment-state=stale]")).to_contain_text("the server answered 503")
    failed = len(polls)
    deadline = time.monotonic() + 15
    while len(polls) < failed + 2 and time.monotonic() < deadline:  # two more failed polls
        admin.wait_for_timeout(200)
    assert len(polls) >= failed + 2, polls
    expect(admin.locator("#toasts .toast")).to_have_count(0)
    expect(admin.locator("#stats [data-fragment-state]")).to_have_count(1)
    admin.unroute("**/admin/stats*")
    expect(admin.locator("#stats [data-fragment-state]")).to_have_count(0)
