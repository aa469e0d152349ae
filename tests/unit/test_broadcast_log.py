"""The broadcast log's plain parts: the record of a broadcast, times as people type them, CSV, the writer."""

import csv
import io

import gevent
import pytest

from relay.broadcast_log import (
    CSV_COLUMNS,
    LoggedBroadcast,
    LogQuery,
    LogUnavailable,
    LogWriter,
    csv_text,
    iso,
    parse_when,
    record_of,
)

NOW = 1_800_000_000_000


def test_a_record_keeps_the_sender_the_size_and_the_first_200_characters():
    row = record_of(
        envelope_id="b1",
        offset=7,
        at=NOW,
        source="admin-page:alice",
        type_="ANNOUNCEMENT",
        data={"message": "é" * 300},
        filter_={"channels": ["system:announcements"]},
        delivered=3,
    )
    assert (row.source, row.sender, row.offset, row.delivered) == ("admin", "alice", 7, 3)
    assert len(row.preview) == 200 and row.preview.startswith('{"message":"éé')
    assert row.size == len('{"message":""}') + 600  # bytes: é is two
    assert row.channels == ["system:announcements"]
    service = record_of(
        envelope_id="b2", offset=None, at=NOW, source="api", type_="T", data=None, filter_={}, delivered=0
    )
    assert (service.source, service.sender, service.preview) == ("api", "service", "null")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - 30 * 60_000),
        ("2h", NOW - 2 * 3_600_000),
        ("7d", NOW - 7 * 86_400_000),
        ("45s", NOW - 45_000),
        ("2027-01-15T09:30", 1_800_005_400_000),
        ("2027-01-15T10:30+01:00", 1_800_005_400_000),
        ("2027-01-15T09:30:00Z", 1_800_005_400_000),
    ],
)
def test_times_as_people_type_them(text, expected):
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "1w", "-5m", "2027-13-01", "", "5 minutes"])
def test_a_time_that_cannot_be_read_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="use 30m, 2h, 7d"):
        parse_when(text, NOW)


def test_ago_reaches_back_to_1970_at_most():
    assert parse_when("999999d", NOW) == 0  # "everything", not a year before 1 (was a 503 from Supabase's store)


@pytest.mark.parametrize("text", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00", "1969-12-31T23:59:59Z"])
def test_a_time_no_store_can_be_asked_about_is_refused(text):
    with pytest.raises(ValueError, match="from 1970 to 9999"):
        parse_when(text, NOW)


def test_the_last_time_of_9999_is_still_a_time():
    assert iso(parse_when("9999-12-31T23:59:59.999Z", NOW)).startswith("9999-12-31T23:59:59.")


def test_csv_has_a_header_one_row_per_broadcast_and_defuses_formulas():
    rows = [
        LoggedBroadcast("b1", NOW, "api", "service", "ALERT", {"channels": ["a", "b"]}, 2, 10, "=HYPERLINK(1)", 4),
        LoggedBroadcast("b2", NOW - 1, "admin", "alice", "NOTE", {}, 0, 2, "{}", None),
    ]
    table = list(csv.reader(io.StringIO(csv_text(rows))))
    assert table[0] == list(CSV_COLUMNS)
    assert table[1] == [iso(NOW), "b1", "4", "api", "service", "ALERT", "a b", '{"channels":["a","b"]}', "2", "10"] + [
        "'=HYPERLINK(1)"
    ]
    assert table[2][1:4] == ["b2", "", "admin"] and table[2][6] == ""
    assert len(table) == 3


class ListStore:
    """A store in a list that can be told to fail."""

    name = "list"

    def __init__(self):
        self.rows: list[LoggedBroadcast] = []
        self.down = False

    def write(self, rows):
        if self.down:
            raise LogUnavailable("down")
        self.rows.extend(rows)

    def query(self, query: LogQuery):
        return list(reversed(self.rows))[query.offset : query.offset + query.limit]

    def trim(self, before_ms):
        return 0


def row(n: int) -> LoggedBroadcast:
    return LoggedBroadcast(f"b{n}", NOW + n, "api", "service", "T", {}, 1, 2, "{}", n)


def test_the_writer_keeps_what_a_store_refused_and_writes_it_once_the_store_is_back():
    store = ListStore()
    writer = LogWriter(store, retention_days=30, batch=2)
    store.down = True
    for n in range(3):
        writer.record(row(n))
    assert store.rows == [] and writer.status()["queued"] == 3 and writer.status()["lastError"] == "down"
    store.down = False
    assert writer.flush(deadline=1.0)
    assert [r.id for r in store.rows] == ["b0", "b1", "b2"]
    assert writer.status() | {"store": "list"} == {
        "store": "list",
        "queued": 0,
        "written": 3,
        "dropped": 0,
        "lastError": None,
        "retentionDays": 30,
    }


def test_the_writer_queue_is_bounded_and_drops_the_oldest():
    store = ListStore()
    store.down = True
    writer = LogWriter(store, retention_days=1, limit=5)
    for n in range(8):
        writer.record(row(n))
    assert writer.status()["queued"] == 5 and writer.dropped == 3
    store.down = False
    writer.flush(deadline=1.0)
    assert [r.id for r in store.rows] == ["b3", "b4", "b5", "b6", "b7"]


def test_the_writer_queue_is_bounded_by_bytes_too_counting_each_audience_list():
    """10,000 waiting records to 1,000 user ids each held ~1 GB under the count bound alone (found by review)."""
    store = ListStore()
    store.down = True
    writer = LogWriter(store, retention_days=1, limit_bytes=1 << 20)  # 1 MiB
    many = {"userIds": [f"user-{n:04d}" for n in range(1000)]}
    for n in range(30):
        writer.record(LoggedBroadcast(f"b{n}", NOW + n, "api", "service", "T", many, 1, 2, "{}", n))
    queued = writer.status()["queued"]
    assert 5 <= queued <= 10 and writer.dropped == 30 - queued  # ~100 KB each: nine or ten fit in 1 MiB
    writer.record(row(99))  # a small one still joins
    store.down = False
    writer.flush(deadline=1.0)
    assert [r.id for r in store.rows][-2:] == ["b29", "b99"]  # the newest kept, in order
    small = LogWriter(ListStore(), retention_days=1, limit_bytes=1 << 20)
    small.store.down = True
    for n in range(500):
        small.record(row(n))
    assert small.status()["queued"] == 500 and small.dropped == 0  # ~1.2 KB each: all kept


class SlowStore(ListStore):
    """Each write waits (an HTTP call to Supabase), the first one longest."""

    def __init__(self):
        super().__init__()
        self.waits = [0.1]

    def write(self, rows):
        gevent.sleep(self.waits.pop(0) if self.waits else 0.01)
        super().write(rows)


def test_a_flush_while_the_writer_is_writing_writes_every_row_once():
    """An admin page flushes while the background writer waits on the store: neither may remove
    rows the other took, nor a row it never wrote."""
    store = SlowStore()
    writer = LogWriter(store, retention_days=30, interval=0.01, batch=3)
    writer.start()
    for n in range(6):
        writer.record(row(n))
    gevent.sleep(0.02)  # the writer is writing b0..b2 (slowly)
    assert writer.flush(deadline=2.0)  # the page writes the rest meanwhile
    for n in range(6, 9):
        writer.record(row(n))
    gevent.sleep(0.3)
    assert sorted(r.id for r in store.rows) == sorted(f"b{n}" for n in range(9))
    assert writer.status()["queued"] == 0 and writer.written == 9 and not writer._greenlet.dead


class SlowToAnswer(ListStore):
    """Answers only after a wait, as an HTTP store that is down does (a timeout, a 503)."""

    def write(self, rows):
        gevent.sleep(0.2)
        super().write(rows)


def test_rows_in_flight_to_a_store_that_is_down_still_count_as_queued():
    """The writer takes a batch out of the queue before the store answers; until it does, those rows
    are unwritten: /health counts them, and a flush (the drain) does not call them written."""
    store = SlowToAnswer()
    store.down = True
    writer = LogWriter(store, retention_days=30, interval=0.01, batch=1)
    writer.start()
    writer.record(row(0))
    gevent.sleep(0.05)  # the writer has taken b0 and waits on the store
    assert writer.status()["queued"] == 1
    assert not writer.flush(deadline=0.1)
    gevent.sleep(0.3)  # refused and put back
    assert writer.status()["queued"] == 1 and writer.status()["lastError"] == "down"
    store.down = False
    assert writer.flush(deadline=2.0)
    assert [r.id for r in store.rows] == ["b0"] and writer.status()["queued"] == 0


class PickyStore(ListStore):
    """Refuses any batch holding row b1 with an error that is not the store being down (a bug)."""

    def write(self, rows):
        if any(r.id == "b1" for r in rows):
            raise ValueError("a row this store cannot take")
        super().write(rows)


def test_a_row_the_store_cannot_take_costs_only_itself_and_the_writer_lives_on(caplog):
    store = PickyStore()
    writer = LogWriter(store, retention_days=30, interval=0.01, batch=3)
    writer.start()
    for n in range(3):
        writer.record(row(n))
    assert writer.flush(deadline=2.0)
    assert [r.id for r in store.rows] == ["b0", "b2"] and writer.dropped == 1
    writer.record(row(3))
    gevent.sleep(0.05)
    assert [r.id for r in store.rows] == ["b0", "b2", "b3"] and not writer._greenlet.dead
    assert "b1 could not be logged" in caplog.text


def test_people_read_the_message_when_there_is_one_and_the_json_otherwise():
    def logged(data):
        return record_of(envelope_id="b", offset=1, at=NOW, source="api", type_="T", data=data, filter_={}, delivered=0)

    assert logged({"message": "<b>lunch</b> at noon"}).text == "<b>lunch</b> at noon"
    assert logged({"queue": [1, 2]}).text == '{"queue":[1,2]}'
    assert logged("just text").text == '"just text"'
    cut = logged({"message": "x" * 500})
    assert not cut.whole and cut.text == cut.preview and len(cut.text) == 200
    assert logged({"message": "é" * 10}).whole


def test_rows_for_postgres_carry_no_nul_which_it_refuses_in_text_and_jsonb():
    from relay.supabase_broadcast_log import _without_nul

    doc = {"preview": "x\x00y", "filter": {"userIds": ["u\x00"]}, "size": 3, "channels": ["a"]}
    assert _without_nul([doc]) == [
        {"preview": "x\ufffdy", "filter": {"userIds": ["u\ufffd"]}, "size": 3, "channels": ["a"]}
    ]
    assert _without_nul("a literal \\u0000 stays as typed") == "a literal \\u0000 stays as typed"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"type": "announcement"}, "did you mean ANNOUNCEMENT?"),
        ({"type": "not a type"}, "is no message type"),
        ({"since": 2_000, "until": 1_000}, "since is after until"),
    ],
)
def test_a_log_query_no_broadcast_could_match_says_why(fields, says):
    """``--type announcement`` and a window given backwards answered "no broadcasts in that window" as if
    there had been none (ops review)."""
    with pytest.raises(ValueError, match=says):
        LogQuery(**fields)
