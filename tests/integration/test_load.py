"""Correctness under load: exactly-once at 1,000 sockets, and one slow or stalled reader never hurts others.

Timing thresholds live in the benchmark suite; the timeouts here only stop a hang.
"""

import time
from concurrent.futures import ThreadPoolExecutor

from rawws import RawClient

from relay.codes import Close

# A crowd of four users: each holds hundreds of sockets, past the default per-user cap.
CROWD = {"WS_MAX_CONNECTIONS_PER_USER": 1000}


def test_1000_concurrent_clients_each_receive_one_broadcast_exactly_once(start_server, crowd):
    srv = start_server(**CROWD)
    sockets = crowd.connect(srv, ["alice", "bob", "carol", "erin"] * 250, ["system:announcements"])
    result = srv.announce("to everyone", channels=["system:announcements"])
    received = crowd.drain(sockets)
    assert result["delivered"] == 1000
    assert all(len(messages) == 1 for messages in received), sorted({len(m) for m in received})
    assert {messages[0]["id"] for messages in received} == {result["id"]}
    assert {messages[0]["data"]["message"] for messages in received} == {"to everyone"}


def test_a_client_that_never_reads_does_not_delay_the_others(start_server):
    srv = start_server(WS_MAX_QUEUE_BYTES=65536, WS_CLOSE_TIMEOUT_MS=500)
    stalled = RawClient(srv.port, srv.token("carol"), rcvbuf=4096)
    stalled.read_json()  # CONNECTED
    stalled.send_json({"type": "SUBSCRIBE", "data": {"channels": ["system:announcements"]}})
    stalled.read_json()  # SUBSCRIBED; from here on it reads nothing
    readers = [srv.connect(user, ["system:announcements"]) for user in ("alice", "bob", "erin") * 3]
    payload = "x" * 50_000
    started = time.monotonic()
    for n in range(150):  # ~7.5 MB: more than the stalled socket's kernel buffers and queue can hold
        srv.announce(f"{n}:{payload}", channels=["system:announcements"])
        for reader in readers:  # every one, in order, while the stalled socket holds its unread part
            message = reader.expect("ANNOUNCEMENT", timeout=10)
            assert message["data"]["message"].startswith(f"{n}:")
    # A few seconds here; a fan-out that waited on the stalled socket, even a second a round, takes minutes.
    assert time.monotonic() - started < 120
    assert srv.wait_clients(len(readers), timeout=10)["clients"] == len(readers)
    record = srv.wait_for_event("ws.disconnect", lambda e: e["userId"] == "carol")
    assert record["code"] == Close.TRY_AGAIN_LATER
    for reader in readers:
        reader.close()
    stalled.close()


def test_large_messages_reach_a_slow_reader_whole(start_server):
    # A queue big enough that nothing overflows: only the slowness is under test.
    srv = start_server(WS_MAX_QUEUE_BYTES=64 << 20)
    slow = RawClient(srv.port, srv.token("bob"), rcvbuf=4096)
    slow.read_json()
    slow.send_json({"type": "SUBSCRIBE", "data": {"channels": ["system:announcements"]}})
    slow.read_json()
    sent = []
    for n in range(140):  # 8.4 MB: twice what the kernel buffers, so writes must wait and resume
        body = f"{n}-" + chr(0x41 + n % 26) * 60_000
        sent.append(srv.announce(body, channels=["system:announcements"])["id"])
    assert srv.health()["outbox"]["stalls"] >= 1  # the partial-write path was really taken
    for n, message_id in enumerate(sent):
        message = slow.read_json(chunk=4093)  # small, odd-sized reads
        assert message["id"] == message_id
        assert message["data"]["message"] == f"{n}-" + chr(0x41 + n % 26) * 60_000
    slow.close()


def test_concurrent_broadcasts_reach_every_client_in_the_same_order(start_server, crowd):
    """A fan-out pauses every few hundred recipients; broadcasts must still never overtake each other."""
    srv = start_server(**CROWD)
    sockets = crowd.connect(srv, ["alice", "bob", "carol", "erin"] * 300, ["system:announcements"])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda n: srv.announce(f"burst {n}", channels=["system:announcements"]), range(16)))
    assert all(result["delivered"] == 1200 for result in results)
    sent = [result["id"] for result in results]
    assert len(set(sent)) == 16  # every broadcast is told apart, or the checks below prove nothing
    orders = {tuple(message["id"] for message in messages) for messages in crowd.drain(sockets)}
    assert len(orders) == 1, "clients saw the broadcasts in different orders"
    order = orders.pop()
    assert len(order) == 16 and sorted(order) == sorted(sent)  # each exactly once
