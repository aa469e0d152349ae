"""The broadcast log's two stores, one contract: SqliteBroadcastLog and SupabaseBroadcastLog (over HTTP,
against the local stand-in, with the official client)."""

import pytest
from fake_supabase import SERVICE_KEY, FakeSupabase

from relay.broadcast_log import LoggedBroadcast, LogQuery, LogUnavailable
from relay.sqlite_broadcast_log import SqliteBroadcastLog
from relay.supabase_broadcast_log import SupabaseBroadcastLog

T0 = 1_800_000_000_000
MINUTE = 60_000


def entry(n: int, *, type_="ANNOUNCEMENT", channels=(), sender="service", at=None) -> LoggedBroadcast:
    flt = {"channels": list(channels)} if channels else {}
    return LoggedBroadcast(
        id=f"b{n:03d}",
        at=T0 + n * MINUTE if at is None else at,
        source="api" if sender == "service" else "admin",
        sender=sender,
        type=type_,
        filter=flt,
        delivered=n,
        size=20 + n,
        preview=f'{{"message":"number {n}"}}',
        offset=n,
    )


@pytest.fixture(params=["sqlite", "supabase"])
def store(request, tmp_path):
    if request.param == "sqlite":
        log = SqliteBroadcastLog(str(tmp_path / "realtime.db"))
        yield log
        log.close()
        return
    fake = FakeSupabase().start()
    log = SupabaseBroadcastLog(fake.url, SERVICE_KEY, timeout=3.0)
    log.fake = fake
    yield log
    log.close()
    fake.stop()


def ids(rows):
    return [r.id for r in rows]


def test_rows_come_back_whole_and_newest_first(store):
    rows = [entry(1, channels=["system:announcements"]), entry(2, sender="alice"), entry(3)]
    store.write(rows)
    found = store.query(LogQuery(limit=10))
    assert ids(found) == ["b003", "b002", "b001"]
    assert found[2] == rows[0] and found[1] == rows[1]


def test_a_long_read_comes_back_whole_past_postgrests_row_cap(store):
    """The CSV export reads 10,000 rows; Supabase answers at most 1,000 at a time (here 300) and says nothing."""
    if hasattr(store, "fake"):
        store.fake.max_rows = 300
    store.write([entry(n, at=T0 + n) for n in range(1, 1001)])
    found = store.query(LogQuery(limit=950, offset=20))
    assert len(found) == 950 and found[0].id == "b980" and found[-1].id == "b031"
    assert len(store.query(LogQuery(limit=5000))) == 1000


def test_rows_written_while_a_long_read_pages_are_not_read_twice(store):
    """Newer rows arriving between two pages push the older ones down the order (offset paging)."""
    if hasattr(store, "fake"):
        store.fake.max_rows = 100
    store.write([entry(n, at=T0 + n) for n in range(1, 301)])
    if hasattr(store, "fake"):
        real_page = store._page

        def page_then_write(query, start, count):
            found = real_page(query, start, count)
            if start < 200:  # during the first two pages: one newer than everything read, each time
                store.write([entry(1000 + start, at=T0 + 10_000 + start)])
            return found

        store._page = page_then_write
    found = store.query(LogQuery(limit=250))
    assert [r.id for r in found] == [f"b{n:03d}" for n in range(300, 50, -1)]


def test_writing_an_id_twice_keeps_the_first(store):
    store.write([entry(1)])
    store.write([entry(1, type_="CHANGED"), entry(2)])
    assert [(r.id, r.type) for r in store.query(LogQuery())] == [("b002", "ANNOUNCEMENT"), ("b001", "ANNOUNCEMENT")]


def test_filters_narrow_and_pages_do_not_overlap(store):
    store.write(
        [
            entry(1, channels=["clinic:c1:queue"]),
            entry(2, type_="QUEUE_UPDATE", channels=["clinic:c1:queue", "clinic:c1:alerts"]),
            entry(3, type_="QUEUE_UPDATE", channels=["clinic:c2:queue"], sender="alice"),
            entry(4, channels=["clinic:c1:alerts"], sender="alice"),
            entry(5),
        ]
    )
    assert ids(store.query(LogQuery(type="QUEUE_UPDATE"))) == ["b003", "b002"]
    assert ids(store.query(LogQuery(channel="clinic:c1:alerts"))) == ["b004", "b002"]
    assert ids(store.query(LogQuery(channel="clinic:c1"))) == []  # a channel is matched whole
    assert ids(store.query(LogQuery(sender="alice"))) == ["b004", "b003"]
    assert ids(store.query(LogQuery(since=T0 + 2 * MINUTE, until=T0 + 4 * MINUTE))) == ["b004", "b003", "b002"]
    assert ids(store.query(LogQuery(type="QUEUE_UPDATE", sender="alice"))) == ["b003"]
    pages = [ids(store.query(LogQuery(offset=n * 2, limit=2))) for n in range(3)]
    assert pages == [["b005", "b004"], ["b003", "b002"], ["b001"]]


def test_trim_removes_only_rows_older_than_the_cut(store):
    store.write([entry(n) for n in range(1, 6)])
    assert store.trim(T0 + 3 * MINUTE) == 2
    assert ids(store.query(LogQuery())) == ["b005", "b004", "b003"]


def test_a_store_that_cannot_answer_raises_log_unavailable(store, tmp_path):
    if isinstance(store, SqliteBroadcastLog):
        broken = SqliteBroadcastLog(str(tmp_path))  # a folder, not a database file
    else:
        store.fake.mode = "error"
        broken = store
    with pytest.raises(LogUnavailable):
        broken.write([entry(1)])
    with pytest.raises(LogUnavailable):
        broken.query(LogQuery())
    if broken is not store:
        broken.close()


def test_supabase_writes_go_to_the_named_table_with_the_service_key():
    fake = FakeSupabase().start()
    try:
        fake.log_table = "audit_broadcasts"
        log = SupabaseBroadcastLog(fake.url, SERVICE_KEY, table="audit_broadcasts")
        log.write([entry(1, channels=["system:announcements"])])
        [call] = fake.calls("/rest/v1/audit_broadcasts")
        assert call.method == "POST" and call.query["on_conflict"] == ["id"]
        assert call.headers["apikey"] == SERVICE_KEY and call.headers["authorization"] == f"Bearer {SERVICE_KEY}"
        assert "resolution=ignore-duplicates" in call.headers["prefer"]
        stored = fake.log_rows["b001"]
        assert stored["channels"] == ["system:announcements"] and stored["filter"] == {
            "channels": ["system:announcements"]
        }
        assert stored["stream_offset"] == 1 and stored["sender"] == "service"
        log.close()
    finally:
        fake.stop()
