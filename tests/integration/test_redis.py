"""Scale-out through a real Redis: several workers and hosts behave as one service, and survive Redis faults."""

import os
import signal
import time

import pytest
from support import Server, make_users, wait_for

USERS = ["alice", "bob", "carol", "erin"]


def test_several_workers_without_redis_refuse_to_start(start_server):
    srv = start_server("-w", "3", wait=False)
    assert srv.proc.wait(timeout=30) != 0
    assert "cannot start: 3 workers need REDIS_URL" in srv.log_text()


def test_an_unreachable_redis_stops_start_up_naming_redis_url(start_server):
    srv = start_server(wait=False, REDIS_URL="redis://:hunter2-secret@127.0.0.1:9/0")
    assert srv.proc.wait(timeout=30) != 0
    log = srv.log_text()
    assert "cannot start: Redis at REDIS_URL=redis://:***@127.0.0.1:9/0 is unreachable" in log
    assert "hunter2-secret" not in log


def test_a_redis_password_in_the_query_string_is_masked_on_health_and_in_the_log(start_server, redis_server):
    """redis-py takes credentials from the query string too; /health is public (found by review)."""
    import redis

    redis.Redis(port=redis_server.port).config_set("requirepass", "hunter3-secret")
    srv = start_server(REDIS_URL=f"{redis_server.url}?password=hunter3-secret&health_check_interval=5")
    shown = srv.health()["broker"]["url"]
    assert shown == f"{redis_server.url}?password=***&health_check_interval=5"
    assert srv.announce("through a guarded Redis")["delivered"] == 0
    assert "hunter3-secret" not in srv.log_text()


def test_three_workers_300_clients_one_broadcast_exactly_once(start_server, redis_server, crowd):
    srv = start_server("-w", "3", REDIS_URL=redis_server.url, WS_MAX_CONNECTIONS_PER_USER=1000)
    assert wait_for(lambda: srv.health()["workers"] == 3)
    sockets = crowd.connect(srv, USERS * 75, ["system:announcements"])

    health = wait_for(lambda: (h := srv.health())["clients"] == 300 and h)
    assert health["clients"] == 300 and health["byRole"] == {"admin": 75, "sales_staff": 150, "nurse": 75}
    assert health["byClinic"] == {"clinic-1": 150, "clinic-2": 75}
    busy = [member for member in health["cluster"] if member["clients"]]
    assert len(busy) >= 2, health["cluster"]  # the kernel spread the sockets over several workers
    assert sum(member["clients"] for member in health["cluster"]) == 300

    result = srv.announce("to every worker", channels=["system:announcements"])
    assert (result["delivered"], result["workers"], result["missingWorkers"]) == (300, 3, 0)
    received = crowd.drain(sockets)
    assert all(len(messages) == 1 for messages in received), sorted({len(m) for m in received})
    assert {messages[0]["id"] for messages in received} == {result["id"]}


def test_filters_select_the_same_recipients_across_workers(start_server, redis_server, crowd):
    srv = start_server("-w", "3", REDIS_URL=redis_server.url, WS_MAX_CONNECTIONS_PER_USER=1000)
    assert wait_for(lambda: srv.health()["workers"] == 3)
    users = USERS * 25
    sockets = crowd.connect(srv, users, ["system:announcements"])
    cases = [
        ({"clinicIds": ["clinic-1"]}, {"bob", "erin"}),
        ({"roles": ["admin", "nurse"]}, {"alice", "erin"}),
        ({"userIds": ["carol"], "channels": ["system:announcements"]}, {"carol"}),
        ({"clinicIds": ["clinic-1"], "roles": ["nurse"]}, {"erin"}),
    ]
    for flt, expected in cases:
        result = srv.announce("filtered", **flt)
        assert result["delivered"] == 25 * len(expected), flt
        received = crowd.drain(sockets, quiet=0.5)
        got = {users[i] for i, messages in enumerate(received) if messages}
        assert got == expected, flt
        assert all(len(messages) <= 1 for messages in received)


def test_two_instances_sharing_one_redis_behave_as_one(tmp_path, redis_server, crowd):
    make_users(tmp_path / "realtime.db")
    shared = {"REDIS_URL": redis_server.url, "REALTIME_DB": str(tmp_path / "realtime.db")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    host_a = Server(tmp_path / "a", shared).start()
    host_b = Server(tmp_path / "b", shared).start()
    try:
        on_a = crowd.connect(host_a, USERS * 5, ["system:announcements"])
        on_b = crowd.connect(host_b, ["bob", "carol"] * 10, ["system:announcements"])
        for srv in (host_a, host_b):
            health = wait_for(lambda srv=srv: (h := srv.health())["clients"] == 40 and h)
            assert health["clients"] == 40 and health["workers"] == 2
            assert health["worker"]["clients"] == 20
        result = host_b.announce("from host b", channels=["system:announcements"])
        assert (result["delivered"], result["workers"]) == (40, 2)
        assert all(len(m) == 1 for m in crowd.drain(on_a + on_b))
        result = host_a.announce("carol only", userIds=["carol"])
        assert result["delivered"] == 5 + 10
    finally:
        host_a.stop()
        host_b.stop()


def test_redis_restart_degrades_then_recovers_without_restarting_gunicorn_and_a_lost_stream_resyncs(
    start_server, redis_server
):
    srv = start_server(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    worker_pid = srv.health()["pid"]
    clients = [srv.connect(user, ["system:announcements"]) for user in USERS]
    assert srv.announce("before")["delivered"] == 4
    for client in clients:
        client.expect("ANNOUNCEMENT")

    redis_server.kill()
    response = srv.broadcast({"message": {"type": "ANNOUNCEMENT", "data": {"message": "lost"}}})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "Redis" in error["message"]
    health = wait_for(lambda: (h := srv.health())["status"] == "degraded" and h)
    assert health["ok"] is False and health["broker"]["state"] == "degraded" and health["broker"]["lastError"]
    assert health["clients"] == 4  # sockets are unaffected; the figures are this worker's own

    time.sleep(2)  # long enough for the listener's backoff to grow past a second
    redis_server.start()  # same port
    # Right after the restart: either Redis is not taking publishes yet (503), or this worker has
    # delivered to its own clients and says so; never an "ok" that reached nobody it could count.
    early = srv.broadcast(
        {"message": {"type": "ANNOUNCEMENT", "data": {"message": "early"}}, "filter": {"userIds": ["nobody"]}}
    )
    assert early.status_code == 503 or early.json()["workers"] == 1, early.text
    assert wait_for(lambda: srv.health()["status"] == "ok", timeout=20)
    probe = {"message": {"type": "PROBE", "data": {}}, "filter": {"userIds": ["nobody"]}}
    assert wait_for(lambda: srv.broadcast(probe).status_code == 200, timeout=20)
    # This Redis came back without its data: a new stream. Positions in the old one mean nothing, so every
    # socket is told to come back (and its client to refetch) rather than left receiving unknown offsets.
    for client in clients:
        assert client.closed_with() == (1012, "stream reset")
    srv.wait_for_event("stream.reset")
    clients = [srv.connect(user, ["system:announcements"]) for user in USERS]
    result = srv.announce("after")
    assert result["delivered"] == 4
    for client in clients:
        assert client.expect("ANNOUNCEMENT")["data"]["message"] == "after"
    assert srv.health()["pid"] == worker_pid  # no worker crashed or was replaced
    srv.wait_for_event("redis.listener_lost")


def test_a_redis_back_from_an_older_snapshot_starts_the_stream_over_rather_than_drop_new_broadcasts(
    start_server, redis_server
):
    """Redis restarted from a snapshot (its default persistence) has the same epoch and an older head: its
    next offsets are ones the workers delivered, and they would drop those broadcasts as duplicates."""
    import redis as redis_client

    srv = start_server(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    bob = srv.connect("bob", ["system:announcements"])
    assert srv.announce("one")["delivered"] == 1 and bob.expect("ANNOUNCEMENT")
    redis_client.Redis.from_url(redis_server.url).save()  # the snapshot the restart loads (--dir is kept)
    for text in ("two", "three"):
        srv.announce(text)
        assert bob.expect("ANNOUNCEMENT")["data"]["message"] == text
    redis_server.kill()
    redis_server.start()  # loads the snapshot: the same epoch, the head back at "one"
    assert bob.closed_with(timeout=20) == (1012, "stream reset")  # told, and its client refetches
    srv.wait_for_event("stream.went_back")
    bob = srv.connect("bob", ["system:announcements"])
    assert wait_for(lambda: srv.broadcast({"message": {"type": "ANNOUNCEMENT", "data": {"message": "four"}}}).ok)
    assert bob.expect("ANNOUNCEMENT")["data"]["message"] == "four"  # delivered, not taken for a duplicate


def test_a_killed_worker_leaves_the_cluster_view_and_its_clients_come_back(start_server, redis_server, crowd):
    # A long heartbeat: leaving the view within one beat must not depend on the key expiring.
    srv = start_server("-w", "2", REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=5000, WS_MAX_CONNECTIONS_PER_USER=1000)
    assert wait_for(lambda: srv.health()["workers"] == 2)
    sockets = crowd.connect(srv, USERS * 20, ["system:announcements"])
    health = wait_for(lambda: (h := srv.health())["clients"] == 80 and h)
    victim = max(health["cluster"], key=lambda m: m["clients"])
    assert victim["clients"] > 0

    os.kill(victim["pid"], signal.SIGKILL)
    codes = crowd.close_codes(sockets, timeout=5)  # the victim's close at once; the others' wait this out
    lost = [ws for ws, code in zip(sockets, codes, strict=True) if code is not None]
    assert len(lost) == victim["clients"]
    # Redis saw the worker's connections drop: the cluster view excludes it well before its key expires (12.5 s).
    health = wait_for(lambda: (h := srv.health())["clients"] == 80 - len(lost) and h, timeout=4)
    assert victim["pid"] not in [m["pid"] for m in health["cluster"]]

    # Its clients reconnect (to the survivor, or to the worker gunicorn starts in its place).
    crowd.connect(srv, USERS * (len(lost) // 4) + USERS[: len(lost) % 4], ["system:announcements"])
    assert wait_for(lambda: srv.health()["clients"] == 80, timeout=30)  # within a beat or two
    assert srv.announce("all back", channels=["system:announcements"])["delivered"] == 80


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_health_reports_the_broker_and_this_worker(start_server, redis_server, broker):
    env = {"REDIS_URL": redis_server.url} if broker == "redis" else {}
    srv = start_server(**env)
    with srv.connect("bob"):
        # A worker just booted says "degraded" until its Redis subscription and first heartbeat are up
        # (it cannot hear other workers' broadcasts yet): a few milliseconds after it starts answering.
        health = wait_for(lambda: (h := srv.health())["clients"] == 1 and h["broker"]["state"] == "ok" and h)
        assert health["broker"]["kind"] == broker and health["broker"]["state"] == "ok"
        assert health["status"] == "ok" and health["worker"]["clients"] == 1
        assert health["worker"]["pid"] == health["pid"]
        assert [(m["clients"], m["pid"]) for m in health["cluster"]] == [(1, health["pid"])]


def test_a_stopped_worker_is_reported_missing_within_the_reply_timeout(start_server, redis_server):
    srv = start_server("-w", "2", REDIS_URL=redis_server.url, REDIS_REPLY_TIMEOUT_MS=2500)
    assert wait_for(lambda: srv.health()["workers"] == 2)
    victim = srv.health()["cluster"][0]["pid"]
    os.kill(victim, signal.SIGSTOP)  # still subscribed on Redis, so it is counted, but it never answers
    try:
        started = time.monotonic()
        result = srv.announce("is anyone there?")  # the stopped worker cannot accept: the other one answers
        waited = time.monotonic() - started
        assert (result["workers"], result["missingWorkers"]) == (1, 1)
        # It waited for the stopped worker the configured 2.5 s (not the 1 s default), then answered.
        assert 2.4 <= waited < 8, waited
    finally:
        os.kill(victim, signal.SIGCONT)
    assert wait_for(lambda: srv.announce("all here")["missingWorkers"] == 0)


def test_two_services_with_their_own_prefix_share_one_redis_without_seeing_each_other(tmp_path, redis_server):
    make_users(tmp_path / "realtime.db")
    services = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        env = {
            "REDIS_URL": redis_server.url,
            "REDIS_PREFIX": f"svc-{name}",
            "REALTIME_DB": str(tmp_path / "realtime.db"),
        }
        services.append(Server(tmp_path / name, env).start())
    svc_a, svc_b = services
    try:
        with (
            svc_a.connect("bob", ["system:announcements"]) as on_a,
            svc_b.connect("bob", ["system:announcements"]) as on_b,
        ):
            result = svc_a.announce("for service a", channels=["system:announcements"])
            assert (result["delivered"], result["workers"], result["missingWorkers"]) == (1, 1, 0)
            assert on_a.expect("ANNOUNCEMENT")["id"] == result["id"]
            assert on_b.nothing_within(0.5)
            assert svc_a.health()["workers"] == 1 and svc_b.health()["workers"] == 1
    finally:
        for srv in services:
            srv.stop()


def test_the_cluster_view_reads_the_set_of_workers_never_scanning_the_keyspace(start_server, redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.mset({f"elsewhere:session:{n}": "x" for n in range(2000)})  # what a busy Redis also holds
    srv = start_server(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    pid = srv.health()["pid"]
    assert wait_for(lambda: [m.decode() for m in client.smembers("relay:workers")])
    # A worker killed outright never leaves the set: its record expires, and the next reader takes it out.
    client.sadd("relay:workers", "ghost-worker")
    client.config_resetstat()
    for _ in range(5):
        health = srv.health()
        assert health["workers"] == 1 and [m["pid"] for m in health["cluster"]] == [pid]
    assert b"ghost-worker" not in client.smembers("relay:workers")
    assert client.info("commandstats").get("cmdstat_scan") is None  # /health cost does not grow with the keyspace
    client.close()


def test_a_control_message_counts_a_worker_whose_listener_is_away_as_missing(redis_server):
    """Redis counts only the listeners subscribed at that instant, and control messages are not kept: a
    disconnect while a worker's listener reconnects never reaches it, and the answer said nothing was
    missing (found by review). Its heartbeat record says it is alive: it is reported missing."""
    import json

    import redis as redis_client

    from relay.redis_broker import RedisBroker

    here = RedisBroker(redis_server.url, worker_id="here", prefix="t", reply_timeout=0.2)
    try:
        raw = redis_client.Redis.from_url(redis_server.url)
        raw.sadd("t:workers", "away")  # alive (its record has not expired), listener reconnecting
        raw.set(here._record_key("away"), json.dumps({"worker": "away", "clients": 3}), px=10_000)
        done = here.control({"kind": "disconnect", "userId": "bob"})
        assert done.missing == 1
    finally:
        here.close()


def test_notify_publishes_a_control_message_nobody_answers_and_waits_for_none(redis_server):
    """For a message nobody needs an answer to (a resumed session's old socket, see Realtime._replace):
    a worker alive by its heartbeat whose listener is away does not hold the sender for the reply timeout."""
    import json

    import redis as redis_client

    from relay.redis_broker import RedisBroker

    here = RedisBroker(redis_server.url, worker_id="here", prefix="t", reply_timeout=2.0)
    raw = redis_client.Redis.from_url(redis_server.url)
    listener = raw.pubsub()
    try:
        raw.sadd("t:workers", "away")  # alive (its record has not expired), and it will never answer
        raw.set(here._record_key("away"), json.dumps({"worker": "away", "clients": 3}), px=10_000)
        listener.subscribe(here.control_channel)
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        started = time.monotonic()
        here.notify({"kind": "replaced", "userId": "bob", "clientId": "c-1"})
        assert time.monotonic() - started < 1.0  # control() would wait the 2 s for "away"
        published = listener.get_message(timeout=5)
        assert json.loads(published["data"]) == {
            "control": {"kind": "replaced", "userId": "bob", "clientId": "c-1"},
            "from": "here",  # no id, no replyTo: the other workers run it and answer nothing
        }
    finally:
        listener.close()
        raw.close()
        here.close()


def test_a_broadcast_stored_but_not_published_is_answered_200_and_reaches_every_worker(
    start_server, redis_server, crowd
):
    """PUBLISH failed after the history took the broadcast: a 503 told the caller nothing was published,
    and a retry sent it again under a new id, while the stored one reached no worker until another
    broadcast came (found by review). Now this worker delivers it and the others read it from the history."""
    import redis as redis_client

    srv = start_server("-w", "2", REDIS_URL=redis_server.url, WS_MAX_CONNECTIONS_PER_USER=1000)
    assert wait_for(lambda: srv.health()["workers"] == 2)
    sockets = crowd.connect(srv, USERS * 10, ["system:announcements"])
    assert wait_for(lambda: len([m for m in srv.health()["cluster"] if m["clients"]]) == 2)  # both hold some
    admin = redis_client.Redis.from_url(redis_server.url)
    admin.execute_command("ACL", "SETUSER", "default", "-publish")  # every other command still works
    try:
        result = srv.announce("stored, not published")
        assert 0 < result["delivered"] < 40 and result["workers"] == 1 and result["missingWorkers"] == 1
        # Said where an operator looks (on the worker that failed to publish; either may answer).
        assert wait_for(lambda: "permission" in (srv.health()["broker"]["lastError"] or "").lower(), timeout=10)
        received = crowd.drain(sockets, quiet=8.0)  # no PUBLISH gets through: the stream follower delivers
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+publish")
    assert [[m["id"] for m in messages] for messages in received] == [[result["id"]]] * 40
