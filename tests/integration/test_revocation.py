"""Access follows the user onto open sockets: disabled, moved, changed elsewhere, disconnected by an admin."""

from __future__ import annotations

import sqlite3
import time

import pytest
import requests
from support import ADMIN_SECRET, Server, flask_cli, make_users, wait_for

from relay.codes import Close, Error

Q1, Q2 = "clinic:clinic-1:queue", "clinic:clinic-2:queue"


def users_cli(srv: Server, *args: str) -> None:
    """``flask users ...`` in another process, as an operator would run it."""
    done = flask_cli(srv, "users", *args)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def site(start_server):
    return start_server(WS_IDENTITY_RECHECK_MS=60_000)  # the change log alone must be enough here


def test_a_user_disabled_with_the_cli_is_closed_4403_within_seconds(site):
    with site.connect("bob", [Q1]) as bob, site.connect("carol", [Q2]) as carol:
        users_cli(site, "disable", "bob")
        # The change log is polled every second; without it only the re-check would close it, at 60 s.
        assert bob.closed_with(timeout=5) == (Close.FORBIDDEN, "user disabled")
        carol.send({"type": "PING"})
        assert carol.expect("PONG")  # nobody else was touched
    site.wait_for_event("ws.revoked", lambda e: e["userId"] == "bob")


def test_a_clinic_change_drops_the_old_clinic_at_once_and_filters_use_the_new_one(site):
    with site.connect("bob", [Q1, "system:announcements"]) as bob:
        users_cli(site, "set-clinic", "bob", "clinic-2")
        error = bob.expect("ERROR", timeout=5)
        assert error["data"] == {"code": Error.FORBIDDEN_CHANNEL, "message": error["data"]["message"], "channel": Q1}
        assert bob.expect("UNSUBSCRIBED")["data"]["channels"] == [Q1]
        old = site.broadcast({"message": {"type": "Q", "data": {}}, "filter": {"channels": [Q1]}}).json()
        by_clinic = site.broadcast({"message": {"type": "Q", "data": {}}, "filter": {"clinicIds": ["clinic-1"]}}).json()
        assert old["delivered"] == 0 and by_clinic["delivered"] == 0
        new = site.broadcast({"message": {"type": "Q2", "data": {}}, "filter": {"clinicIds": ["clinic-2"]}}).json()
        assert new["delivered"] == 1 and bob.expect("Q2")["id"] == new["id"]
        assert bob.subscribe([Q2])["data"]["channels"] == [Q2]  # the new clinic is open to him
        assert site.health()["byClinic"] == {"clinic-2": 1}


def test_a_role_change_moves_the_role_filter_at_once(site):
    with site.connect("erin") as erin:
        users_cli(site, "set-role", "erin", "doctor")
        assert wait_for(lambda: site.health()["byRole"] == {"doctor": 1}, timeout=5)
        to_nurses = site.broadcast({"message": {"type": "R", "data": {}}, "filter": {"roles": ["nurse"]}}).json()
        to_doctors = site.broadcast({"message": {"type": "R", "data": {}}, "filter": {"roles": ["doctor"]}}).json()
        assert (to_nurses["delivered"], to_doctors["delivered"]) == (0, 1)
        erin.expect("R")


def test_an_admin_demoted_to_staff_loses_the_channels_only_admins_may_read(site):
    with site.connect("alice", [Q2, "system:announcements"]) as alice:
        users_cli(site, "set-role", "alice", "sales_staff")
        users_cli(site, "set-clinic", "alice", "clinic-1")
        dropped = []
        for _ in range(4):
            message = alice.recv(timeout=5)
            if message["type"] == "ERROR":
                assert message["data"]["code"] == Error.FORBIDDEN_CHANNEL
                dropped.append(message["data"]["channel"])
            elif message["type"] == "UNSUBSCRIBED":
                assert message["data"]["channels"] == [Q2]
                break
        assert dropped == [Q2]
        sent = site.broadcast({"message": {"type": "Q", "data": {}}, "filter": {"channels": [Q2]}}).json()
        assert sent["delivered"] == 0
        kept = site.broadcast({"message": {"type": "A", "data": {}}, "filter": {"channels": ["system:announcements"]}})
        assert kept.json()["delivered"] == 1 and alice.expect("A")


def test_a_change_written_by_another_program_is_found_by_the_recheck(start_server):
    srv = start_server(WS_IDENTITY_RECHECK_MS=800)
    time.sleep(2)  # two rounds with nobody to re-check: no line (at INFO) for them
    with srv.connect("carol") as carol:
        with sqlite3.connect(srv.env["REALTIME_DB"]) as db:  # behind the service's back: no change log
            db.execute("UPDATE users SET active = 0 WHERE id = 'carol'")
        # at the next re-check (every 0.8 s); the timeout only stops a hang
        assert carol.closed_with(timeout=15)[0] == Close.FORBIDDEN
    srv.wait_for_event("identity.rechecked")
    assert [e["users"] for e in srv.log_events("identity.rechecked")][:1] == [1]  # the first: carol's round


def test_an_admin_can_disconnect_a_user_everywhere(tmp_path, redis_server):
    make_users(tmp_path / "realtime.db")
    shared = {"REDIS_URL": redis_server.url, "REALTIME_DB": str(tmp_path / "realtime.db")}
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(Server(tmp_path / name, shared).start())
    host_a, host_b = servers
    try:
        on_a, on_b, other = host_a.connect("bob"), host_b.connect("bob"), host_b.connect("carol")
        url = host_a.url + "/api/users/bob/disconnect"
        assert requests.post(url, timeout=5).status_code == 401  # the admin secret, as for /broadcast
        done = requests.post(url, headers={"Authorization": f"Bearer {ADMIN_SECRET}"}, timeout=10).json()
        assert done == {"ok": True, "userId": "bob", "disconnected": 2, "workers": 2, "missingWorkers": 0}
        for socket in (on_a, on_b):
            assert socket.closed_with() == (Close.FORBIDDEN, "disconnected by an administrator")
        other.send({"type": "PING"})
        assert other.expect("PONG")
        bad = requests.post(host_a.url + "/api/users/a%20b/disconnect", headers={"X-Admin-Secret": ADMIN_SECRET})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_body"
        other.close()
    finally:
        for srv in servers:
            srv.stop()


def test_a_disconnect_a_host_did_not_hear_closes_its_sockets_at_its_recheck_and_no_later_ones(tmp_path, redis_server):
    """The close of a disconnect reaches the hosts listening then: one whose Redis listener was
    reconnecting never heard it, and the user's sockets there stayed open (the answer said
    `missingWorkers`, call again). The disconnect is recorded in the sign-out store, and that host
    closes them at its next identity re-check; a socket the user opened since stays."""
    import redis as redis_client

    make_users(tmp_path / "realtime.db")
    shared = {
        "REDIS_URL": redis_server.url,
        "REALTIME_DB": str(tmp_path / "realtime.db"),
        "WS_IDENTITY_RECHECK_MS": "1000",
    }
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(Server(tmp_path / name, shared).start())
    host_a, host_b = servers
    admin = redis_client.Redis.from_url(redis_server.url)
    try:
        on_a, on_b, other = host_a.connect("bob"), host_b.connect("bob"), host_b.connect("carol")
        # Every listener cut off, and kept off: nobody hears a control message until SUBSCRIBE is back.
        admin.execute_command("ACL", "SETUSER", "default", "-subscribe")
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert wait_for(lambda: host_b.health()["broker"]["state"] != "ok", timeout=10)
        done = requests.post(
            host_a.url + "/api/users/bob/disconnect", headers={"Authorization": f"Bearer {ADMIN_SECRET}"}, timeout=10
        ).json()
        assert (done["disconnected"], done["missingWorkers"]) == (1, 1)  # host a's own; b did not answer
        assert on_a.closed_with() == (Close.FORBIDDEN, "disconnected by an administrator")
        admin.execute_command("ACL", "SETUSER", "default", "+subscribe")
        assert on_b.closed_with(timeout=10) == (Close.FORBIDDEN, "disconnected by an administrator")
        host_b.wait_for_event("ws.revoked", lambda e: e.get("reason") == "disconnected" and e.get("userId") == "bob")
        again = host_b.connect("bob")  # the person came back: a socket opened since the disconnect
        assert host_b.wait_rechecks(2)
        assert again.nothing_within(0.1)  # two re-checks later, still open
        other.send({"type": "PING"})
        assert other.expect("PONG")  # nobody else's
        again.close()
        other.close()
    finally:
        admin.execute_command("ACL", "SETUSER", "default", "+subscribe")
        admin.close()
        for srv in servers:
            srv.stop()


def test_a_user_banned_in_supabase_is_closed_within_the_recheck(start_server):
    from fake_supabase import FakeSupabase

    fake = FakeSupabase().start()
    try:
        nurse = fake.add_user("nurse@clinic.test", profile={"role": "nurse", "clinic_id": "c-7"})
        other = fake.add_user("other@clinic.test", profile={"role": "nurse", "clinic_id": "c-7"})
        srv = start_server(users=False, **fake.site_env(), WS_IDENTITY_RECHECK_MS=800)
        with srv.connect(nurse.id, ["clinic:c-7:queue"]) as banned, srv.connect(other.id) as fine:
            fake.profiles[other.id]["clinic_id"] = "c-9"  # moved, in Supabase
            nurse.banned_until = "2999-01-01T00:00:00Z"  # banned, in Supabase
            assert banned.closed_with(timeout=8)[0] == Close.FORBIDDEN
            assert wait_for(lambda: srv.health()["byClinic"] == {"c-9": 1}, timeout=8)
            fine.send({"type": "PING"})
            assert fine.expect("PONG")
        listed = fake.calls("/auth/v1/admin/users")
        assert any(call.query.get("per_page") == ["1000"] for call in listed)  # listed in pages, not one by one
    finally:
        fake.stop()


def test_a_supabase_recheck_reads_the_user_list_once_not_once_per_batch(start_server, crowd):
    """3,000 users in Supabase, 450 of them connected: one re-check lists three pages of 1,000."""
    from fake_supabase import FakeSupabase

    fake = FakeSupabase().start()
    try:
        nurse = {"role": "nurse", "clinic_id": "c-1"}
        people = [fake.add_user(f"p{n}@clinic.test", profile=dict(nurse)) for n in range(3000)]
        srv = start_server(users=False, **fake.site_env(), WS_IDENTITY_RECHECK_MS=1500)
        crowd.connect(srv, [p.id for p in people[::-1][:450]], concurrency=10)  # the last listed: all pages read
        assert srv.wait_rechecks(1)
        fake.reset_calls()
        assert srv.wait_rechecks(1)
        lists = [c for c in fake.calls("/auth/v1/admin/users") if c.path == "/auth/v1/admin/users"]
        assert 3 <= len(lists) <= 6, len(lists)  # one re-check's pages (a second may have begun meanwhile)
        assert srv.health()["clients"] == 450
    finally:
        fake.stop()
