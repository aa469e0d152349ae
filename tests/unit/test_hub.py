"""The hub without a server: indexes, filters, fan-out counts, and cleanup."""

import json

import gevent
import pytest

from relay.channels import channels, refusal
from relay.codes import Error
from relay.envelope import Envelope, Filter
from relay.hub import Hub


class FakeConn:
    """Just what the hub touches on a connection."""

    def __init__(self, name, user_id, role, clinic_id=None):
        self.name = name
        self.user_id, self.role, self.clinic_id = user_id, role, clinic_id
        self.channels = set()
        self.state = "open"
        self.frames = []

    def push(self, frame):
        if self.state != "open":
            return False
        self.frames.append(frame)
        return True

    def __repr__(self):
        return self.name


def push_each(conns, frame):
    return sum(1 for conn in conns if conn.push(frame))


@pytest.fixture
def hub():
    hub = Hub(max_clients=100, ping_interval=30, push_all=push_each)
    people = {
        "admin": FakeConn("admin", "alice", "admin"),
        "bob1": FakeConn("bob1", "bob", "sales_staff", "clinic-1"),
        "bob2": FakeConn("bob2", "bob", "sales_staff", "clinic-1"),
        "erin": FakeConn("erin", "erin", "nurse", "clinic-1"),
        "carol": FakeConn("carol", "carol", "sales_staff", "clinic-2"),
    }
    for conn in people.values():
        hub.add(conn)
    hub.subscribe(people["admin"], ["system:announcements", "clinic:clinic-2:queue"], 100)
    hub.subscribe(people["bob1"], ["system:announcements", "clinic:clinic-1:queue"], 100)
    hub.subscribe(people["erin"], ["clinic:clinic-1:queue"], 100)
    hub.subscribe(people["carol"], ["system:announcements", "clinic:clinic-2:queue"], 100)
    hub.people = people
    return hub


def names(conns):
    return sorted(c.name for c in conns)


CASES = [
    ({}, ["admin", "bob1", "bob2", "carol", "erin"]),
    ({"channels": ["system:announcements"]}, ["admin", "bob1", "carol"]),
    ({"channels": ["clinic:clinic-1:queue", "clinic:clinic-2:queue"]}, ["admin", "bob1", "carol", "erin"]),
    ({"userIds": ["bob"]}, ["bob1", "bob2"]),
    ({"userIds": ["bob", "carol"]}, ["bob1", "bob2", "carol"]),
    ({"clinicIds": ["clinic-1"]}, ["bob1", "bob2", "erin"]),
    ({"roles": ["admin", "nurse"]}, ["admin", "erin"]),
    # fields combine with AND
    ({"clinicIds": ["clinic-1"], "roles": ["sales_staff"]}, ["bob1", "bob2"]),
    ({"clinicIds": ["clinic-1"], "channels": ["system:announcements"]}, ["bob1"]),
    ({"userIds": ["bob"], "channels": ["clinic:clinic-1:queue"]}, ["bob1"]),
    ({"roles": ["sales_staff"], "clinicIds": ["clinic-2"], "channels": ["clinic:clinic-2:queue"]}, ["carol"]),
    # no one matches
    ({"userIds": ["nobody"]}, []),
    ({"channels": ["system:maintenance"]}, []),
    ({"clinicIds": ["clinic-1"], "roles": ["admin"]}, []),
]


@pytest.mark.parametrize("flt,expected", CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_filter_selects_exactly(hub, flt, expected):
    envelope = Envelope("ANNOUNCEMENT", {"message": "hi"}, Filter.from_json(flt))
    assert names(hub.recipients(envelope.filter)) == expected
    assert hub.deliver(envelope) == len(expected)
    got = [c.name for c in hub.people.values() if c.frames]
    assert sorted(got) == expected


def test_one_frame_object_is_shared_by_every_recipient(hub):
    hub.deliver(Envelope("ANNOUNCEMENT", {"message": "hi"}))
    frames = [c.frames[0] for c in hub.people.values()]
    assert all(frame is frames[0] for frame in frames)
    message = json.loads(frames[0][2:])
    assert message["type"] == "ANNOUNCEMENT" and message["data"] == {"message": "hi"} and message["id"]


def test_closing_connections_are_not_counted(hub):
    hub.people["carol"].state = "closing"
    assert hub.deliver(Envelope("X", {}, Filter(channels=frozenset({"system:announcements"})))) == 2


def test_remove_forgets_a_connection_everywhere(hub):
    for conn in hub.people.values():
        hub.remove(conn)
        hub.remove(conn)  # twice is harmless
    assert len(hub) == 0
    assert hub.stats() == {"clients": 0, "byRole": {}, "byClinic": {}, "channels": 0, "subscriptions": 0, "users": 0}


def test_stats_count_by_role_and_clinic(hub):
    stats = hub.stats()
    assert stats["clients"] == 5
    assert stats["byRole"] == {"admin": 1, "sales_staff": 3, "nurse": 1}
    assert stats["byClinic"] == {"clinic-1": 3, "clinic-2": 1}
    assert stats["channels"] == 3 and stats["subscriptions"] == 7 and stats["users"] == 4


def test_subscription_limit_refuses_the_excess_but_keeps_existing(hub):
    bob = hub.people["bob2"]
    taken, over = hub.subscribe(bob, ["system:announcements", "system:maintenance", "clinic:clinic-1:alerts"], 2)
    assert taken == ["system:announcements", "system:maintenance"]
    assert over == ["clinic:clinic-1:alerts"]
    taken, over = hub.subscribe(bob, ["system:announcements"], 2)  # already held: still in effect
    assert taken == ["system:announcements"] and over == []


def test_unsubscribe_reports_only_what_was_removed(hub):
    bob = hub.people["bob1"]
    assert hub.unsubscribe(bob, ["clinic:clinic-1:queue", "system:maintenance"]) == ["clinic:clinic-1:queue"]
    assert names(hub.recipients(Filter(channels=frozenset({"clinic:clinic-1:queue"})))) == ["erin"]


class Reader:
    def __init__(self, user_id, role, clinic_id=None):
        self.user_id, self.role, self.clinic_id = user_id, role, clinic_id


STAFF = Reader("bob", "sales_staff", "clinic-1")
ADMIN = Reader("alice", "admin")

RULES = [
    (STAFF, channels.system.announcements, None),
    (STAFF, channels.system.maintenance, None),
    (STAFF, channels.clinic.queue("clinic-1"), None),
    (STAFF, channels.clinic.alerts("clinic-1"), None),
    (STAFF, channels.clinic.queue("clinic-2"), Error.FORBIDDEN_CHANNEL),
    (STAFF, channels.clinic.alerts("clinic-2"), Error.FORBIDDEN_CHANNEL),
    (STAFF, channels.user.notifications("bob"), None),
    (STAFF, channels.user.notifications("alice"), Error.FORBIDDEN_CHANNEL),
    (ADMIN, channels.clinic.queue("clinic-2"), None),
    (ADMIN, channels.user.notifications("bob"), Error.FORBIDDEN_CHANNEL),
    (Reader("zed", "sales_staff", None), channels.clinic.queue("clinic-1"), Error.FORBIDDEN_CHANNEL),
    (STAFF, "system:everything", Error.UNKNOWN_CHANNEL),
    (STAFF, "clinic:clinic-1:billing", Error.UNKNOWN_CHANNEL),
    (STAFF, "clinic::queue", Error.UNKNOWN_CHANNEL),
    (STAFF, "x" * 300, Error.UNKNOWN_CHANNEL),
]


@pytest.mark.parametrize("reader,name,expected", RULES, ids=[f"{r.user_id}-{n[:40]}" for r, n, _ in RULES])
def test_channel_rules(reader, name, expected):
    assert refusal(reader, name) == expected


def test_channel_builders_match_the_original_names():
    assert channels.system.announcements == "system:announcements"
    assert channels.system.maintenance == "system:maintenance"
    assert channels.clinic.queue("c-9") == "clinic:c-9:queue"
    assert channels.clinic.alerts("c-9") == "clinic:c-9:alerts"
    assert channels.user.notifications("u-1") == "user:u-1:notifications"
    with pytest.raises(ValueError):
        channels.clinic.queue("bad:id")


def test_a_paused_fan_out_is_never_overtaken(hub, monkeypatch):
    """deliver() yields once per time slice; the next broadcast must wait for it to finish,
    even when it walks its recipients in a different order."""
    import gevent

    import relay.hub
    import relay.timeslice

    monkeypatch.setattr(relay.timeslice, "SLICE_S", 0.0)  # yield at every look at the clock...
    monkeypatch.setattr(relay.hub, "CHECK_EVERY", 2)  # ...which is every second recipient
    snapshot = hub.recipients
    calls = []

    def recipients(flt):
        calls.append(flt)
        conns = sorted(snapshot(flt), key=lambda c: c.name)
        return conns if len(calls) == 1 else conns[::-1]  # the second walk goes the other way round

    monkeypatch.setattr(hub, "recipients", recipients)
    first, second = Envelope("FIRST", {}), Envelope("SECOND", {})
    gevent.joinall([gevent.spawn(hub.deliver, first), gevent.spawn(hub.deliver, second)])
    for conn in hub.people.values():
        assert [json.loads(f[2:])["type"] for f in conn.frames] == ["FIRST", "SECOND"], conn


class Pinged(FakeConn):
    def __init__(self, name, *, broken=False):
        super().__init__(name, name, "nurse", "clinic-1")
        self.broken = broken
        self.pings = 0

    def keepalive(self):
        if self.broken:
            raise RuntimeError("a bug in one connection's keep-alive")
        self.pings += 1

    def abort(self, why):
        raise RuntimeError("and in dropping it")


def test_a_connection_that_cannot_even_be_dropped_does_not_stop_the_keep_alive_of_the_others(caplog):
    """Were the loop to die, no socket of the worker would be pinged (or closed 4408) again."""
    hub = Hub(max_clients=10, ping_interval=0.01, push_all=push_each)
    broken, fine = Pinged("broken", broken=True), Pinged("fine")
    hub.add(broken)
    hub.add(fine)
    hub.start()
    for _ in range(1000):  # three rounds of 10 ms; up to 10 s on a loaded machine (a hang guard, not a timing)
        if fine.pings >= 3:
            break
        gevent.sleep(0.01)
    assert fine.pings >= 3 and not hub._keepalive.dead
    assert "dropping broken failed" in caplog.text
    hub._keepalive.kill()
