"""relay.eventlog: one JSON line per event, its timestamp exactly as datetime writes it."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging

import pytest

from relay import eventlog


@pytest.mark.parametrize("created", [0.5, 1_700_000_000.0, 1_700_000_000.9999, 1_764_770_000.123456, 1_764_770_059.999])
def test_the_timestamp_is_utc_iso_to_the_millisecond(created):
    expected = dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")
    assert eventlog._timestamp(created) == expected


def test_a_line_is_one_json_object_with_secrets_redacted(monkeypatch):
    out = io.StringIO()
    eventlog.configure("INFO")
    monkeypatch.setattr(eventlog, "_direct", out)
    eventlog.event(
        "ws.connect", clientId="c-1", userId="bob", token="T0P-S3CRET", note="naïve ✓", at=dt.date(2026, 1, 2)
    )
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "ws.connect" and record["level"] == "info"
    assert record["clientId"] == "c-1" and record["userId"] == "bob"
    assert record["token"] == "[redacted]" and "T0P-S3CRET" not in line
    assert record["note"] == "naïve ✓" and "naïve" in line  # UTF-8, not \\u escapes
    assert record["at"] == "2026-01-02"  # anything else is written as its str()
    dt.datetime.fromisoformat(record["ts"])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("/ws?token=abc.def-1", "/ws?token=[redacted]"),
        ("GET /ws?resume=1&token=t0k&x=2 HTTP/1.1", "GET /ws?resume=1&token=[redacted]&x=2 HTTP/1.1"),
        ("token=abc&offset=3", "token=[redacted]&offset=3"),  # the access log's bare query string
        ("/x?access_token=a;b=1", "/x?access_token=[redacted];b=1"),
        ("/x?Password=hunter2#top", "/x?Password=[redacted]#top"),
        ("/ws?resume=abc&offset=3", "/ws?resume=abc&offset=3"),  # nothing secret: unchanged
        ("Booting worker with pid: 7", "Booting worker with pid: 7"),
    ],
)
def test_a_url_in_another_librarys_log_line_loses_its_secret_parameters(text, expected):
    assert eventlog.redact_url(text) == expected


def test_the_filter_redacts_gunicorns_error_and_access_records():
    error = logging.LogRecord(
        "gunicorn.error", logging.ERROR, "", 0, "Error handling request %s", ("/ws?token=T",), None
    )
    access = logging.LogRecord("gunicorn.access", logging.INFO, "", 0, '"%(r)s" %(s)s', None, None)
    access.args = {"r": "GET /ws?token=T HTTP/1.1", "s": "400", "q": "token=T", "b": 12}
    for record in (error, access):
        assert eventlog.RedactUrls().filter(record) is True  # kept, redacted
    assert error.getMessage() == "Error handling request /ws?token=[redacted]"
    assert access.getMessage() == '"GET /ws?token=[redacted] HTTP/1.1" 400' and access.args["q"] == "token=[redacted]"


def test_redacting_a_long_hostile_line_takes_linear_time():
    """An invalid request line is logged whole, unauthenticated: the first pattern backtracked, 1.6 s on
    a 4 KB line of "?token" (found by review), growing with the cube of its length. 5 s is a hang guard."""
    import time

    hostile = "GET " + "?token" * 1400 + "&= HTTP/1.1"  # 8 KB: the first pattern, ~13 s
    started = time.perf_counter()
    assert eventlog.redact_url(hostile).endswith("&= HTTP/1.1")
    assert time.perf_counter() - started < 5


def test_an_operators_handler_that_waits_is_called_off_the_loop_when_a_line_comes_from_a_callback():
    """A handler that waits (a socket to syslog, an HTTP shipper) raised BlockingSwitchOutError when the
    line was logged from an event-loop callback (a SUBSCRIBE, a close), and the line was lost (found by
    review). Now the handler is called from a greenlet there, and as before everywhere else."""
    import gevent

    got: list[str] = []

    class Shipper(logging.Handler):
        def emit(self, record):
            gevent.sleep(0.01)  # a network write
            got.append(record.getMessage())

    shipper = Shipper()
    relay_log = logging.getLogger("relay.test_shipper")
    relay_log.addHandler(shipper)
    events = logging.getLogger("relay.events")
    events.addHandler(shipper)
    try:
        eventlog.configure("INFO")
        failures: list[BaseException] = []

        def callback():  # what a watcher's callback runs
            try:
                relay_log.error("from a callback")
                eventlog.event("ws.subscribe", channel="system:announcements")
            except BaseException as error:  # noqa: BLE001 - the test reports it
                failures.append(error)

        gevent.get_hub().loop.run_callback(callback)
        relay_log.warning("from a greenlet")  # not on the loop: called as before
        for _ in range(200):  # hang guard: 2 s
            if len(got) == 3:
                break
            gevent.sleep(0.01)
        assert failures == [] and sorted(got) == ["from a callback", "from a greenlet", "ws.subscribe"]
        relay_log.removeHandler(shipper)  # who added it removes it by reference: the wrapper goes with it
        assert relay_log.handlers == []
    finally:
        relay_log.handlers.clear()
        events.handlers.clear()
        eventlog.configure("INFO")


def test_an_operators_handler_that_stalls_holds_one_greenlet_and_a_bounded_queue_of_lines(capsys):
    """One greenlet per line waited on a stalled handler's lock: memory without bound (found by review)."""
    import gevent
    from gevent.event import Event

    through = Event()
    got: list[str] = []

    class Stalled(logging.Handler):
        def emit(self, record):
            through.wait()  # a log server that stopped reading
            got.append(record.getMessage())

    relay_log = logging.getLogger("relay.test_stalled")
    relay_log.addHandler(Stalled())
    try:
        eventlog.configure("INFO")
        [wrapper] = relay_log.handlers
        assert isinstance(wrapper, eventlog.OffTheLoop)
        relay_log.warning("first")
        gevent.sleep(0)  # the writer takes it, and waits
        for n in range(10_050):
            relay_log.warning("line %d", n)  # nothing here waits
        assert len(wrapper._waiting) == wrapper.MAX_WAITING and wrapper.dropped == 50
        assert "log lines dropped" in capsys.readouterr().err
        through.set()
        for _ in range(500):  # hang guard: 5 s
            if len(got) == 10_001:
                break
            gevent.sleep(0.01)
        assert got[:2] == ["first", "line 50"] and got[-1] == "line 10049"  # in order, the oldest dropped
    finally:
        relay_log.handlers.clear()
        eventlog.configure("INFO")


def test_a_sparse_event_is_logged_once_per_interval_per_key_with_the_count_it_left_out(monkeypatch):
    out = io.StringIO()
    eventlog.configure("INFO")
    monkeypatch.setattr(eventlog, "_direct", out)
    now = [1000.0]
    monkeypatch.setattr(eventlog.time, "monotonic", lambda: now[0])
    refused = eventlog.Sparse("ws.origin_refused", every_s=60.0, kept=2)

    def lines() -> list[tuple[str, str, int]]:
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        return [(r["event"], r["remote"], r["notLoggedBefore"]) for r in records]

    for _ in range(3):
        refused("10.0.0.1", remote="10.0.0.1")
    refused("10.0.0.2", remote="10.0.0.2")  # another address: its own line
    assert lines() == [("ws.origin_refused", "10.0.0.1", 0), ("ws.origin_refused", "10.0.0.2", 0)]
    now[0] += 59.9
    refused("10.0.0.1", remote="10.0.0.1")
    assert len(lines()) == 2
    now[0] += 0.1  # a minute after its last line: logged, with the three left out since
    refused("10.0.0.1", remote="10.0.0.1")
    assert lines()[-1] == ("ws.origin_refused", "10.0.0.1", 3)
    refused("10.0.0.3", remote="10.0.0.3")  # a third address: the one logged longest ago is forgotten...
    refused("10.0.0.2", remote="10.0.0.2")  # ...and logged again at once, not never
    assert lines()[-2:] == [("ws.origin_refused", "10.0.0.3", 0), ("ws.origin_refused", "10.0.0.2", 0)]
