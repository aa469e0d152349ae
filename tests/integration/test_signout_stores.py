"""The sign-out store's two implementations, one contract: SqliteSignouts and RedisSignouts (a real redis-server)."""

import time

import pytest

from relay.signouts import RedisSignouts, SignoutsUnavailable, SqliteSignouts

STARTED = int(time.time() * 1000) - 60_000  # when the sign-ins asked about here began (epoch ms)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        signouts = SqliteSignouts(str(tmp_path / "realtime.db"))
    else:
        signouts = RedisSignouts(request.getfixturevalue("redis_server").url, prefix="test")
    yield signouts
    signouts.close()


def test_a_session_nobody_signed_out_has_not_ended(store):
    assert not store.ended("never-seen", "bob", STARTED, time.time())


def test_a_signed_out_session_has_ended_and_no_other(store):
    now = time.time()
    store.end("abc", now + 3600)
    assert store.ended("abc", "bob", STARTED, now)
    assert not store.ended("abd", "bob", STARTED, now)
    assert not store.ended("ab", "bob", STARTED, now)


def test_signing_out_twice_is_harmless(store):
    now = time.time()
    store.end("abc", now + 3600)
    store.end("abc", now + 3600)
    assert store.ended("abc", "bob", STARTED, now)


def test_a_sign_out_is_forgotten_once_the_session_would_have_expired(store):
    store.end("brief", time.time() + 1.0)
    assert store.ended("brief", "bob", STARTED, time.time())
    time.sleep(1.3)
    assert not store.ended("brief", "bob", STARTED, time.time())


def test_signing_a_user_out_everywhere_ends_their_earlier_sign_ins_only(store):
    now, at = time.time(), int(time.time() * 1000)
    store.end_all("bob", at, now + 3600)
    assert store.ended("s1", "bob", at - 1, now)  # a millisecond before
    assert store.ended("s2", "bob", at - 3_000_000, now)
    assert not store.ended("s3", "bob", at, now)  # from that millisecond on: the sign-in that follows
    assert not store.ended("s4", "bob", at + 5, now)
    assert not store.ended("s1", "bobby", at - 1, now)  # nobody else
    assert not store.ended("s1", "bo", at - 1, now)


def test_a_user_and_a_session_with_the_same_name_are_told_apart(store):
    now = time.time()
    store.end_all("same", int(now * 1000), now + 3600)
    assert not store.ended("same", "someone-else", STARTED, now)
    store.end("other", now + 3600)
    assert not store.ended("s1", "other", STARTED, now)


def test_signing_out_everywhere_only_moves_forward_in_time_and_in_how_long_it_is_kept(store):
    now, at = time.time(), int(time.time() * 1000)
    store.end_all("bob", at, now + 3600)
    store.end_all("bob", at - 100_000, now + 3600)  # an older request arriving late brings nobody back
    assert store.ended("s1", "bob", at - 50_000, now)
    store.end_all("bob", at + 10_000, now + 1.0)  # a later time, a shorter keep: the longer one stands
    time.sleep(1.3)
    assert store.ended("s1", "bob", at + 5_000, time.time())


def test_signing_out_everywhere_is_forgotten_once_every_sign_in_it_ended_would_have_expired(store):
    at = int(time.time() * 1000)
    store.end_all("bob", at, time.time() + 1.0)
    assert store.ended("s1", "bob", at - 1, time.time())
    time.sleep(1.3)
    assert not store.ended("s1", "bob", at - 1, time.time())


def test_sqlite_keeps_sign_outs_across_restarts_and_sweeps_expired_rows(tmp_path):
    path = str(tmp_path / "realtime.db")
    first = SqliteSignouts(path)
    now = time.time()
    first.end("kept", now + 3600)
    first.end("stale", now - 1)
    first.close()
    again = SqliteSignouts(path)
    assert again.ended("kept", "bob", STARTED, now)
    again.end("next", now + 3600)  # each sign-out sweeps what has expired
    rows = {row[0] for row in again._conn().execute("SELECT session_id FROM signouts")}
    assert rows == {"kept", "next"}
    again.close()


def test_sqlite_keeps_users_signed_out_everywhere_across_restarts_and_sweeps_expired_rows(tmp_path):
    path = str(tmp_path / "realtime.db")
    first = SqliteSignouts(path)
    now, at = time.time(), int(time.time() * 1000)
    first.end_all("kept", at, now + 3600)
    first.end_all("stale", at - 10_000, now - 1)
    first.close()
    again = SqliteSignouts(path)
    assert again.ended("s1", "kept", at - 1, now)
    again.end_all("next", at, now + 3600)
    rows = {row[0] for row in again._conn().execute("SELECT user_id FROM user_signouts")}
    assert rows == {"kept", "next"}
    again.close()


def test_sqlite_that_cannot_open_its_file_is_unavailable(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    store = SqliteSignouts(str(blocker / "realtime.db"))
    with pytest.raises(SignoutsUnavailable):
        store.ended("abc", "bob", STARTED, time.time())
    with pytest.raises(SignoutsUnavailable):
        store.end("abc", time.time() + 60)
    with pytest.raises(SignoutsUnavailable):
        store.end_all("bob", STARTED, time.time() + 60)


def test_redis_that_is_down_is_unavailable(redis_server):
    store = RedisSignouts(redis_server.url, prefix="test")
    redis_server.stop()
    with pytest.raises(SignoutsUnavailable):
        store.ended("abc", "bob", STARTED, time.time())
    with pytest.raises(SignoutsUnavailable):
        store.end("abc", time.time() + 60)
    with pytest.raises(SignoutsUnavailable):
        store.end_all("bob", STARTED, time.time() + 60)
    store.close()


def test_the_users_signed_out_everywhere_are_read_in_one_call_with_their_times(store):
    now, at = time.time(), int(time.time() * 1000)
    store.end_all("bob", at, now + 3600)
    store.end_all("eve", at - 5_000, now + 3600)
    store.end("carol", now + 3600)  # a session of that name signed out: not a user signed out everywhere
    assert store.signed_out_before(["bob", "carol", "dan", "eve"], now) == {"bob": at, "eve": at - 5_000}
    assert store.signed_out_before([], now) == {}
    # More users than one statement or MGET takes: read in batches, none lost.
    many = [f"u{i}" for i in range(1_200)]
    store.end_all("u1100", at, now + 3600)
    assert store.signed_out_before(many, now) == {"u1100": at}


def test_a_user_signed_out_everywhere_is_no_longer_read_once_it_is_forgotten(store):
    at = int(time.time() * 1000)
    store.end_all("bob", at, time.time() + 1.0)
    assert store.signed_out_before(["bob"], time.time()) == {"bob": at}
    time.sleep(1.3)
    assert store.signed_out_before(["bob"], time.time()) == {}


def test_a_disconnect_is_remembered_by_user_with_its_time_and_is_not_a_sign_out(store):
    now, at = time.time(), int(time.time() * 1000)
    store.disconnect_all("bob", at, now + 3600)
    assert store.disconnected_before(["bob", "carol"], now) == {"bob": at}
    assert store.signed_out_before(["bob"], now) == {}  # their sign-ins go on
    assert not store.ended("s1", "bob", at - 1, now)
    store.end_all("carol", at, now + 3600)
    assert store.disconnected_before(["carol"], now) == {}  # and a sign-out everywhere is not one either
    many = [f"u{i}" for i in range(1_200)]
    store.disconnect_all("u1100", at, now + 3600)
    assert store.disconnected_before(many, now) == {"u1100": at}  # read in batches, none lost


def test_a_disconnect_only_moves_forward_and_is_forgotten_when_its_time_is_up(store):
    now, at = time.time(), int(time.time() * 1000)
    store.disconnect_all("bob", at, now + 1.0)
    store.disconnect_all("bob", at - 100_000, now + 1.0)  # an older one arriving late moves nothing back
    assert store.disconnected_before(["bob"], now) == {"bob": at}
    time.sleep(1.3)
    assert store.disconnected_before(["bob"], time.time()) == {}


def test_a_disconnect_cannot_be_recorded_in_a_store_that_is_down(tmp_path, redis_server):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the database's folder should be")
    redis_store = RedisSignouts(redis_server.url, prefix="test")
    redis_server.stop()
    for down in (SqliteSignouts(str(blocker / "realtime.db")), redis_store):
        with pytest.raises(SignoutsUnavailable):
            down.disconnect_all("bob", STARTED, time.time() + 60)
        with pytest.raises(SignoutsUnavailable):
            down.disconnected_before(["bob"], time.time())
        down.close()
