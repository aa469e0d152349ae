"""The two seams, one contract each: every implementation must behave the same on the wire.

Broker: MemoryBroker and RedisBroker. Directory: SqliteDirectory and SupabaseDirectory.
"""

import uuid

import pytest
from fake_supabase import FakeSupabase
from support import sign_in

from relay.codes import Close
from relay.sqlite_directory import SqliteDirectory

PASSWORD = "pw-correct-horse"


# -- the broker contract ----------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def broker_server(request, start_server):
    env = {}
    if request.param == "redis":
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    srv = start_server(**env)
    srv.kind = request.param
    return srv


def test_broker_delivers_once_to_exactly_the_filtered_clients(broker_server):
    srv = broker_server
    bob = srv.connect("bob", ["clinic:clinic-1:queue"])
    carol = srv.connect("carol", ["clinic:clinic-2:queue"])
    erin = srv.connect("erin", ["clinic:clinic-1:queue"])
    result = srv.broadcast(
        {
            "message": {"type": "QUEUE_UPDATE", "data": {"n": 1}},
            "filter": {"channels": ["clinic:clinic-1:queue"], "roles": ["sales_staff"]},
        }
    ).json()
    assert (result["delivered"], result["workers"], result["missingWorkers"]) == (1, 1, 0)
    expected = {"type": "QUEUE_UPDATE", "data": {"n": 1}, "id": result["id"], "offset": result["offset"]}
    assert bob.expect("QUEUE_UPDATE") == expected
    assert carol.nothing_within(0.2) and erin.nothing_within(0.05) and bob.nothing_within(0.05)
    health = srv.health()
    assert health["broker"]["kind"] == srv.kind and health["broker"]["state"] == "ok"
    assert (health["clients"], health["workers"]) == (3, 1)
    for client in (bob, carol, erin):
        client.close()


# -- the directory contract -----------------------------------------------------------------------

ADMIN, STAFF, DISABLED = (str(uuid.uuid4()) for _ in range(3))


@pytest.fixture(params=["sqlite", "supabase"])
def directory_server(request, start_server, tmp_path):
    if request.param == "sqlite":
        store = SqliteDirectory(str(tmp_path / "people.db"))
        store.add_user(ADMIN, email="boss@clinic.test", password=PASSWORD, role="admin")
        store.add_user(STAFF, email="nurse@clinic.test", password=PASSWORD, role="nurse", clinic_id="c-7")
        store.add_user(DISABLED, email="gone@clinic.test", password=PASSWORD, role="nurse", clinic_id="c-7")
        store.set_active(DISABLED, False)
        store.close()
        srv = start_server(users=False, REALTIME_DB=str(tmp_path / "people.db"))
    else:
        fake = FakeSupabase().start()
        request.addfinalizer(fake.stop)
        for user_id, email, profile, banned in (
            (ADMIN, "boss@clinic.test", {"role": "admin", "clinic_id": None}, None),
            (STAFF, "nurse@clinic.test", {"role": "nurse", "clinic_id": "c-7"}, None),
            (DISABLED, "gone@clinic.test", {"role": "nurse", "clinic_id": "c-7"}, "2999-01-01T00:00:00Z"),
        ):
            fake.add_user(email, user_id=user_id, profile=profile, banned_until=banned, password=PASSWORD)
        srv = start_server(users=False, **fake.site_env())
    srv.kind = request.param
    return srv


def test_directory_knows_role_clinic_and_state(directory_server):
    srv = directory_server
    with srv.connect(STAFF) as staff, srv.connect(ADMIN):
        assert staff.subscribe(["clinic:c-7:alerts"])["data"]["channels"] == ["clinic:c-7:alerts"]
        health = srv.health()
        assert health["byRole"] == {"nurse": 1, "admin": 1} and health["byClinic"] == {"c-7": 1}
        assert health["identity"]["kind"] == srv.kind and health["identity"]["state"] == "ok"
    for user_id in (DISABLED, str(uuid.uuid4()), "not-a-known-id"):
        with srv.open(srv.token(user_id)) as client:
            assert client.closed_with()[0] == Close.FORBIDDEN


def test_directory_signs_people_in_by_email(directory_server):
    srv = directory_server
    session = sign_in(srv, "nurse@clinic.test", PASSWORD)
    assert session.last.status_code == 302
    assert session.get(srv.url + "/api/ws/auth", timeout=5).json()["userId"] == STAFF
    assert sign_in(srv, "nurse@clinic.test", "wrong").last.status_code == 401
    assert sign_in(srv, "gone@clinic.test", PASSWORD).last.status_code == 401
    assert sign_in(srv, "nobody@clinic.test", PASSWORD).last.status_code == 401


def test_every_name_of_an_account_shares_its_sign_in_limit(directory_server):
    """Five wrong passwords, typed under each name the directory signs the account in by (SQLite: the
    email and the id; both: the email in other case), block the account under every one of them."""
    srv = directory_server
    names = ["nurse@clinic.test", "Nurse@Clinic.TEST"] + ([STAFF] if srv.kind == "sqlite" else [])
    for n in range(5):
        assert sign_in(srv, names[n % len(names)], "wrong").last.status_code in (401, 429)
    for name in names:
        assert sign_in(srv, name, PASSWORD).last.status_code == 429, name
    assert sign_in(srv, "boss@clinic.test", PASSWORD).last.status_code == 302  # another account is not affected


def test_a_name_that_finds_nobody_never_counts_against_an_account(directory_server):
    """Guessing ``id:<user id>`` (what the embedded store counts an account as) must block nobody, or
    who gets blocked would tell which ids exist."""
    srv = directory_server
    for _ in range(6):
        assert sign_in(srv, f"id:{STAFF}", "wrong").last.status_code in (401, 429)
    assert sign_in(srv, "nurse@clinic.test", PASSWORD).last.status_code == 302
