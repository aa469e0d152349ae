"""Chaos: clients drop and resume at random while broadcasts flow and the server reloads once.

At the end every client must hold every broadcast meant for it (by its
user, role, clinic and channels) since it first connected: each exactly once,
in offset order. Broadcasts go out with an Idempotency-Key and are retried
through the reload, the way a producer should send them.
"""

from __future__ import annotations

import random
import signal
import threading
import time

from support import Resumer
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.envelope import Filter

PEOPLE = {  # user -> (role, clinic, channels it may hold)
    "alice": ("admin", None, ["system:announcements", "clinic:clinic-2:queue", "clinic:clinic-1:alerts"]),
    "bob": ("sales_staff", "clinic-1", ["system:announcements", "clinic:clinic-1:queue", "user:bob:notifications"]),
    "carol": ("sales_staff", "clinic-2", ["system:maintenance", "clinic:clinic-2:queue"]),
    "erin": ("nurse", "clinic-1", ["clinic:clinic-1:queue", "clinic:clinic-1:alerts"]),
}
FILTERS = [
    {},
    {"channels": ["system:announcements"]},
    {"channels": ["clinic:clinic-1:queue"]},
    {"channels": ["clinic:clinic-2:queue", "clinic:clinic-1:alerts"]},
    {"userIds": ["bob", "carol"]},
    {"clinicIds": ["clinic-1"]},
    {"roles": ["admin", "nurse"]},
    {"channels": ["system:announcements"], "clinicIds": ["clinic-1"]},
    {"channels": ["system:maintenance"]},
]
CLIENTS = 32
BROADCASTS = 300


def test_clients_dropping_and_resuming_during_a_reload_each_get_everything_once_in_order(start_server):
    srv = start_server(WS_CLOSE_TIMEOUT_MS=500)
    rng = random.Random(20261201)
    clients = []
    for n in range(CLIENTS):
        user = list(PEOPLE)[n % len(PEOPLE)]
        channels = rng.sample(PEOPLE[user][2], rng.randint(1, len(PEOPLE[user][2])))
        client = Resumer(srv, user, channels)
        client.start = client.connect()["offset"]
        clients.append(client)

    accepted: list[dict] = []  # what the publisher was told: id, offset, filter
    stop = threading.Event()
    problems: list[str] = []

    def publish_all():
        for n in range(BROADCASTS):
            flt = FILTERS[n % len(FILTERS)]
            body = {"message": {"type": "CHAOS", "data": {"n": n}}, "filter": flt}
            for _attempt in range(200):  # retried through the reload (503 while a worker drains)
                try:
                    response = srv.broadcast(body, headers={"Idempotency-Key": f"chaos-{n}"})
                except Exception:
                    response = None
                if response is not None and response.status_code == 200:
                    accepted.append({**response.json(), "filter": flt})
                    break
                time.sleep(0.05)
            else:
                problems.append(f"broadcast {n} was never accepted")
            time.sleep(0.01)

    def churn(client: Resumer, seed: int):
        local = random.Random(seed)
        while not stop.is_set():
            client.read(quiet=local.uniform(0.05, 0.4))  # returns early if the server closed it (the reload)
            if not client.closed and local.random() < 0.3:
                client.drop()
                time.sleep(local.uniform(0, 0.3))
            if client.closed:
                _resume(client, problems)

    publisher = threading.Thread(target=publish_all)
    churners = [threading.Thread(target=churn, args=(c, i)) for i, c in enumerate(clients)]
    publisher.start()
    for thread in churners:
        thread.start()
    time.sleep(1.5)
    srv.proc.send_signal(signal.SIGHUP)  # a deploy, in the middle of it all
    publisher.join(timeout=120)
    stop.set()
    for thread in churners:
        thread.join(timeout=60)
    assert not publisher.is_alive() and not any(t.is_alive() for t in churners)
    assert problems == []
    assert len(accepted) == BROADCASTS and len({a["offset"] for a in accepted}) == BROADCASTS

    accepted.sort(key=lambda a: a["offset"])
    for client in clients:
        try:
            client.read(quiet=1.0)
        except Exception:
            _resume(client, problems)
            client.read(quiet=1.0)
        role, clinic, _ = PEOPLE[client.user_id]
        expected = [
            a["id"]
            for a in accepted
            if a["offset"] > client.start
            and Filter.from_json(a["filter"]).admits(client.user_id, role, clinic, client.channels)
        ]
        assert client.ids == expected, (client.user_id, client.channels, len(client.ids), len(expected))
        client.close()
    assert problems == []
    assert srv.health()["recoveries"]["recovered"] > CLIENTS  # every client resumed, most more than once


def _resume(client: Resumer, problems: list[str]) -> None:
    """Reconnect until admitted (the reload refuses some attempts with 1012); it must always recover."""
    for _attempt in range(100):
        try:
            hello = client.connect()
        except (ConnectionClosed, InvalidStatus, OSError, TimeoutError, AssertionError):
            time.sleep(0.05)
            continue
        if hello.get("recovered") is not True:
            problems.append(f"{client.user_id} was not recovered: {hello}")
        return
    problems.append(f"{client.user_id} could not reconnect")
