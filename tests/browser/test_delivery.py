"""The delivery guarantee in the browser: nothing missed across a Wi-Fi drop or a deploy, and the queue at once."""

from __future__ import annotations

import re
import signal
import time

import pytest
from playwright.sync_api import expect
from support import Server, wait_for

QUEUE = "clinic:clinic-1:queue"


def wait_live(page, timeout: int = 20_000) -> None:
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "open", timeout=timeout)


def queue_update(srv: Server, *names: str) -> dict:
    entries = [{"number": n, "name": name} for n, name in enumerate(names, 1)]
    response = srv.broadcast(
        {"message": {"type": "QUEUE_UPDATE", "data": {"queue": entries}}, "filter": {"channels": [QUEUE]}}
    )
    assert response.status_code == 200, response.text
    return response.json()


def announce(srv: Server, text: str) -> dict:
    body = {
        "message": {"type": "ANNOUNCEMENT", "data": {"message": text}},
        "filter": {"channels": ["system:announcements"]},
    }
    for _ in range(200):  # through a reload: 503 while the old worker drains, refused while the new one boots
        try:
            response = srv.broadcast(body, headers={"Idempotency-Key": "toast-" + text.replace(" ", "-")})
        except Exception:
            response = None
        if response is not None and response.status_code == 200:
            return response.json()
        time.sleep(0.05)
    raise AssertionError("the announcement was never accepted")


def restart_without_history(site: Server) -> Server:
    """Stop, lose the embedded history (stream, sessions, last values: a new epoch), start on the same port."""
    site.stop()
    for suffix in ("", "-wal", "-shm"):
        (site.workdir / "instance" / f"history.db{suffix}").unlink(missing_ok=True)
    return Server(site.workdir, site.env_overrides, port=site.port).start()


def settled(page) -> None:
    """Wait until what the page asked for so far is answered (the queue page's own SUBSCRIBE with last may
    still be on its way when the socket is open): a connection's messages are answered in order, so the
    SUBSCRIBED of one sent now comes after them. Then ``window.__seen`` starts empty."""
    page.evaluate(
        "() => { window.__barrier = false; window.realtime.onMessage((m) => { if (m.type === 'SUBSCRIBED'"
        " && (m.data.channels || []).includes('system:maintenance')) window.__barrier = true; });"
        " window.realtime.subscribe(['system:maintenance']); }"
    )
    assert wait_for(lambda: page.evaluate("window.__barrier"), timeout=10)
    page.evaluate("window.__seen = []")


@pytest.fixture
def site(start_server):
    return start_server(WS_CLOSE_TIMEOUT_MS=500)


def test_a_queue_page_shows_the_current_queue_at_once_when_opened_or_reloaded(site, web):
    queue_update(site, "Somchai", "Malee")  # nobody is looking yet
    page = web(site, "bob", "/clinics/clinic-1/queue")
    items = page.locator("#queue ol.queue li")
    expect(items).to_have_count(2)  # rendered by the server: there before the socket is open
    expect(items.nth(1)).to_contain_text("Malee")
    wait_live(page)
    queue_update(site, "Somchai", "Malee", "Niran")
    expect(items).to_have_count(3)
    page.reload()
    expect(items).to_have_count(3)
    expect(items.nth(2)).to_contain_text("Niran")
    without_js = web(site, "bob", "/clinics/clinic-1/queue", javascript=False)
    expect(without_js.locator("#queue ol.queue li")).to_have_count(3)


def test_announcements_missed_offline_and_through_a_deploy_appear_as_toasts(site, web):
    page = web(site, "bob")
    wait_live(page)
    page.evaluate("window.__same_page = true")
    page.context.set_offline(True)  # the clinic's Wi-Fi drops...
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    old = site.health()["pid"]
    site.proc.send_signal(signal.SIGHUP)  # ...while a deploy happens
    assert wait_for(lambda: site.health()["pid"] != old, timeout=30)
    missed = announce(site, "Flu vaccines have arrived")
    assert missed["delivered"] == 0  # nobody was connected: it can only arrive by replay
    page.context.set_offline(False)
    wait_live(page)
    toast = page.locator("#toasts .toast-text")
    expect(toast).to_have_text("Flu vaccines have arrived")
    assert page.evaluate("window.__same_page") is True  # no reload: the socket resumed


def test_many_missed_announcements_collapse_into_one_summary_toast(site, web):
    page = web(site, "bob")
    wait_live(page)
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    for n in range(5):
        announce(site, f"notice {n}")
    page.context.set_offline(False)
    summary = page.locator("#toasts .toast")
    expect(summary).to_have_count(1)
    expect(summary.locator("strong")).to_have_text("5 announcements")
    expect(summary.locator(".toast-text")).to_have_text("Latest: notice 4")


def test_when_nothing_can_be_replayed_the_page_resyncs_and_shows_the_current_queue(site, web):
    queue_update(site, "Before")
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    page.evaluate("window.__resyncs = 0; document.body.addEventListener('realtime:resync', () => window.__resyncs++)")
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    again = restart_without_history(site)
    try:
        queue_update(again, "After", "the", "loss")  # sent while the page was away
        page.context.set_offline(False)
        wait_live(page)
        expect(page.locator("#queue ol.queue li")).to_have_count(3)  # the page asked for the last value again
        assert page.evaluate("window.__resyncs") == 1
    finally:
        again.stop()


def test_after_a_resync_the_page_says_that_alerts_and_announcements_may_be_missing(site, web):
    """Fragments rendered from messages without a last value (the alerts) and the announcement
    toasts cannot be refetched: the page says what it cannot show, rather than let the silence say
    there was nothing (found by review). The alerts list keeps what it had, which is still true, and
    marks the gap where it is: later alerts go above the note."""
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    alert = {"type": "CLINIC_ALERT", "data": {"message": "Room 3 needs a nurse"}}
    assert site.broadcast({"message": alert, "filter": {"channels": ["clinic:clinic-1:alerts"]}}).status_code == 200
    expect(page.locator("#alerts")).to_contain_text("Room 3 needs a nurse")
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    again = restart_without_history(site)
    try:
        page.context.set_offline(False)
        wait_live(page)
        shown = page.locator("#alerts > :not(.rt-empty)")
        expect(shown).to_have_text([re.compile("may be missing here"), re.compile("Room 3 needs a nurse")])
        expect(page.locator("#alerts [data-resync-state=missing]")).to_have_count(1)
        expect(page.locator("#toasts .toast-resync .toast-text")).to_contain_text("Announcements sent while")
        later = {"type": "CLINIC_ALERT", "data": {"message": "Room 5 is free"}}
        assert (
            again.broadcast({"message": later, "filter": {"channels": ["clinic:clinic-1:alerts"]}}).status_code == 200
        )
        expect(shown).to_have_text(
            [re.compile("Room 5 is free"), re.compile("may be missing here"), re.compile("Room 3 needs a nurse")]
        )
    finally:
        again.stop()


def test_after_a_resync_with_no_last_value_the_queue_never_shows_stale_data(site, web):
    queue_update(site, "Before")
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    expect(page.locator("#queue ol.queue li")).to_have_count(1)
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    again = restart_without_history(site)
    try:
        page.context.set_offline(False)  # nothing was published since: there is no current queue to show
        wait_live(page)
        expect(page.locator("#queue [data-resync-state=waiting]")).to_have_text(
            "Reconnected: waiting for the current state…"
        )
        expect(page.locator("#queue ol.queue li")).to_have_count(0)  # "Before" is gone, not shown as current
        queue_update(again, "Now")
        expect(page.locator("#queue ol.queue li")).to_have_count(1)
        expect(page.locator("#queue ol.queue li")).to_contain_text("Now")
    finally:
        again.stop()


def test_queue_updates_made_during_a_wifi_drop_reach_the_page_in_order(site, web):
    queue_update(site, "First")
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    # Broadcasts only: the channel's last value ("First", asked for by the subscription) may still
    # be on its way when the listener is added (it was, once, on a loaded CI machine).
    page.evaluate(
        "() => { window.__seen = []; document.body.addEventListener('realtime:QUEUE_UPDATE',"
        " (e) => { if (!e.detail.last) window.__seen.push(e.detail.data.queue.length); }); }"
    )
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    missed = [queue_update(site, *names) for names in (["A"], ["A", "B"], ["A", "B", "C"])]
    assert all(m["delivered"] == 0 for m in missed)  # the page was away: only a replay brings them
    page.context.set_offline(False)
    wait_live(page)
    expect(page.locator("#queue ol.queue li")).to_have_count(3)
    expect(page.locator("#queue ol.queue li").nth(2)).to_contain_text("C")
    assert page.evaluate("() => window.__seen") == [1, 2, 3]  # every update, once, in order


def test_a_broadcast_named_like_a_protocol_frame_is_a_message_not_the_protocol(site, web):
    """Its type is the producer's: a broadcast 'CONNECTED' moved every client's position to its data's
    offset, and every later broadcast was dropped as already processed (found by review)."""
    page = web(site, "bob")
    wait_live(page)
    odd = {"epoch": "nope", "offset": 10**12, "clientId": "nobody"}
    body = {"message": {"type": "CONNECTED", "data": odd}, "filter": {"channels": ["system:announcements"]}}
    assert site.broadcast(body).status_code == 200
    announce(site, "Still heard")
    expect(page.locator("#toasts .toast-text")).to_have_text("Still heard")


def test_without_history_a_reconnect_still_tells_the_page_to_refetch(start_server, web):
    """Nothing can be replayed, so whatever was sent meanwhile is unknown: the page must be told."""
    srv = start_server(WS_RECOVERY_WINDOW_MS=0, WS_CLOSE_TIMEOUT_MS=500)
    page = web(srv, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    page.evaluate("window.__resyncs = 0; document.body.addEventListener('realtime:resync', () => window.__resyncs++)")
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    page.context.set_offline(False)
    wait_live(page)
    assert wait_for(lambda: page.evaluate("window.__resyncs") == 1, timeout=10)


def test_a_last_value_shown_ahead_of_the_position_is_not_shown_again_by_the_replay(site, web):
    """The page subscribes to a channel with last after a broadcast it never got live: that one is
    ahead of its position, and a resume after a drop replays it as an ordinary frame."""
    page = web(site, "bob")  # the home page: announcements only
    wait_live(page)
    sent = queue_update(site, "Somchai")  # the page holds no queue channel yet: its position stays before
    # Every frame that reaches the client carrying it (the raw socket, before the client decides), what
    # the page was shown, and the answer to the resume.
    page.evaluate(
        "(id) => { window.__seen = []; window.__raw = 0; const rt = window.realtime;"
        " const read = rt._onSocketMessage.bind(rt);"
        " rt._onSocketMessage = (ws, event) => {"
        "   if (String(event.data).includes(id)) window.__raw++;"
        "   read(ws, event); };"
        " rt.onMessage((m) => { if (m.type === 'QUEUE_UPDATE') window.__seen.push(m.id);"
        "   if (m.type === 'CONNECTED') window.__hello = m.data; });"
        f" rt.subscribe(['{QUEUE}'], {{ last: true }}); }}",
        sent["id"],
    )
    assert wait_for(lambda: page.evaluate("window.__seen") == [sent["id"]], timeout=10)  # as its last value
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    page.context.set_offline(False)
    wait_live(page)
    announce(site, "after the drop")  # the replay comes before this
    expect(page.locator("#toasts .toast-text").last).to_have_text("after the drop")
    assert page.evaluate("window.__hello.recovered") is True
    # The last value only: SUBSCRIBED moved the page's position past it, so the resume did not replay
    # it (before, the replay brought it again, and the client had to recognise it: shownAhead).
    assert page.evaluate("window.__raw") == 1
    assert page.evaluate("window.__seen") == [sent["id"]]  # shown once, not twice


def test_a_second_subscriber_of_a_channel_the_page_holds_gets_its_current_value_too(site, web):
    """Two fragments of one channel on a page: the one that comes second must not wait for the next
    update. A last value that is an announcement is state, not news: no toast for it."""
    current = queue_update(site, "Somchai")
    news = announce(site, "already seen")
    page = web(site, "bob", "/clinics/clinic-1/queue")  # holds the queue (with last) and the announcements
    wait_live(page)
    page.evaluate(
        "() => { window.__seen = [];"
        " window.realtime.onMessage((m) => { if (m.id) window.__seen.push([m.type, m.id, m.last === true]); }); }"
    )
    settled(page)
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}', 'system:announcements'], {{ last: true }})")
    expected = [["QUEUE_UPDATE", current["id"], True], ["ANNOUNCEMENT", news["id"], True]]
    assert wait_for(lambda: sorted(page.evaluate("window.__seen")) == sorted(expected), timeout=10)
    announce(site, "news")
    expect(page.locator("#toasts .toast-text")).to_have_text(["news"])  # the last value made none


def test_a_second_subscriber_that_came_while_the_socket_was_down_gets_the_current_value_after_the_resume(site, web):
    """Nothing was missed (the replay is empty), but the new subscriber still needs the current state."""
    current = queue_update(site, "Somchai")
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    page.evaluate(
        "() => { window.__seen = []; window.__recovered = [];"
        " window.realtime.onMessage((m) => { if (m.id) window.__seen.push([m.id, m.last === true]);"
        " if (m.type === 'CONNECTED') window.__recovered.push(m.data.recovered); }); }"
    )
    settled(page)
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'], {{ last: true }})")
    page.context.set_offline(False)
    wait_live(page)
    assert wait_for(lambda: page.evaluate("window.__seen") == [[current["id"], True]], timeout=10)
    assert page.evaluate("window.__recovered") == [True]


def test_a_channel_subscribed_while_the_socket_was_down_is_resynced_after_a_recovered_resume(site, web):
    """The replay covers the channels the session held when it left: broadcasts to one the page added
    while away were not replayed, and the page must be told to refetch it (found by review)."""
    page = web(site, "bob")
    wait_live(page)
    # A function body: an expression whose value is a function (onResync's "stop listening") is called.
    page.evaluate(
        "() => { window.__resyncs = []; window.realtime.onResync((d) => window.__resyncs.push(d.channels || [])); }"
    )
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    queue_update(site, "While away")  # to a channel the page does not hold yet
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'])")  # added while away
    page.context.set_offline(False)
    wait_live(page)
    assert wait_for(lambda: page.evaluate("window.__resyncs") == [[QUEUE]], timeout=10)


def test_a_channel_the_server_refused_does_not_resync_the_page_at_every_reconnect(site, web):
    """The session never holds it, so it is missing from every restored list: the page knows it was
    refused (the ERROR named it), and it has nothing to miss."""
    page = web(site, "bob")
    wait_live(page)
    page.evaluate(
        "() => { window.__resyncs = []; window.realtime.onResync((d) => window.__resyncs.push(d.channels || []));"
        " window.realtime.subscribe(['clinic:clinic-2:queue']); }"  # not bob's clinic: ERROR forbidden_channel
    )
    # The refusal has arrived before the first drop (one lost with its socket is not known to be one).
    assert wait_for(lambda: page.evaluate("window.realtime.refused.size") == 1, timeout=10)
    for _ in range(2):
        page.context.set_offline(True)
        expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
        page.context.set_offline(False)
        wait_live(page)
    announce(site, "after the drops")
    expect(page.locator("#toasts .toast-text").last).to_have_text("after the drops")
    assert page.evaluate("window.__resyncs") == []


def test_a_page_whose_channels_were_quiet_still_resumes_through_a_deploy(start_server, web):
    """Its position moved only with its own broadcasts, so after a quiet spell longer than the recovery
    window the history no longer reached back to it, and a deploy made it refetch everything
    (history_gone), though it had missed nothing. Now each PONG carries the position (found by review)."""
    srv = start_server(WS_RECOVERY_WINDOW_MS=2000, WS_CLIENT_IDLE_MS=300, WS_CLOSE_TIMEOUT_MS=500)
    page = web(srv, "bob")
    wait_live(page)
    page.evaluate(
        "() => { window.__resyncs = []; window.realtime.onResync((d) => window.__resyncs.push(d.reason));"
        " window.realtime.onMessage((m) => { if (m.type === 'CONNECTED') window.__hello = m.data; }); }"
    )
    elsewhere = {"message": {"type": "QUEUE_UPDATE", "data": {}}, "filter": {"channels": ["clinic:clinic-2:queue"]}}
    for _ in range(3):  # another clinic's queue: the stream moves on, this page hears nothing
        assert srv.broadcast(elsewhere).json()["delivered"] == 0
    head = srv.health()["stream"]["head"]
    assert wait_for(lambda: page.evaluate("window.realtime.position.offset") == head, timeout=10)  # a PONG
    assert wait_for(lambda: srv.health()["stream"]["retained"] == 0, timeout=20)  # the window has passed
    old = srv.health()["pid"]
    srv.proc.send_signal(signal.SIGHUP)  # a deploy: a new worker, whose memory holds no recent broadcasts
    assert wait_for(lambda: srv.health()["pid"] != old, timeout=30)
    hello = wait_for(lambda: page.evaluate("window.__hello || null"), timeout=30)
    assert hello["recovered"] is True, hello
    assert page.evaluate("window.__resyncs") == []  # nothing to refetch
    announce(srv, "after the deploy")
    expect(page.locator("#toasts .toast-text").last).to_have_text("after the deploy")


def test_what_is_broadcast_between_a_page_render_and_its_subscription_reaches_the_page(site, web):
    """The page renders the stream's position; its first SUBSCRIBEs ask for what came after it. Before,
    an alert sent while the page's token request (or upgrade, in a reload storm) was on its way was
    never shown, and nothing said so."""
    page = web(site, "bob")
    wait_live(page)
    held = []
    page.route("**/api/ws/auth", lambda route: held.append(route))  # the next page's token request waits here
    page.goto(site.url + "/clinics/clinic-1/queue")
    assert int(page.locator("body").get_attribute("data-realtime-offset")) >= 0
    assert wait_for(lambda: page.wait_for_timeout(20) or held, timeout=10)
    alert = site.broadcast(
        {
            "message": {"type": "CLINIC_ALERT", "data": {"message": "Room 3 needs a nurse"}},
            "filter": {"channels": ["clinic:clinic-1:alerts"]},
        }
    )
    assert alert.status_code == 200 and alert.json()["delivered"] == 0  # nobody could get it live
    announce(site, "Flu vaccines have arrived")
    page.evaluate(
        "() => { window.__resyncs = 0; document.body.addEventListener('realtime:resync', () => window.__resyncs++); }"
    )
    held[0].continue_()
    page.unroute("**/api/ws/auth")
    wait_live(page)
    expect(page.locator("#alerts .alert-text")).to_have_text(["Room 3 needs a nurse"])  # replayed, once
    expect(page.locator("#toasts .toast-text")).to_have_text("Flu vaccines have arrived")
    assert page.evaluate("window.__resyncs") == 0  # replayed: nothing to refetch


def test_a_resume_does_not_replay_a_channel_older_than_the_last_value_it_was_given(site, web):
    """SUBSCRIBED carries the stream's position, as PONG does: a resume after a drop replayed the
    channel's broadcasts from before the subscription, the older after its newer last value (found by
    review: the queue showed the update before the current one, and said nothing)."""
    page = web(site, "bob")  # the home page: announcements only
    wait_live(page)
    older, newer = queue_update(site, "Somchai"), queue_update(site, "Somchai", "Malee")
    page.evaluate(
        "() => { window.__shown = []; window.realtime.onMessage((m) => { if (m.type === 'QUEUE_UPDATE')"
        " window.__shown.push(m.id); if (m.type === 'CONNECTED') window.__hello = m.data; });"
        f" window.realtime.subscribe(['{QUEUE}'], {{ last: true }}); }}"
    )
    assert wait_for(lambda: page.evaluate("window.__shown") == [newer["id"]], timeout=10)  # its last value
    assert page.evaluate("window.realtime.position.offset") == newer["offset"]
    page.context.set_offline(True)
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "offline")
    page.context.set_offline(False)
    wait_live(page)
    announce(site, "after the drop")  # a replay would come before this
    expect(page.locator("#toasts .toast-text").last).to_have_text("after the drop")
    assert page.evaluate("window.__hello.recovered") is True
    assert page.evaluate("window.__shown") == [newer["id"]], older["id"]


# A page script that subscribes and sends as soon as the socket is open (a PING, and a message of no known
# type), from a listener registered before the first connection.
SENDS_WHEN_OPEN = """
Object.defineProperty(window, "realtime", {
  configurable: true,
  set(rt) {
    Object.defineProperty(window, "realtime", { value: rt, writable: true, configurable: true });
    rt.onStatus((status) => {
      if (status === "open") {
        rt.subscribe(["system:maintenance"]);
        rt.send({ type: "PING" });
        rt.send({ type: "NOPE" });
      }
    });
  },
});
"""


def first_subscribes_held_then_an_older_and_a_newer_broadcast(site, web, *, sends_when_open: bool = False):
    """A queue page whose first SUBSCRIBEs (``since``) wait in the test's proxy while an alert (only the
    replay can bring it) and then an announcement for the user (it comes live, and is held) are sent;
    with ``sends_when_open``, what SENDS_WHEN_OPEN sends ahead of them waits too. Returns the page, its
    sockets and the two broadcasts' answers; the page counts its resyncs in ``window.__resyncs``."""
    from test_close_codes import Sockets, proxied

    page = web(site, "bob", "about:blank")
    held = ['"since"'] + (['"PING"', '"NOPE"'] if sends_when_open else [])
    if sends_when_open:
        page.add_init_script(SENDS_WHEN_OPEN)
    sockets = Sockets(page)
    sockets.hold = lambda message: any(word in message for word in held)
    page.goto(site.url + "/clinics/clinic-1/queue")
    assert proxied(page, lambda: len(sockets.held) == len(held) + 1)  # (PING, NOPE,) plain, and with last
    older = site.broadcast(
        {
            "message": {"type": "CLINIC_ALERT", "data": {"message": "Room 3 needs a nurse"}},
            "filter": {"channels": ["clinic:clinic-1:alerts"]},
        }
    ).json()
    newer = site.broadcast(
        {"message": {"type": "ANNOUNCEMENT", "data": {"message": "For Bob only"}}, "filter": {"userIds": ["bob"]}}
    ).json()
    assert older["delivered"] == 0 and newer["delivered"] == 1 and newer["offset"] > older["offset"]
    page.evaluate(
        "() => { window.__shown = []; window.realtime.onMessage((m) => m.id && window.__shown.push(m.offset));"
        " window.__resyncs = 0; document.body.addEventListener('realtime:resync', () => window.__resyncs++); }"
    )
    # The live one has reached the page, and waits there for the held replay.
    page.wait_for_function("() => (window.realtime.holding?.frames || []).some((m) => m.type === 'ANNOUNCEMENT')")
    return page, sockets, older, newer


def test_a_live_broadcast_ahead_of_the_first_replay_waits_for_it_and_both_are_shown_in_order(site, web):
    """Between CONNECTED and the answer to the page's first SUBSCRIBEs, a broadcast for the user comes
    live, ahead of older ones the replay brings: it would have made them look already seen."""
    page, sockets, older, newer = first_subscribes_held_then_an_older_and_a_newer_broadcast(site, web)
    sockets.release()
    expect(page.locator("#alerts")).to_contain_text("Room 3 needs a nurse")
    expect(page.locator("#toasts .toast-text")).to_have_text("For Bob only")
    assert page.evaluate("window.__shown") == [older["offset"], newer["offset"]]


def test_what_a_page_sends_as_its_socket_opens_does_not_end_the_wait_for_the_first_replay(site, web):
    """Its answers come ahead of the first SUBSCRIBEs' (in order): a PONG carried a position past the
    broadcasts held for the replay, and they were all dropped as already seen, silently; an ERROR ended
    the wait as if a SUBSCRIBE had been refused; and a send() flushed the subscription asked just before
    it without since (found by review)."""
    page, sockets, older, newer = first_subscribes_held_then_an_older_and_a_newer_broadcast(
        site, web, sends_when_open=True
    )
    subscribes = [message for message in sockets.sent if '"SUBSCRIBE"' in message]
    assert subscribes and all('"since"' in message for message in subscribes), subscribes
    sockets.release()  # the PONG (its offset past both) and the ERROR come back first
    expect(page.locator("#alerts")).to_contain_text("Room 3 needs a nurse")
    expect(page.locator("#toasts .toast-text")).to_have_text("For Bob only")
    assert page.evaluate("window.__shown") == [older["offset"], newer["offset"]]
    assert page.evaluate("window.__resyncs") == 0  # replayed: nothing to refetch


def test_a_socket_that_ends_while_broadcasts_are_held_resumes_from_the_render_and_misses_none(site, web):
    """Broadcasts held for the first replay are dropped, not shown, when the socket ends before it, and
    the next connection subscribes since the render again: shown, a newer live one moved the position
    past older ones the replay never brought, and the resume skipped them (found by review)."""
    from relay.codes import Close

    page, sockets, older, newer = first_subscribes_held_then_an_older_and_a_newer_broadcast(site, web)
    sockets.hold = lambda message: False
    sockets.held.clear()  # lost with the socket
    sockets.close(Close.SERVICE_RESTART)
    expect(page.locator("#alerts")).to_contain_text("Room 3 needs a nurse", timeout=15_000)
    expect(page.locator("#toasts .toast-text")).to_have_text("For Bob only")
    assert page.evaluate("window.__shown") == [older["offset"], newer["offset"]]


def test_a_channels_broadcast_between_a_reconnects_admission_and_its_subscribe_reaches_the_page(site, web):
    """A reconnect that is not a resume subscribes again and makes the page refetch; a broadcast to a
    channel between its CONNECTED and its SUBSCRIBE reached neither the socket nor a refetch that read
    the page's state just before it. Its SUBSCRIBEs now ask since CONNECTED's position (found by review)."""
    from test_close_codes import Sockets, proxied

    from relay.codes import Close

    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    page.goto(site.url + "/clinics/clinic-1/queue")
    wait_live(page)
    # A session the server does not have: the next socket is told no_session, and subscribes anew.
    page.evaluate("window.realtime.position.clientId = '00000000-0000-4000-8000-000000000000'")
    sockets.hold = lambda message: '"SUBSCRIBE"' in message
    sockets.close(Close.SERVICE_RESTART)
    assert proxied(page, lambda: len(sockets.held) == 2, timeout=15)  # plain, and with last (the queue)
    alert = {"type": "CLINIC_ALERT", "data": {"message": "Room 3 needs a nurse"}}
    # Delivered only to the old socket, whose page side is gone (the server has not noticed yet).
    assert site.broadcast({"message": alert, "filter": {"channels": ["clinic:clinic-1:alerts"]}}).status_code == 200
    sockets.hold = lambda message: False
    sockets.release()
    expect(page.locator("#alerts")).to_contain_text("Room 3 needs a nurse")
    assert page.evaluate("window.realtime.holding") is None


def test_a_first_subscribe_refused_whole_does_not_leave_the_page_holding_broadcasts_for_good(site, web):
    """An ERROR in place of the SUBSCRIBED the client waits for (a SUBSCRIBE refused whole) ends the
    wait, and says nothing could be replayed; broadcasts are shown again (found by review: they
    piled up unseen while the status said "open")."""
    from test_close_codes import Sockets

    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    # The plain one (announcements, alerts) reaches the server with a "since" it cannot read.
    sockets.rewrite = lambda m: m.replace('"since":{"epoch"', '"since":{"era"') if '"last"' not in m else m
    page.goto(site.url + "/clinics/clinic-1/queue")
    wait_live(page)
    expect(page.locator("#toasts .toast-resync")).to_have_count(1)  # the page was told: nothing replayed
    expect(page.locator("#alerts [data-resync-state=missing]")).to_have_count(1)
    assert page.evaluate("window.realtime.holding") is None
    sent = site.broadcast(
        {"message": {"type": "ANNOUNCEMENT", "data": {"message": "still shown"}}, "filter": {"userIds": ["bob"]}}
    )
    assert sent.status_code == 200
    expect(page.locator("#toasts .toast-text").last).to_have_text("still shown")


def test_a_channel_taken_while_away_is_given_what_came_between_the_resume_and_its_subscribe(site, web):
    """A resume restores the channels its session held; one the page took while the socket was down is
    asked after CONNECTED, since its position: a broadcast to it in between comes replayed, where it
    would otherwise have reached neither the socket nor the page's refetch of that channel."""
    from test_close_codes import Sockets, proxied

    from relay.codes import Close

    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    page.goto(site.url + "/")  # announcements only
    wait_live(page)
    assert wait_for(lambda: site.health()["stream"]["sessions"]["stored"] >= 1, timeout=10)  # resumable
    page.evaluate(
        "() => { window.__shown = []; window.realtime.onMessage((m) => { if (m.id) window.__shown.push(m.id);"
        " if (m.type === 'CONNECTED') window.__hello = m.data; }); }"
    )
    sockets.hold = lambda message: '"SUBSCRIBE"' in message and QUEUE in message
    sockets.close(Close.SERVICE_RESTART)
    page.evaluate(f"window.realtime.subscribe(['{QUEUE}'])")  # while the socket is down
    assert proxied(page, lambda: len(sockets.held) == 1, timeout=15)
    assert page.evaluate("window.__hello.recovered") is True
    update = queue_update(site, "Somchai")
    sockets.hold = lambda message: False
    sockets.release()
    assert proxied(page, lambda: update["id"] in page.evaluate("window.__shown"))
    assert page.evaluate("window.realtime.holding") is None


def test_a_rate_limited_error_while_broadcasts_are_held_does_not_end_the_wait(site, web):
    """ERROR rate_limited answers nothing (the close 1008 follows): taken for the answer to the page's one
    SUBSCRIBE since, it released what was held, moved the position past what the replay never brought,
    and the next connection resumed from there (found by review)."""
    from test_close_codes import Sockets, proxied

    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    sockets.hold = lambda message: '"since"' in message
    page.goto(site.url + "/")  # one SUBSCRIBE since: announcements
    assert proxied(page, lambda: len(sockets.held) == 1)
    older = announce(site, "Sent before the subscription")
    newer = site.broadcast(
        {"message": {"type": "ANNOUNCEMENT", "data": {"message": "For Bob only"}}, "filter": {"userIds": ["bob"]}}
    ).json()
    assert older["delivered"] == 0 and newer["delivered"] == 1
    page.evaluate(
        "() => { window.__shown = []; window.realtime.onMessage((m) => m.id && window.__shown.push(m.offset));"
        " window.__resyncs = 0; document.body.addEventListener('realtime:resync', () => window.__resyncs++);"
        " for (let i = 0; i < 45; i++) window.realtime.send({ type: 'PING' }); }"  # past the burst of 40
    )
    assert proxied(page, lambda: any(r["code"] == 1008 for r in page.evaluate("window.realtime.retries")))
    sockets.hold = lambda message: False
    sockets.held.clear()  # lost with the socket
    assert proxied(page, lambda: page.evaluate("window.__shown") == [older["offset"], newer["offset"]], timeout=20)
    assert page.evaluate("window.__resyncs") == 0


ALERTS = "clinic:clinic-1:alerts"
RECORD_ALERTS = (
    "() => { window.__alerts = []; window.__resyncs = [];"
    " document.body.addEventListener('realtime:CLINIC_ALERT', (e) => window.__alerts.push(e.detail.data.message));"
    " document.body.addEventListener('realtime:resync', (e) => window.__resyncs.push(e.detail)); }"
)


def clinic_alert(srv: Server, text: str) -> dict:
    response = srv.broadcast(
        {"message": {"type": "CLINIC_ALERT", "data": {"message": text}}, "filter": {"channels": [ALERTS]}}
    )
    assert response.status_code == 200, response.text
    return response.json()


def watched_page(site: Server, web, path: str):
    """``(page, sockets)``: bob's page at ``path``, its sockets through the test's proxy, live and settled,
    recording CLINIC_ALERT messages (``window.__alerts``) and resyncs (``window.__resyncs``)."""
    from test_close_codes import Sockets

    page = web(site, "bob", "about:blank")
    sockets = Sockets(page)
    page.goto(site.url + path)
    wait_live(page)
    settled(page)
    page.evaluate(RECORD_ALERTS)
    return page, sockets


def test_a_fragment_swapped_in_later_is_given_what_was_broadcast_to_its_channel_since_its_render(site, web):
    """Found by review: a subscriber that came after CONNECTED (an htmx swap bringing a channel the page
    did not hold) was subscribed with no `since`: what was broadcast to its channel between the fragment's
    render and its SUBSCRIBE reached nobody, and nothing said so. The macro renders the fragment's
    position on it, site.js passes it on, and the client asks since it."""
    page = web(site, "bob", "/clinics/clinic-1/queue")
    subscriber = page.locator("#queue")
    assert subscriber.get_attribute("data-realtime-epoch") == page.locator("body").get_attribute("data-realtime-epoch")
    assert int(subscriber.get_attribute("data-realtime-offset")) >= 0  # the macro renders its request's position
    page.goto(site.url + "/")
    wait_live(page)
    settled(page)
    page.evaluate(RECORD_ALERTS)
    rendered = page.evaluate("({...window.realtime.position})")  # as a fragment rendered now would carry
    assert clinic_alert(site, "Room 3 needs a nurse")["delivered"] == 0  # the page does not hold the channel yet
    announce(site, "meanwhile")  # the page's position moves past the alert: its replay comes from below it
    page.wait_for_function(f"() => window.realtime.position.offset > {rendered['offset'] + 1}", timeout=10_000)
    page.evaluate(
        """([channel, epoch, offset]) => {
             const fragment = document.createElement('div');
             const position = {realtimeEpoch: epoch, realtimeOffset: String(offset)};
             Object.assign(fragment.dataset, {realtimeChannels: channel, ...position});
             document.querySelector('main').append(fragment);
           }""",
        [ALERTS, rendered["epoch"], rendered["offset"]],
    )
    page.wait_for_function("() => window.__alerts.length === 1", timeout=10_000)
    assert page.evaluate("window.__alerts") == ["Room 3 needs a nurse"]
    clinic_alert(site, "Room 4 too")  # live from here on, once
    page.wait_for_function("() => window.__alerts.length === 2", timeout=10_000)
    page.wait_for_timeout(300)
    assert page.evaluate("window.__alerts") == ["Room 3 needs a nurse", "Room 4 too"]
    assert page.evaluate("window.__resyncs") == [] and page.evaluate("window.realtime.holding") is None
    # A fragment rendered in a stream that is gone since: nothing can be replayed; the page is told.
    page.evaluate(
        """(channel) => {
             const fragment = document.createElement('div');
             Object.assign(fragment.dataset, {realtimeChannels: channel, realtimeEpoch: 'gone', realtimeOffset: '3'});
             document.querySelector('main').append(fragment);
           }""",
        QUEUE,
    )
    page.wait_for_function("() => window.__resyncs.length === 1", timeout=10_000)
    resync = page.evaluate("window.__resyncs[0]")
    assert resync["reason"] == "not_replayed" and resync["channels"] == [QUEUE]


SPY_ON_SENDS = """() => {
  window.__sent = [];  // the types of what the page sends from here (PINGs left out), and when (__sentAt)
  window.__sentAt = [];
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (text) {
    const type = JSON.parse(text).type;
    if (type !== 'PING') {
      window.__sent.push(type);
      window.__sentAt.push(performance.now());
    }
    return send.call(this, text);
  };
}"""
# A fragment of bob's queue page (by selector) as a request would render it now, with its position.
FRAGMENT_NOW = """async (selector) => {
  const html = await (await fetch('/clinics/clinic-1/queue')).text();
  return new DOMParser().parseFromString(html, 'text/html').querySelector(selector).outerHTML;
}"""


def test_a_fragment_htmx_swaps_in_later_renders_what_its_replay_brings(site, web):
    """Found by review: htmx sets up a swapped-in element's triggers only as the swap settles (20 ms on; a
    second or more in a background tab), and site.js subscribed the moment the element was in the DOM: a
    replay answered before the settle reached no trigger of it, and the alert it brought was never shown.
    The subscriber now asks once htmx has set it up. (The settle is stretched here to make the race sure.)"""
    page = web(site, "bob", "/")
    wait_live(page)
    settled(page)
    fragment = page.evaluate(FRAGMENT_NOW, "#alerts")  # rendered now, before the alert
    assert clinic_alert(site, "Room 3 needs a nurse")["delivered"] == 0  # the page does not hold the channel
    page.evaluate(SPY_ON_SENDS)
    page.evaluate(
        """(fragment) => {
             window.__swapped = performance.now();
             // With an htmx element inside, set up first (by a script, with htmx.process): its
             // afterProcessNode bubbles through the fragment, which is not set up by it.
             const inside = fragment.replace('</div>', '<span id="inside" hx-get="/health"></span></div>');
             htmx.swap(document.querySelector('main'), inside, {swapStyle: 'beforeend', settleDelay: 1000});
             setTimeout(() => htmx.process(document.querySelector('#inside')), 100);
           }""",
        fragment,
    )
    expect(page.locator("main #alerts .banner")).to_have_count(1, timeout=10_000)
    expect(page.locator("main #alerts .banner .alert-text")).to_have_text("Room 3 needs a nurse")
    asked = page.evaluate(
        "window.__sent.flatMap((type, i) => type === 'SUBSCRIBE' ? [window.__sentAt[i] - window.__swapped] : [])"
    )
    assert len(asked) == 1 and asked[0] >= 900  # after the settle, not as the swap put it in the DOM
    clinic_alert(site, "Room 4 too")  # live from here on
    expect(page.locator("main #alerts .banner")).to_have_count(2, timeout=10_000)
    # Removed before htmx set it up: it never subscribes, and unsubscribes nothing.
    page.evaluate(
        """(fragment) => {
             window.__sent = [];
             const queue = fragment.replaceAll('clinic-1', 'clinic-2').replace('id="alerts"', 'id="other"');
             htmx.swap(document.querySelector('main'), queue, {swapStyle: 'beforeend', settleDelay: 1000});
             document.querySelector('#other').remove();
           }""",
        fragment,
    )
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__sent") == []
    clinic_alert(site, "Room 5")  # the first fragment's channel is still held
    expect(page.locator("main #alerts .banner")).to_have_count(3, timeout=10_000)
    # One htmx will not set up (htmx disabled around it) subscribes at once, as before.
    page.evaluate(
        """(fragment) => {
             window.__sent = [];
             const queue = fragment.replace('id="alerts"', 'id="disabled"').replaceAll('alerts', 'queue');
             htmx.swap(document.querySelector('main'), `<div hx-disable>${queue}</div>`,
                       {swapStyle: 'beforeend', settleDelay: 1000});
           }""",
        fragment,
    )
    assert wait_for(lambda: page.evaluate("window.__sent") == ["SUBSCRIBE"], timeout=10)


def test_a_queue_swapped_for_a_like_one_rendered_before_an_update_asks_for_the_current_queue(site, web):
    """A fragment htmx swaps for a like one (itself, or inside a re-rendered parent) brings its state as of
    its render; an update that came while its request was out went to the fragment it replaced, and the
    queue showed the older state under "Live" until the next update (found by review). A last=True
    fragment asks for its channel's last value a moment later, unless a newer update came meanwhile."""
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    settled(page)
    queue_update(site, "Somchai")
    expect(page.locator("#queue ol.queue li")).to_have_count(1, timeout=10_000)
    older = page.evaluate(FRAGMENT_NOW, "#queue")  # rendered now: Somchai alone
    queue_update(site, "Somchai", "Nok")  # while the "parent's request" is out
    expect(page.locator("#queue ol.queue li")).to_have_count(2, timeout=10_000)
    page.evaluate(SPY_ON_SENDS)
    swap = "(html) => htmx.swap(document.querySelector('#queue'), html, {swapStyle: 'outerHTML'})"
    page.evaluate(swap, older)
    expect(page.locator("#queue ol.queue li")).to_have_count(1)  # the older state, for now
    expect(page.locator("#queue ol.queue li")).to_have_count(2, timeout=10_000)  # the current queue again
    expect(page.locator("#queue ol.queue li").nth(1)).to_contain_text("Nok")
    assert page.evaluate("window.__sent") == ["SUBSCRIBE"]  # its last value, asked once
    # A newer update within the moment renders it: nothing is asked.
    page.evaluate(swap, older)
    queue_update(site, "Somchai", "Nok", "Arun")
    expect(page.locator("#queue ol.queue li")).to_have_count(3, timeout=10_000)
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__sent") == ["SUBSCRIBE"]
    # Rendered after the latest update: its state is current, nothing is asked.
    page.evaluate(swap, page.evaluate(FRAGMENT_NOW, "#queue"))
    page.wait_for_timeout(1500)
    assert page.evaluate("window.__sent") == ["SUBSCRIBE"]
    expect(page.locator("#queue ol.queue li")).to_have_count(3)


def test_an_update_that_comes_as_htmx_swaps_a_fragment_for_a_like_one_reaches_the_new_one(site, web):
    """htmx sets up a swapped-in element's triggers only as its swap settles (20 ms later by default): an
    update dispatched in between reached neither the new fragment nor the one it replaced (found by
    review). The pages settle at once."""
    page = web(site, "bob", "/clinics/clinic-1/queue")
    wait_live(page)
    settled(page)
    update = {"type": "QUEUE_UPDATE", "data": {"queue": [{"number": 1, "name": "Arun"}]}, "id": "x", "offset": 0}
    page.evaluate(
        """(update) => {
             // The queue re-rendered by an htmx request (as a parent's would be), and a frame that arrives
             // just after its swap: realtime.js shows it on <body>, where every trigger listens.
             document.body.addEventListener('htmx:afterSwap', () => setTimeout(() => {
               document.body.dispatchEvent(new CustomEvent('realtime:QUEUE_UPDATE', {detail: update}));
             }, 0), {once: true});
             htmx.ajax('GET', '/clinics/clinic-1/queue', {target: '#queue', select: '#queue', swap: 'outerHTML'});
           }""",
        update,
    )
    expect(page.locator("#queue ol.queue li")).to_have_count(1, timeout=10_000)
    expect(page.locator("#queue ol.queue li")).to_contain_text("Arun")


def test_a_channel_revoked_on_the_open_socket_says_so_in_its_fragment(site, web):
    """The user's clinic changed while the queue was on screen: the server ended the subscription
    (ERROR forbidden_channel, UNSUBSCRIBED), and the queue stayed as it was under "Live", never to move
    again (review). The page is told, by channel, and the fragment says why it stopped; a reconnect that
    makes the page refetch everything later does not turn that into "waiting" for good."""
    from support import flask_cli

    from relay.codes import Close

    queue_update(site, "Somchai")
    page, sockets = watched_page(site, web, "/clinics/clinic-1/queue")
    expect(page.locator("#queue ol.queue li")).to_have_count(1)
    moved = flask_cli(site, "users", "set-clinic", "bob", "clinic-2")
    assert moved.returncode == 0, moved.stderr
    revoked = page.locator("#queue [data-resync-state=revoked]")
    expect(revoked).to_contain_text("no longer available to you")
    resyncs = page.evaluate("window.__resyncs")
    assert {"reason": "revoked", "channels": [QUEUE]} in resyncs
    assert all(r["reason"] == "revoked" for r in resyncs)  # nothing else: the socket itself is fine
    expect(page.locator("#rt-status")).to_have_attribute("data-status", "open")
    # A session the server does not have: the next socket subscribes anew and the whole page refetches.
    page.evaluate("window.realtime.position.clientId = '00000000-0000-4000-8000-000000000000'")
    sockets.close(Close.SERVICE_RESTART)
    page.wait_for_function("() => window.__resyncs.some((r) => !r.channels)", timeout=15_000)
    wait_live(page)
    # The whole page's resync came first (the fragment said "waiting"), then the refusal of its SUBSCRIBE.
    told = f"() => window.__resyncs.filter((r) => r.reason === 'revoked' && r.channels[0] === '{QUEUE}')"
    page.wait_for_function(f"() => ({told})().length === 2", timeout=15_000)
    order = [(r["reason"], (r.get("channels") or ["*"])[0]) for r in page.evaluate("window.__resyncs")]
    assert order.index(("no_session", "*")) < len(order) - 1 - order[::-1].index(("revoked", QUEUE)), order
    expect(revoked).to_contain_text("no longer available to you")  # said again once refused again


def test_a_channel_regained_by_a_resume_gets_its_last_value_again(site, web):
    """Held by the session, but refused on the last socket (a drop the dying worker never saved, and access
    given back since): the page was told to refetch it, and its queue fragment then waited for a last value
    nobody asked for, until the channel's next broadcast (review). Here the refusal is the page's own
    record, set by hand: the server's session holds the channel, as after such a drop."""
    from relay.codes import Close

    queue_update(site, "Somchai", "Malee")
    page, sockets = watched_page(site, web, "/clinics/clinic-1/queue")
    page.evaluate(f"window.realtime.refused.add('{QUEUE}')")
    sockets.close(Close.SERVICE_RESTART)
    page.wait_for_function("() => window.__resyncs.some((r) => r.reason === 'granted')", timeout=15_000)
    wait_live(page)
    assert [(r["reason"], r["channels"]) for r in page.evaluate("window.__resyncs")] == [("granted", [QUEUE])]
    items = page.locator("#queue ol.queue li")
    expect(items).to_have_count(2)  # the last value, asked for again, rendered it
    expect(page.locator("#queue [data-resync-state]")).to_have_count(0)


def test_overlapping_subscribes_from_fragments_refetch_the_one_whose_replay_was_missed(start_server, web):
    """Two fragments of new channels swapped in one after the other while the first one's SUBSCRIBE was
    unanswered: the second joined the first's hold, and when only its own replay could not be made the
    page was told to refetch the first channel, not the second (review)."""
    from test_close_codes import proxied

    site = start_server(WS_CLOSE_TIMEOUT_MS=500, WS_RECOVERY_MAX_MESSAGES=3)
    page, sockets = watched_page(site, web, "/")
    before = page.evaluate("({...window.realtime.position})")
    for n in range(5):  # more than the server replays to one SUBSCRIBE
        clinic_alert(site, f"alert {n}")
    assert page.evaluate("() => window.realtime.send({type: 'PING'})")  # its PONG moves the position past them
    page.wait_for_function(f"() => window.realtime.position.offset >= {before['offset'] + 5}", timeout=10_000)
    current = page.evaluate("({...window.realtime.position})")
    sockets.hold = lambda message: '"SUBSCRIBE"' in message
    page.evaluate(
        "([queue, at]) => window.realtime.subscribe([queue], {since: at})", [QUEUE, current]
    )  # nothing to replay
    assert proxied(page, lambda: len(sockets.held) == 1)
    page.evaluate("([alerts, at]) => window.realtime.subscribe([alerts], {since: at})", [ALERTS, before])
    assert proxied(page, lambda: len(sockets.held) == 2)
    sockets.hold = lambda message: False
    sockets.release()
    assert proxied(page, lambda: len(page.evaluate("window.__resyncs")) == 1)
    resync = page.evaluate("window.__resyncs[0]")
    assert resync["reason"] == "too_many_missed" and ALERTS in resync["channels"]
    assert page.evaluate("window.__alerts") == [] and page.evaluate("window.realtime.holding") is None


def test_a_channel_subscribed_since_and_dropped_in_one_go_is_later_subscribed_from_then_not_from_that_since(site, web):
    """subscribe(since) and unsubscribe in the same task left the since behind: a later plain subscribe of
    the channel replayed old broadcasts, shown as new (found by review; realtime.js's own API only)."""
    page, _ = watched_page(site, web, "/")
    before = page.evaluate("({...window.realtime.position})")
    clinic_alert(site, "old news")
    assert page.evaluate("() => window.realtime.send({type: 'PING'})")  # its PONG moves the position past it
    page.wait_for_function(f"() => window.realtime.position.offset > {before['offset']}", timeout=10_000)
    page.evaluate(
        "([alerts, at]) => { window.realtime.subscribe([alerts], {since: at});"
        " window.realtime.unsubscribe([alerts]); }",
        [ALERTS, before],
    )
    page.evaluate(
        "(alerts) => { window.__taken = false; window.realtime.onMessage((m) => { if (m.type === 'SUBSCRIBED'"
        " && (m.data.channels || []).includes(alerts)) window.__taken = true; });"
        " window.realtime.subscribe([alerts]); }",
        ALERTS,
    )
    page.wait_for_function("() => window.__taken", timeout=10_000)  # (and any replay came before it)
    clinic_alert(site, "news")
    page.wait_for_function("() => window.__alerts.includes('news')", timeout=10_000)
    assert page.evaluate("window.__alerts") == ["news"]


def test_a_fragment_from_before_a_socket_whose_first_replay_failed_is_refetched_not_replayed(start_server, web):
    """The page's first replay could not be made (too many missed): the server's socket starts at
    CONNECTED, not at the render. A fragment rendered between the two asked since its render, and the server
    replayed everything the socket had not been sent from there, the page's own channels too: old
    announcements shown again after the page had refetched (review). It is refetched instead."""
    site = start_server(WS_CLOSE_TIMEOUT_MS=500, WS_RECOVERY_MAX_MESSAGES=3)
    page = web(site, "bob")
    wait_live(page)
    held = []
    page.route("**/api/ws/auth", lambda route: held.append(route))  # the next page's token request waits here
    page.goto(site.url + "/")
    rendered = {
        "epoch": page.locator("body").get_attribute("data-realtime-epoch"),
        "offset": int(page.locator("body").get_attribute("data-realtime-offset")),
    }
    assert wait_for(lambda: page.wait_for_timeout(20) or held, timeout=10)
    for n in range(5):  # more than the page's first SUBSCRIBE may replay: it refetches instead
        announce(site, f"while connecting {n}")
    page.evaluate(RECORD_ALERTS)
    held[0].continue_()
    page.unroute("**/api/ws/auth")
    wait_live(page)
    page.wait_for_function("() => window.__resyncs.some((r) => r.reason === 'too_many_missed')", timeout=10_000)
    settled(page)
    toasts = page.locator("#toasts .toast")
    shown = toasts.count()
    page.evaluate(
        """([channel, epoch, offset]) => {
             const fragment = document.createElement('div');
             Object.assign(fragment.dataset, {realtimeChannels: channel, realtimeEpoch: epoch, realtimeOffset: offset});
             document.querySelector('main').append(fragment);
           }""",
        [ALERTS, rendered["epoch"], str(rendered["offset"] + 2)],
    )
    page.wait_for_function("() => window.__resyncs.some((r) => r.reason === 'not_replayed')", timeout=10_000)
    assert page.evaluate("window.__resyncs.at(-1)")["channels"] == [ALERTS]
    page.wait_for_timeout(500)
    assert toasts.count() == shown  # no announcement from before came again
