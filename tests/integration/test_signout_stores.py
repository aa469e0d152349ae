"""The sign-out store's two implementations, one contract: SqliteSignouts and RedisSignouts (a real redis-server)."""

import time

import pytest

from relay.signouts import RedisSignouts, SignoutsUnavailable, SqliteSignouts


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        signouts = SqliteSignouts(str(tmp_path / "realtime.db"))
    else:
        signouts = RedisSignouts(request.getfixturevalue("redis_server").url, prefix="test")
    yield signouts
    signouts.close()


def test_a_session_nobody_signed_out_has_not_ended(store):
    assert not store.ended("never-seen", time.time())


def test_a_signed_out_session_has_ended_and_no_other(store):
    now = time.time()
    store.end("abc", now + 3600)
    assert store.ended("abc", now)
    assert not store.ended("abd", now)
    assert not store.ended("ab", now)


def test_signing_out_twice_is_harmless(store):
    now = time.time()
    store.end("abc", now + 3600)
    store.end("abc", now + 3600)
    assert store.ended("abc", now)


def test_a_sign_out_is_forgotten_once_the_session_would_have_expired(store):
    store.end("brief", time.time() + 0.3)
    assert store.ended("brief", time.time())
    time.sleep(0.6)
    assert not store.ended("brief", time.time())


def test_sqlite_keeps_sign_outs_across_restarts_and_sweeps_expired_rows(tmp_path):
    path = str(tmp_path / "realtime.db")
    first = SqliteSignouts(path)
    now = time.time()
    first.end("kept", now + 3600)
    first.end("stale", now - 1)
    first.close()
    again = SqliteSignouts(path)
    assert again.ended("kept", now)
    again.end("next", now + 3600)  # each sign-out sweeps what has expired
    rows = {row[0] for row in again._conn().execute("SELECT session_id FROM signouts")}
    assert rows == {"kept", "next"}
    again.close()


def test_sqlite_that_cannot_open_its_file_is_unavailable(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    store = SqliteSignouts(str(blocker / "realtime.db"))
    with pytest.raises(SignoutsUnavailable):
        store.ended("abc", time.time())
    with pytest.raises(SignoutsUnavailable):
        store.end("abc", time.time() + 60)


def test_redis_that_is_down_is_unavailable(redis_server):
    store = RedisSignouts(redis_server.url, prefix="test")
    redis_server.stop()
    with pytest.raises(SignoutsUnavailable):
        store.ended("abc", time.time())
    with pytest.raises(SignoutsUnavailable):
        store.end("abc", time.time() + 60)
    store.close()
