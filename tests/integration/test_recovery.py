"""The delivery guarantee over a real gunicorn: offsets, resume, refusals, restarts, idempotency, last values."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests
from support import Client, Resumer, Server, make_users, sign_in, wait_for

from relay.codes import Close
from relay.recovery import Reason

ANN = "system:announcements"
Q1 = "clinic:clinic-1:queue"


def publish(srv: Server, text: str, key: str | None = None, **flt) -> requests.Response:
    headers = {"Idempotency-Key": key} if key else None
    return srv.broadcast(
        {"message": {"type": "ANNOUNCEMENT", "data": {"message": text}}, "filter": flt}, headers=headers
    )


def sent(srv: Server, text: str, **flt) -> dict:
    response = publish(srv, text, **flt)
    assert response.status_code == 200, response.text
    return response.json()


# -- positions on the wire ----------------------------------------------------------------


def test_offsets_are_on_every_frame_on_connected_and_in_the_answer(server: Server):
    bob = Resumer(server, "bob", [ANN])
    hello = bob.connect()
    assert isinstance(hello["epoch"], str) and isinstance(hello["offset"], int) and "recovered" not in hello
    first, second = sent(server, "one", channels=[ANN]), sent(server, "two", channels=[ANN])
    assert first["epoch"] == hello["epoch"] and second["offset"] > first["offset"] > hello["offset"]
    got = bob.read()
    assert [(m["id"], m["offset"]) for m in got] == [(first["id"], first["offset"]), (second["id"], second["offset"])]
    assert set(got[0]) == {"type", "data", "id", "offset"}
    bob.close()


# -- resume -------------------------------------------------------------------------------


@pytest.fixture
def site(start_server):
    return start_server(WS_CLOSE_TIMEOUT_MS=500)


def test_a_dropped_connection_gets_exactly_what_it_missed_of_every_filter_kind_then_live_ones(site):
    bob = Resumer(site, "bob", [ANN, Q1])
    bob.connect()
    before = sent(site, "before", channels=[ANN])
    bob.read()
    bob.drop()
    missed = [
        sent(site, "to everyone"),
        sent(site, "by channel", channels=[Q1]),
        sent(site, "by user", userIds=["bob"]),
        sent(site, "by clinic", clinicIds=["clinic-1"]),
        sent(site, "by role", roles=["sales_staff"]),
        sent(site, "by channel and clinic", channels=[ANN], clinicIds=["clinic-1"]),
    ]
    not_for_bob = [
        sent(site, "other user", userIds=["carol"]),
        sent(site, "other clinic", clinicIds=["clinic-2"]),
        sent(site, "other role", roles=["admin"]),
        sent(site, "a channel bob does not hold", channels=["system:maintenance"]),
    ]
    hello = bob.connect()
    assert hello["recovered"] is True and sorted(hello["channels"]) == sorted([ANN, Q1])
    live = sent(site, "live after the resume", channels=[ANN])
    got = bob.read()
    assert [m["id"] for m in got] == [m["id"] for m in missed] + [live["id"]]  # all, in order, nothing else
    assert [m["offset"] for m in got] == sorted(m["offset"] for m in got)
    assert not {m["id"] for m in not_for_bob} & set(bob.ids)
    assert bob.ids.count(before["id"]) == 1  # nothing from before the drop came twice
    assert site.health()["recoveries"]["recovered"] == 1
    bob.close()


def test_the_restored_channels_are_subscribed_again_without_asking(site):
    bob = Resumer(site, "bob", [Q1])
    bob.connect()
    bob.drop()
    bob.channels = []  # the helper would subscribe after a resume that failed: it must not be needed
    hello = bob.connect()
    assert hello["recovered"] is True and hello["channels"] == [Q1]
    bob.ws.send('{"type": "PING"}')
    result = sent(site, "queue moved", channels=[Q1])
    assert result["delivered"] == 1 and bob.read()[-1]["id"] == result["id"]
    bob.close()


def test_a_channel_the_restored_list_lacks_asked_since_the_resume_position_gets_only_what_it_adds(site):
    """A channel subscribed just before the socket ended can be missing from the restored list (its change
    not saved yet when the client came back on another worker: found by review). Asked `since` the position
    the client resumed from, it is replayed what it adds after it, and nothing the resume's replay brought
    comes again (the socket's replay counted from CONNECTED's offset, and repeated those)."""
    bob = Resumer(site, "bob", [ANN])
    bob.connect()
    resumed_from = bob.offset
    bob.drop()
    missed = sent(site, "while away")
    queue = sent(site, "queue moved", channels=[Q1])
    bob.channels = []
    hello = bob.connect()
    assert hello["recovered"] is True and hello["channels"] == [ANN]
    since = {"epoch": bob.epoch, "offset": resumed_from}
    bob.ws.send(json.dumps({"type": "SUBSCRIBE", "data": {"channels": [Q1], "since": since}}))
    answer = bob._until("SUBSCRIBED")["data"]
    assert answer["recovered"] is True and answer["channels"] == [Q1]
    assert bob.ids == [missed["id"], queue["id"]]  # the resume's replay, then what the channel adds
    assert bob.read(quiet=0.3) == []
    bob.close()


def test_a_resume_reauthorizes_channels_for_the_user_as_they_are_now(site):
    """Moved to another clinic while away: the old clinic's channel is refused, and none of its missed
    broadcasts are replayed; what the user may still read is restored and replayed."""
    from support import flask_cli

    bob = Resumer(site, "bob", [ANN, Q1])
    bob.connect()
    bob.drop()
    moved = flask_cli(site, "users", "set-clinic", "bob", "clinic-2")
    assert moved.returncode == 0, moved.stderr
    old_queue = sent(site, "clinic 1 queue", channels=[Q1])
    old_clinic = sent(site, "clinic 1 staff", clinicIds=["clinic-1"])
    new_clinic = sent(site, "clinic 2 staff", clinicIds=["clinic-2"])
    announcement = sent(site, "for everyone", channels=[ANN])
    bob.channels = []
    hello = bob.connect()
    assert hello["recovered"] is True and hello["channels"] == [ANN] and hello["refused"] == [Q1]
    frames = []
    try:
        while True:
            frames.append(json.loads(bob.ws.recv(timeout=0.5)))
    except TimeoutError:
        pass
    errors = [f["data"] for f in frames if f["type"] == "ERROR"]
    assert errors == [{"code": "forbidden_channel", "message": errors[0]["message"], "channel": Q1}]
    replayed = [f["id"] for f in frames if "offset" in f]
    assert replayed == [new_clinic["id"], announcement["id"]]
    assert old_queue["id"] not in replayed and old_clinic["id"] not in replayed
    bob.close()


def test_another_users_session_is_never_restored(site):
    bob = Resumer(site, "bob", [Q1])
    bob.connect()
    bob.drop()
    thief = bob.at_its_place(user_id="carol")  # carol, holding bob's client id, epoch and offset
    sent(site, "for clinic 1", channels=[Q1])
    hello = thief.connect()
    assert (hello["recovered"], hello["reason"]) == (False, Reason.NO_SESSION)
    assert thief.read(quiet=0.3) == []
    assert bob.connect()["recovered"] is True  # still bob's to resume
    thief.close()
    bob.close()


@pytest.mark.parametrize(
    "params,reason",
    [
        ({"epoch": "not-this-epoch"}, Reason.EPOCH),
        ({"offset": "-1"}, Reason.INVALID),
        ({"offset": "99999999"}, Reason.INVALID),
        ({"offset": "\u00b2"}, Reason.INVALID),  # a digit to str.isdigit(), not to int(): was a 1006, no answer
        ({"resume": "00000000-0000-4000-8000-000000000000"}, Reason.NO_SESSION),
        ({"resume": "not a client id"}, Reason.INVALID),
    ],
    ids=["wrong-epoch", "bad-offset", "future-offset", "superscript-offset", "unknown-session", "bad-session"],
)
def test_a_resume_that_cannot_be_honoured_says_why_and_restores_nothing(site, params, reason):
    bob = Resumer(site, "bob", [ANN])
    bob.connect()
    bob.drop()
    site.wait_clients(0)
    bob.channels = []  # this time, do not subscribe again: see that the server restored nothing
    hello = bob.connect(**params)
    assert hello["recovered"] is False and hello["reason"] == reason and "channels" not in hello
    assert sent(site, "nobody subscribed", channels=[ANN])["delivered"] == 0  # nothing was restored
    assert site.health()["recoveries"]["notRecovered"][reason] == 1
    bob.close()


def test_too_many_missed_is_not_recovered(start_server):
    srv = start_server(WS_RECOVERY_MAX_MESSAGES=3)
    bob = Resumer(srv, "bob", [ANN])
    bob.connect()
    bob.drop()
    for n in range(4):
        sent(srv, f"missed {n}", channels=[ANN])
    assert bob.connect()["reason"] == Reason.TOO_MANY
    bob.drop()
    for n in range(3):
        sent(srv, f"missed again {n}", channels=[ANN])
    assert bob.connect()["recovered"] is True and len(bob.read()) == 3  # three is still fine
    bob.close()


def test_after_the_window_the_session_is_gone(start_server):
    srv = start_server(WS_RECOVERY_WINDOW_MS=1500)
    bob = Resumer(srv, "bob", [ANN])
    bob.connect()
    bob.drop()
    sent(srv, "missed", channels=[ANN])
    time.sleep(2.5)
    assert bob.connect()["reason"] == Reason.NO_SESSION


def test_a_resumed_session_cannot_be_resumed_twice(site):
    bob = Resumer(site, "bob", [ANN])
    bob.connect()
    twin = bob.at_its_place()
    bob.drop()
    assert bob.connect()["recovered"] is True
    assert wait_for(lambda: saved(site))  # the keeper has forgotten the resumed session
    assert twin.connect()["reason"] == Reason.NO_SESSION
    twin.close()
    bob.close()


def back_while_the_old_socket_is_open(srv: Server, first: Resumer) -> tuple[Client, Resumer]:
    """``first``'s network died unnoticed: it comes back to ``srv`` while the server still holds its
    old socket open. The old socket (as a Client) and the client now on the new one."""
    return Client(first.ws), first.at_its_place(srv)


def saved(srv: Server) -> bool:
    """Whether the server's session keeper has taken every change it had to write (every 0.25 s; a resume
    waits briefly for a write under way, ``Recovery.session_wait``)."""
    return srv.health()["stream"]["sessions"]["pending"] == 0


def resumed_again(srv: Server, first: Resumer) -> dict:
    """A second resume of the session ``first`` had when it last connected: CONNECTED's data."""
    twin = first.at_its_place(srv)
    hello = twin.connect()
    twin.close()
    return hello


def test_a_resume_closes_the_socket_it_comes_back_from_4409(site):
    bob = Resumer(site, "bob", [ANN])
    bob.connect()
    old, again = back_while_the_old_socket_is_open(site, bob)
    assert again.connect()["recovered"] is True
    assert old.closed_with() == (Close.REPLACED, "resumed on another socket")
    assert site.wait_clients(1)["clients"] == 1
    live = sent(site, "after", channels=[ANN])
    assert [m["id"] for m in again.read()] == [live["id"]]
    assert wait_for(lambda: saved(site))
    assert resumed_again(site, bob)["reason"] == Reason.NO_SESSION  # restored once (the keeper's own test: twice)
    again.close()


def test_a_resume_is_admitted_when_the_socket_it_replaces_is_the_users_last_allowed_one(start_server):
    srv = start_server(WS_MAX_CONNECTIONS_PER_USER=1)
    bob = Resumer(srv, "bob", [ANN])
    bob.connect()
    old, again = back_while_the_old_socket_is_open(srv, bob)
    assert again.connect()["recovered"] is True  # not 4429: the old socket is on its way out
    assert old.closed_with()[0] == Close.REPLACED
    with srv.open(srv.token("bob")) as third:  # but a second socket beside it is one too many
        assert third.closed_with()[0] == Close.TOO_MANY_CONNECTIONS
    again.close()


def test_a_resume_on_another_instance_closes_the_socket_the_first_still_holds(pair):
    host_a, host_b = pair
    bob = Resumer(host_a, "bob", [ANN])
    bob.connect()
    assert wait_for(lambda: saved(host_a))  # the session is on its way to Redis, as open
    old, again = back_while_the_old_socket_is_open(host_b, bob)
    assert again.connect()["recovered"] is True
    assert old.closed_with() == (Close.REPLACED, "resumed on another socket")
    assert wait_for(lambda: saved(host_a) and saved(host_b))
    assert resumed_again(host_a, bob)["reason"] == Reason.NO_SESSION  # (deterministically: test_admission)
    again.close()


def test_a_user_at_the_limit_comes_back_on_another_instance_while_the_first_still_holds_their_socket(pairs):
    """The old socket counted toward the limit there (as of the last heartbeat), and kept the user out with
    4429 until its keep-alive ended it, up to a minute: it is told to close instead, and not counted."""
    host_a, host_b = pairs(WS_CLOSE_TIMEOUT_MS=500, WS_MAX_CONNECTIONS_PER_USER=1, REDIS_HEARTBEAT_MS=200)
    bob = Resumer(host_a, "bob", [ANN])
    bob.connect()
    pid_a = host_a.health()["pid"]
    assert wait_for(lambda: any(m["pid"] == pid_a and m["clients"] == 1 for m in host_b.health()["cluster"]))
    time.sleep(0.5)  # and host b has counted it in its next heartbeats (every 0.2 s)
    with host_b.open(host_b.token("bob")) as beside:  # a second socket is refused there
        assert beside.closed_with()[0] == Close.TOO_MANY_CONNECTIONS
    assert wait_for(lambda: saved(host_a))
    old, again = back_while_the_old_socket_is_open(host_b, bob)
    assert again.connect()["recovered"] is True
    assert old.closed_with() == (Close.REPLACED, "resumed on another socket")
    again.close()


def test_resume_across_a_sighup_reload(site):
    bob = Resumer(site, "bob", [ANN])
    bob.connect()
    old_pid = site.health()["pid"]
    site.proc.send_signal(signal.SIGHUP)
    sent_during, while_away = [], []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = publish(site, f"during the reload {len(sent_during)}", channels=[ANN])
        if response.status_code == 200:
            sent_during.append(response.json()["id"])
            if response.json()["delivered"] == 0:
                while_away.append(response.json()["id"])  # bob's socket was gone: only a replay brings it
        if site.health()["pid"] != old_pid and len(while_away) >= 2:
            break
        time.sleep(0.05)
    assert len(while_away) >= 2, "no broadcast was sent while bob was away: the test proves nothing"
    bob.read(quiet=0.2)  # whatever the old worker delivered before it closed with 1012
    hello = wait_for(lambda: _resumed(bob), timeout=20)
    assert hello["recovered"] is True
    bob.read()
    assert [i for i in bob.ids if i in sent_during] == sent_during  # every one, once, in order
    assert set(while_away) <= set(bob.ids)
    bob.close()


def _resumed(client: Resumer):
    try:
        hello = client.connect()
    except Exception:
        return None
    if hello.get("recovered") is False:
        raise AssertionError(f"not recovered: {hello}")
    return hello


def test_resume_across_sigterm_and_a_new_start_on_the_same_data(site):
    bob = Resumer(site, "bob", [ANN, Q1])
    bob.connect()
    sent(site, "before the stop", channels=[ANN])
    bob.read()
    assert site.stop() == 0
    bob.ws.close()
    again = Server(site.workdir, site.env_overrides, port=site.port).start()
    try:
        missed = [sent(again, "after the restart", channels=[Q1]), sent(again, "and another", userIds=["bob"])]
        hello = bob.connect()
        assert hello["recovered"] is True and sorted(hello["channels"]) == sorted([ANN, Q1])
        assert [m["id"] for m in bob.read()] == [m["id"] for m in missed]
    finally:
        bob.close()
        again.stop()


# -- with Redis: another instance, a killed worker, a Redis that lost its data -----------------


@pytest.fixture
def pairs(tmp_path, redis_server):
    """``pairs(**env)``: two instances (hosts) sharing one Redis and one identity store."""
    make_users(tmp_path / "realtime.db")
    servers = []

    def start(**env):
        shared = {"REDIS_URL": redis_server.url, "REALTIME_DB": str(tmp_path / "realtime.db"), **env}
        started = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            started.append(Server(tmp_path / name, shared).start())
            servers.append(started[-1])
        return started

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def pair(pairs):
    return pairs(WS_CLOSE_TIMEOUT_MS=500)


def test_resume_on_another_instance_after_the_first_was_killed(pair):
    host_a, host_b = pair
    bob = Resumer(host_a, "bob", [ANN])
    bob.connect()
    assert wait_for(lambda: saved(host_a))  # the session keeper has written the session
    first = sent(host_b, "before the kill", channels=[ANN])
    assert bob.read()[-1]["id"] == first["id"]
    os.kill(host_a.health()["pid"], signal.SIGKILL)
    missed = [sent(host_b, f"while bob was away {n}", channels=[ANN]) for n in range(3)]
    bob.srv = host_b  # the load balancer sends it elsewhere
    hello = bob.connect()
    assert hello["recovered"] is True and hello["channels"] == [ANN]
    assert [m["id"] for m in bob.read()] == [m["id"] for m in missed]
    bob.close()


def test_a_redis_that_lost_its_data_starts_a_new_epoch_and_nobody_is_replayed_wrongly(start_server, redis_server):
    srv = start_server(REDIS_URL=redis_server.url, REDIS_HEARTBEAT_MS=200)
    bob = Resumer(srv, "bob", [ANN])
    old = bob.connect()
    sent(srv, "before", channels=[ANN])
    bob.read()
    redis_server.kill()
    redis_server.start()  # empty: no persistence
    assert wait_for(lambda: publish(srv, "first of the new stream", channels=[ANN]).status_code == 200, timeout=20)
    # The worker saw a new epoch: its clients are told to reconnect, and cannot resume the old stream.
    bob.channels = []  # no SUBSCRIBE from the helper: whatever arrives after CONNECTED is the server's own
    hello = wait_for(lambda: _reconnect(bob), timeout=20)
    assert (hello["recovered"], hello["reason"]) == (False, Reason.EPOCH)
    assert hello["epoch"] != old["epoch"] and "channels" not in hello
    assert bob.read(quiet=0.5) == []  # nothing replayed after CONNECTED
    bob.close()


def _reconnect(client: Resumer):
    try:
        client.read(quiet=0.2)
        return client.connect()
    except Exception:
        return None


# -- retry-safe publishing ------------------------------------------------------------------------


def test_a_repeat_with_the_same_key_publishes_nothing_and_gets_the_first_answer(server: Server):
    bob = Resumer(server, "bob", [ANN])
    bob.connect()
    first = publish(server, "once", key="order-42", channels=[ANN])
    again = publish(server, "once", key="order-42", channels=[ANN])
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert [m["data"]["message"] for m in bob.read()] == ["once"]
    bob.close()


def test_a_key_reused_for_another_broadcast_is_refused(server: Server):
    assert publish(server, "one thing", key="reused-1").status_code == 200
    conflict = publish(server, "another thing", key="reused-1")
    assert conflict.status_code == 422 and conflict.json()["error"]["code"] == "idempotency_conflict"


@pytest.mark.parametrize("key", ["has space", "x" * 201, "ünïcode"])
def test_a_malformed_key_is_refused(server: Server, key):
    response = publish(server, "x", key=key)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_idempotency_key"


def test_a_key_holds_across_instances(pair):
    host_a, host_b = pair
    with host_a.connect("bob", [ANN]) as bob:
        first = publish(host_a, "exactly once", key="k-across", channels=[ANN]).json()
        again = publish(host_b, "exactly once", key="k-across", channels=[ANN]).json()
        assert again == first and first["delivered"] == 1
        bob.expect("ANNOUNCEMENT")
        assert bob.nothing_within(0.5)


def test_the_admin_api_takes_a_key_too_and_answers_the_stream_position(server: Server):
    from support import csrf_of, sign_in

    admin = sign_in(server, "alice@example.test")
    token = csrf_of(admin.get(server.url + "/admin/broadcast", timeout=5).text)
    bob = Resumer(server, "bob", [ANN])
    bob.connect()

    def post():
        return admin.post(
            server.url + "/api/admin/broadcast",
            json={"message": {"type": "ANNOUNCEMENT", "data": {"message": "from the api"}}, "filter": {}},
            headers={"X-CSRF-Token": token, "Idempotency-Key": "admin-order-7"},
            timeout=5,
        )

    first, again = post(), post()
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert isinstance(first.json()["offset"], int) and first.json()["epoch"] == bob.epoch
    assert [m["id"] for m in bob.read()] == [first.json()["id"]]
    bob.close()


def test_a_key_is_forgotten_after_the_window(start_server):
    srv = start_server(WS_RECOVERY_WINDOW_MS=1000)
    first = publish(srv, "once", key="short-lived").json()
    assert publish(srv, "once", key="short-lived").json()["id"] == first["id"]
    # After the window (and the next trim) the key is free again: the same call publishes anew.
    assert wait_for(lambda: publish(srv, "once", key="short-lived").json()["id"] != first["id"], timeout=15)


def test_replayed_frames_are_identical_to_the_live_ones(site):
    erin = Resumer(site, "erin", [ANN, Q1])  # same clinic, same channels: she gets them live
    erin.connect()
    bob = Resumer(site, "bob", [ANN, Q1])
    bob.connect()
    bob.drop()
    site.wait_clients(1)
    sent(site, "queue", channels=[Q1])
    site.broadcast({"message": {"type": "QUEUE_UPDATE", "data": {"queue": [{"number": 1}], "é": None}}, "filter": {}})
    sent(site, "clinic", clinicIds=["clinic-1"])
    live = erin.read()
    assert bob.connect()["recovered"] is True
    assert bob.read() == live and len(live) == 3
    erin.close()
    bob.close()


def test_a_broadcast_answered_200_survives_the_worker_being_killed_at_once(site):
    bob = Resumer(site, "bob", [ANN])
    bob.connect()
    bob.drop()
    site.wait_clients(0)
    assert wait_for(lambda: saved(site))  # the session keeper has written the session
    old = site.health()["pid"]
    answer = sent(site, "written before the answer", channels=[ANN])
    os.kill(old, signal.SIGKILL)  # the instant after the 200
    assert wait_for(lambda: _pid_or_none(site) not in (None, old), timeout=30)
    hello = bob.connect()
    assert hello["recovered"] is True
    assert [m["id"] for m in bob.read()] == [answer["id"]]
    bob.close()


def _pid_or_none(srv: Server):
    try:
        return srv.health()["pid"]
    except Exception:
        return None


def test_a_session_survives_a_keep_alive_timeout(start_server):
    from rawws import RawClient

    srv = start_server(WS_PING_INTERVAL_MS=200, WS_CLOSE_TIMEOUT_MS=200)
    silent = RawClient(srv.port, srv.token("bob"))  # answers no ping

    def next_text():
        while True:
            opcode, payload = silent.read_frame()
            if opcode == 0x1:
                return json.loads(payload)

    hello = next_text()["data"]
    silent.send_json({"type": "SUBSCRIBE", "data": {"channels": [ANN]}})
    assert next_text()["type"] == "SUBSCRIBED"
    assert silent.close_code() == 4408
    silent.sock.close()
    missed = sent(srv, "while it was silent", channels=[ANN])
    bob = Resumer(srv, "bob")
    bob.client_id, bob.epoch, bob.offset = hello["clientId"], hello["epoch"], hello["offset"]
    assert bob.connect()["recovered"] is True
    assert [m["id"] for m in bob.read()] == [missed["id"]]
    bob.close()


# -- the last value of a channel ----------------------------------------------------------------


def test_last_values_asked_for_not_asked_for_and_filtered_out(site):
    sent(site, "old queue", channels=[Q1])
    newest = sent(site, "current queue", channels=[Q1])
    sent(site, "for carol only", channels=["clinic:clinic-2:queue"])
    with site.connect("bob") as bob:
        bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1, ANN], "last": True}})
        last = bob.expect("ANNOUNCEMENT")
        assert last == {
            "type": "ANNOUNCEMENT",
            "data": {"message": "current queue"},
            "id": newest["id"],
            "offset": newest["offset"],
            "last": True,
        }
        assert bob.expect("SUBSCRIBED")["data"]["channels"] == [Q1, ANN]
        # Already held: the last value again (the page's second subscriber of the channel asks for it).
        bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
        assert bob.expect("ANNOUNCEMENT") == last and bob.expect("SUBSCRIBED")["data"]["channels"] == [Q1]
        bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1]}})  # held, and no last asked for: none
        assert bob.expect("SUBSCRIBED") and bob.nothing_within(0.3)
    with site.connect("erin") as erin:
        erin.send({"type": "SUBSCRIBE", "data": {"channels": [Q1]}})  # not asked for
        assert erin.expect("SUBSCRIBED") and erin.nothing_within(0.3)
    sent(site, "admins only", channels=[Q1], roles=["admin"])
    with site.connect("bob") as bob:  # the newest one is not meant for bob: the newest that was, as he saw it
        bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
        assert bob.expect("ANNOUNCEMENT")["id"] == newest["id"]
        assert bob.expect("SUBSCRIBED") and bob.nothing_within(0.3)
    with site.connect("alice") as alice:  # an admin
        alice.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
        assert alice.expect("ANNOUNCEMENT")["data"] == {"message": "admins only"}


def test_a_broadcast_to_one_subscriber_of_a_channel_leaves_the_others_last_value(site):
    """An operator's smoke test sent to its own user on a clinic's queue emptied the queue on every
    screen reloaded after it: the channel kept one last value, and it was not meant for them."""
    queue = sent(site, "the queue", channels=[Q1])
    smoke = sent(site, "smoke", channels=[Q1], userIds=["bob"])
    with site.connect("erin") as erin:
        erin.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
        assert erin.expect("ANNOUNCEMENT")["id"] == queue["id"]
    with site.connect("bob") as bob:  # bob's own is the newest he would have seen
        bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
        assert bob.expect("ANNOUNCEMENT")["id"] == smoke["id"]


def test_the_queue_page_renders_the_queue_after_a_broadcast_to_one_of_its_subscribers(site):
    body = {"type": "QUEUE_UPDATE", "data": {"queue": [{"number": 12, "name": "Somchai"}]}}
    assert site.broadcast({"message": body, "filter": {"channels": [Q1]}}).status_code == 200
    smoke = {"message": {"type": "SMOKE_TEST", "data": {}}, "filter": {"channels": [Q1], "userIds": ["bob"]}}
    assert site.broadcast(smoke).status_code == 200
    for who in ("erin", "bob"):  # bob too, whose own newest on the channel is the smoke test's message
        page = sign_in(site, who).get(site.url + "/clinics/clinic-1/queue", timeout=10)
        assert page.status_code == 200 and "Somchai" in page.text, who


def test_last_values_survive_a_restart(site):
    newest = sent(site, "queue before the restart", channels=[Q1])
    site.stop()
    again = Server(site.workdir, site.env_overrides, port=site.port).start()
    try:
        with again.connect("bob") as bob:
            bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
            assert bob.expect("ANNOUNCEMENT")["id"] == newest["id"]
    finally:
        again.stop()


def test_messages_behind_a_last_value_request_are_answered_in_order(site):
    sent(site, "queue", channels=[Q1])
    with site.connect("bob") as bob:
        bob.send({"type": "SUBSCRIBE", "data": {"channels": [Q1], "last": True}})
        bob.send({"type": "UNSUBSCRIBE", "data": {"channels": [Q1]}})
        assert [bob.recv()["type"] for _ in range(3)] == ["ANNOUNCEMENT", "SUBSCRIBED", "UNSUBSCRIBED"]
        assert sent(site, "after", channels=[Q1])["delivered"] == 0  # the unsubscribe came last, and won


# -- off ----------------------------------------------------------------------------------------


def test_with_recovery_off_there_are_no_offsets_and_resume_says_so(start_server):
    srv = start_server(WS_RECOVERY_WINDOW_MS=0)
    bob = Resumer(srv, "bob", [ANN])
    hello = bob.connect()
    assert "epoch" not in hello and "offset" not in hello
    answer = sent(srv, "plain", channels=[ANN])
    assert "offset" not in answer
    assert "offset" not in bob.ws.recv(timeout=5)
    bob.drop()
    assert bob.connect(resuming=False, resume=bob.client_id, epoch="x", offset=0)["reason"] == Reason.DISABLED
    assert srv.health()["stream"] == {"enabled": False}
    bob.close()


def test_health_reports_the_stream(server: Server):
    sent(server, "counted")
    # The embedded history's counts are taken at most once a second: a server just started shows 0 first.
    stream = wait_for(lambda: (s := server.health()["stream"])["retained"] >= 1 and s, timeout=5)
    assert stream["enabled"] is True and stream["kind"] == "sqlite" and stream["head"] >= 1
    assert stream["retained"] >= 1 and stream["oldest"]["offset"] >= 1 and stream["delivered"] == stream["head"]
    assert stream["windowMs"] == 120_000


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_subscribe_since_replays_what_the_page_missed_and_a_last_value_only_if_the_replay_does_not(
    start_server, request, broker
):
    """A page rendered at a position subscribes ``since`` it: what its channels got after it is
    replayed before SUBSCRIBED; a last value the replay brings comes once, in its place, not also as
    a last value ahead of older frames."""
    env = {"REDIS_URL": request.getfixturevalue("redis_server").url} if broker == "redis" else {}
    srv = start_server(**env)
    channel = "clinic:clinic-1:queue"

    def update(n: int) -> dict:
        body = {"message": {"type": "QUEUE_UPDATE", "data": {"n": n}}, "filter": {"channels": [channel]}}
        answer = srv.broadcast(body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    first, second = update(1), update(2)
    with srv.connect("bob") as client:
        epoch = client.hello["epoch"]
        since = {"epoch": epoch, "offset": first["offset"]}  # rendered between the two
        client.send({"type": "SUBSCRIBE", "data": {"channels": [channel], "last": True, "since": since}})
        replayed = client.recv()
        assert replayed["id"] == second["id"] and "last" not in replayed  # once, as the broadcast it was
        answer = client.expect("SUBSCRIBED")["data"]
        assert answer == {"channels": [channel], "recovered": True, "epoch": epoch, "offset": second["offset"]}
    with srv.connect("bob") as client:
        since = {"epoch": client.hello["epoch"], "offset": second["offset"]}  # rendered after both
        client.send({"type": "SUBSCRIBE", "data": {"channels": [channel], "last": True, "since": since}})
        last = client.recv()
        assert last["id"] == second["id"] and last["last"] is True  # nothing to replay: the last value
        assert client.expect("SUBSCRIBED")["data"]["recovered"] is True
        third = update(3)
        assert client.recv()["id"] == third["id"]  # then live
    with srv.connect("bob") as client:
        client.send({"type": "SUBSCRIBE", "data": {"channels": [channel], "since": {"epoch": "gone", "offset": 0}}})
        answer = client.expect("SUBSCRIBED")["data"]
        assert answer["recovered"] is False and answer["reason"] == Reason.EPOCH


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_subscribe_since_a_render_from_before_a_reload_is_replayed_by_the_new_worker(start_server, request, broker):
    """A page rendered on the old worker whose socket reaches the new one: that worker's recent window
    begins at its start, after the render. What was broadcast in between is read back from the history
    and replayed (it used to be refused, history_gone, and every such page refetched)."""
    env = {"REDIS_URL": request.getfixturevalue("redis_server").url} if broker == "redis" else {}
    srv = start_server(**env)
    channel = "clinic:clinic-1:alerts"
    with srv.connect("bob") as client:
        rendered = {"epoch": client.hello["epoch"], "offset": client.hello["offset"]}
    body = {"message": {"type": "CLINIC_ALERT", "data": {"message": "Room 3"}}, "filter": {"channels": [channel]}}
    alert = srv.broadcast(body).json()
    old = srv.health()["pid"]
    srv.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: srv.health()["pid"] != old, timeout=30)
    assert wait_for(lambda: not os.path.exists(f"/proc/{old}"), timeout=30)  # no socket lands on its drain
    with srv.connect("bob") as client:
        assert client.hello["offset"] >= alert["offset"]  # the new worker began after the alert
        client.send({"type": "SUBSCRIBE", "data": {"channels": [channel], "since": rendered}})
        assert client.recv()["id"] == alert["id"]
        assert client.expect("SUBSCRIBED")["data"]["recovered"] is True
