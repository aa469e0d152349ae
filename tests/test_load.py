"""Correctness under load: exactly-once at 1,000 sockets, and one slow or stalled reader never hurts others.

Timing thresholds live in the benchmark suite; the timeouts here only stop a hang.
"""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import websockets

from rawws import RawClient
from relay.codes import Close


async def _crowd_receives_once(srv, count: int) -> tuple[dict, list[list[dict]]]:
    url = srv.ws_url + "?token="
    users = ["alice", "bob", "carol", "erin"]
    gate = asyncio.Semaphore(100)

    async def open_one(i):
        async with gate:
            ws = await websockets.connect(url + quote(srv.token(users[i % 4]), safe=""), max_queue=None,
                                          open_timeout=30, ping_interval=None)
            assert json.loads(await ws.recv())["type"] == "CONNECTED"
            await ws.send(json.dumps({"type": "SUBSCRIBE", "data": {"channels": ["system:announcements"]}}))
            assert json.loads(await ws.recv())["type"] == "SUBSCRIBED"
            return ws

    sockets = await asyncio.gather(*(open_one(i) for i in range(count)))
    result = await asyncio.to_thread(srv.announce, "to everyone", channels=["system:announcements"])

    async def drain(ws):
        got = []
        try:
            while True:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=1.0)))
        except asyncio.TimeoutError:
            return got

    received = await asyncio.gather(*(drain(ws) for ws in sockets))
    await asyncio.gather(*(ws.close() for ws in sockets))
    return result, received


def test_1000_concurrent_clients_each_receive_one_broadcast_exactly_once(start_server):
    srv = start_server()
    # Own thread, own event loop: the browser tests' Playwright keeps a loop running on this one.
    with ThreadPoolExecutor(1) as pool:
        result, received = pool.submit(asyncio.run, asyncio.wait_for(_crowd_receives_once(srv, 1000), 120)).result()
    assert result["delivered"] == 1000
    assert all(len(messages) == 1 for messages in received), sorted({len(m) for m in received})
    assert {messages[0]["id"] for messages in received} == {result["id"]}
    assert srv.wait_clients(0)["clients"] == 0


def test_a_client_that_never_reads_does_not_delay_the_others(start_server):
    srv = start_server(WS_MAX_QUEUE_BYTES=65536, WS_CLOSE_TIMEOUT_MS=500)
    stalled = RawClient(srv.port, srv.token("carol"), rcvbuf=4096)
    stalled.read_json()  # CONNECTED
    stalled.send_json({"type": "SUBSCRIBE", "data": {"channels": ["system:announcements"]}})
    stalled.read_json()  # SUBSCRIBED; from here on it reads nothing
    readers = [srv.connect(user, ["system:announcements"]) for user in ("alice", "bob", "erin") * 3]
    payload = "x" * 50_000
    worst = 0.0
    for n in range(150):  # ~7.5 MB: more than the stalled socket's kernel buffers and queue can hold
        started = time.monotonic()
        srv.announce(f"{n}:{payload}", channels=["system:announcements"])
        for reader in readers:
            message = reader.expect("ANNOUNCEMENT", timeout=1)  # each arrives within a second
            assert message["data"]["message"].startswith(f"{n}:")
        worst = max(worst, time.monotonic() - started)
    assert worst < 1.0
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
