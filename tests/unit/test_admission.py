"""Admission of a socket by the core, without a web server: the token, the user, the limits; over a socketpair."""

from __future__ import annotations

import json
import socket
import struct
import time

import gevent
import gevent.event
import pytest
from wsframes import ServerFrames

from relay.broadcast import BroadcastRequest
from relay.clock import now_ms
from relay.codes import Close
from relay.config import Settings
from relay.directory import DirectoryUnavailable, Identity
from relay.envelope import Envelope, Filter
from relay.history import Session
from relay.recovery import ResumeRequest
from relay.service import Realtime

SECRETS = {"WS_TOKEN_SECRET": "t" * 40, "WS_ADMIN_SECRET": "a" * 40, "SECRET_KEY": "s" * 40}


class Directory:
    name = "stub"

    def __init__(self, get):
        self._get = get

    def get(self, user_id):
        return self._get(user_id)

    def changes_since(self, cursor):  # the identity watcher polls it: nothing ever changes here
        return cursor or 0, []

    def status(self):
        return {"kind": self.name, "state": "ok"}

    def project_warnings(self):  # each worker asks as it starts
        return []


def nurse(user_id):
    return Identity(user_id, None, None, "nurse", "c-1")


@pytest.fixture
def service(tmp_path):
    """``service(get, **env)``: a started Realtime whose directory answers with ``get``."""
    made = []

    def make(get=nurse, **env):
        settings = Settings.from_env({**SECRETS, "REALTIME_INSTANCE_PATH": str(tmp_path), **env})
        rt = Realtime(settings, directory=Directory(get))
        rt.start()
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.drain()


@pytest.fixture
def sockets():
    """``open_with(rt, token)``: the client's end of a socket admitted (or refused) by ``rt``."""
    peers = []

    def open_with(rt, token):
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        rt.open_socket(ours, token, remote="test")
        gevent.sleep(0.02)  # let the outbox write
        return ServerFrames(theirs)

    yield open_with
    for peer in peers:
        peer.close()


def test_an_admitted_socket_first_receives_connected(service, sockets):
    rt = service()
    first = sockets(rt, rt.tokens.mint("u-1")).json()
    assert first["type"] == "CONNECTED" and first["data"]["userId"] == "u-1" and len(first["data"]["clientId"]) == 36
    assert rt.hub.stats()["byClinic"] == {"c-1": 1}


def test_a_pong_reports_the_last_finished_fan_out_not_the_one_under_way(service):
    """The offset a PONG carries is Sequencer.delivered: one mid-fan-out would make the client drop
    that broadcast as already seen when it arrived."""
    rt = service()
    rt.sequencer.position, rt.sequencer.delivered = 9, 7  # the fan-out of 8 and 9 under way
    told: dict = {}
    rt.protocol._tell_position(told)  # what PONG and SUBSCRIBED say
    assert rt.sequencer.epoch is not None and told == {"epoch": rt.sequencer.epoch, "offset": 7}
    assert rt.stream_position() == (rt.sequencer.epoch, 7)  # and what a page renders
    assert service(WS_RECOVERY_WINDOW_MS="0").protocol.stream is None  # no history: no position


@pytest.mark.parametrize(
    "get,code",
    [
        (lambda uid: None, Close.FORBIDDEN),
        (lambda uid: Identity(uid, None, None, "nurse", "c-1", active=False), Close.FORBIDDEN),
    ],
    ids=["unknown", "disabled"],
)
def test_unknown_or_disabled_users_are_closed_4403(service, sockets, get, code):
    rt = service(get)
    assert sockets(rt, rt.tokens.mint("u-1")).close_code()[0] == code
    assert len(rt.hub) == 0


def test_a_bad_token_is_closed_4401_before_the_directory_is_asked(service, sockets):
    asked = []
    rt = service(lambda uid: asked.append(uid))
    assert sockets(rt, "***").close_code() == (Close.UNAUTHORIZED, "token not base64")
    assert asked == []


def test_an_identity_outage_is_1013_not_4403(service, sockets):
    def down(uid):
        raise DirectoryUnavailable("Supabase did not answer")

    rt = service(down)
    assert sockets(rt, rt.tokens.mint("u-1")).close_code() == (Close.TRY_AGAIN_LATER, "identity service unavailable")


def counted_refusals(rt) -> tuple[int, dict]:
    """What /health's counters and the dashboard's current minute say of refused tokens and users."""
    return rt.hub.counters["auth_failures"], rt.telemetry.timeline._now().auth_failures


def test_every_refusal_for_a_token_or_a_user_counts_once_in_health_and_in_the_minute(service, sockets):
    """/health's counter counts what realtime_auth_failures_total counts (the two used to disagree)."""

    def down(uid):
        raise DirectoryUnavailable("Supabase did not answer")

    for get, token, reason in [
        (nurse, "***", "not_base64"),
        (lambda uid: None, None, "unknown_user"),
        (lambda uid: Identity(uid, None, None, "nurse", "c-1", active=False), None, "user_disabled"),
        (down, None, "directory_unavailable"),
    ]:
        rt = service(get)
        sockets(rt, token or rt.tokens.mint("u-1")).close_code()
        assert counted_refusals(rt) == (1, {reason: 1}), reason


def test_a_bug_while_admitting_ends_in_close_1011_not_a_hang(service, sockets):
    def broken(uid):
        raise RuntimeError("a bug in a directory")

    rt = service(broken)
    assert sockets(rt, rt.tokens.mint("u-1")).close_code()[0] == Close.INTERNAL_ERROR
    assert len(rt.hub) == 0


def test_ws_max_clients_is_enforced_with_1013(service, sockets):
    rt = service(WS_MAX_CLIENTS=2)
    for _ in range(2):
        assert sockets(rt, rt.tokens.mint("u-1")).json()["type"] == "CONNECTED"
    assert sockets(rt, rt.tokens.mint("u-1")).close_code() == (Close.TRY_AGAIN_LATER, "server full")
    assert len(rt.hub) == 2


def test_a_draining_worker_refuses_newcomers_with_1012(service, sockets):
    rt = service()
    rt.hub.draining = True
    assert sockets(rt, rt.tokens.mint("u-1")).close_code() == (Close.SERVICE_RESTART, "service restart")


@pytest.fixture
def on_its_way(service):
    """``on_its_way(change)``: a socket of u-1 (a nurse of c-1) whose user lookup waits until ``change(rt)``
    has run; returns (rt, the connection, what the client received)."""
    peers = []

    def run(change):
        answer = gevent.event.Event()

        def slow(uid):
            answer.wait(5)
            return nurse(uid)

        rt = service(slow)
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        admitting = gevent.spawn(rt.open_socket, ours, rt.tokens.mint("u-1"), "test")
        gevent.sleep(0.02)  # the admission now waits for the directory, with the old identity to come
        change(rt)
        answer.set()
        return rt, admitting.get(timeout=5), ServerFrames(theirs)

    yield run
    for peer in peers:
        peer.close()


def first_frame(received) -> tuple[int, str] | str:
    """The client's first frame: a message's type, or a close's (code, reason)."""
    opcode, payload = received.next()
    if opcode == 0x8:
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()
    return json.loads(payload)["type"]


def test_a_socket_whose_admission_was_waiting_when_the_drain_began_is_refused_1012_not_kept(on_its_way):
    """The drain closes the sockets the hub has; one still waiting for its user must not join after it."""
    drained = []
    rt, conn, received = on_its_way(lambda rt: drained.append(rt.drain()))
    assert drained == [True]
    assert received.close_code() == (Close.SERVICE_RESTART, "service restart")
    assert len(rt.hub) == 0 and conn.close_code == Close.SERVICE_RESTART


def test_a_user_disabled_while_their_socket_is_on_its_way_is_closed_4403_instead_of_joining(on_its_way):
    rt, conn, received = on_its_way(lambda rt: rt.apply_identity("u-1", None))
    assert first_frame(received) == (Close.FORBIDDEN, "user disabled")
    assert len(rt.hub) == 0


def test_a_user_disconnected_while_their_socket_is_on_its_way_is_closed_4403_instead_of_joining(on_its_way):
    rt, conn, received = on_its_way(lambda rt: rt.disconnect_user("u-1"))
    assert first_frame(received) == (Close.FORBIDDEN, "disconnected by an administrator")
    assert len(rt.hub) == 0
    assert counted_refusals(rt) == (1, {"disconnected": 1})


def test_a_user_moved_while_their_socket_is_on_its_way_joins_where_they_are_now(on_its_way):
    rt, conn, received = on_its_way(lambda rt: rt.apply_identity("u-1", Identity("u-1", None, None, "nurse", "c-2")))
    assert first_frame(received) == "CONNECTED"
    assert conn.clinic_id == "c-2" and rt.hub.stats()["byClinic"] == {"c-2": 1}
    assert rt._on_the_way == {}  # nothing kept once the socket is in


CLIENT = "0000abcd-0000-0000-0000-000000000000"


@pytest.fixture
def resume_on_its_way(service):
    """``resume_on_its_way(change)``: u-1, a nurse of c-1 holding c-1's queue, missed three of its
    updates; their resume waits for its session until ``change(rt)`` has run. What the client got."""
    peers = []

    def run(change):
        rt = service()
        assert rt._prime()
        start = rt.sequencer.position
        rt.history.save_sessions([Session(CLIENT, "u-1", ("clinic:c-1:queue",))], int(time.time() * 1000) + 60_000)
        for n in range(3):
            queue_update = Filter(channels=frozenset({"clinic:c-1:queue"}), clinic_ids=frozenset({"c-1"}))
            rt.broadcast(BroadcastRequest("QUEUE_UPDATE", {"n": n}, queue_update), source="api", scope="api")
        changed = gevent.event.Event()
        find = rt.recovery._session

        def session_after_the_change(client_id):
            changed.wait(5)
            return find(client_id)

        rt.recovery._session = session_after_the_change
        ours, theirs = socket.socketpair()
        peers.append(theirs)
        resume = ResumeRequest(CLIENT, rt.sequencer.epoch, start)
        admitting = gevent.spawn(rt.open_socket, ours, rt.tokens.mint("u-1"), "test", resume=resume)
        gevent.sleep(0.02)
        change(rt)
        changed.set()
        admitting.get(timeout=5)
        return ServerFrames(theirs)

    yield run
    for peer in peers:
        peer.close()


def test_a_resume_of_a_user_disabled_meanwhile_replays_nothing(resume_on_its_way):
    received = resume_on_its_way(lambda rt: rt.apply_identity("u-1", None))
    assert first_frame(received) == (Close.FORBIDDEN, "user disabled")


def test_a_resume_whose_user_a_recheck_finds_signed_out_meanwhile_is_refused_4401(resume_on_its_way):
    """Past the token check, waiting for its session, when the identity re-check learns of a sign-out
    everywhere (its store said so, not a close this worker heard): refused before CONNECTED."""
    received = resume_on_its_way(lambda rt: rt.apply_sign_outs({"u-1": now_ms()}))
    assert first_frame(received) == (Close.UNAUTHORIZED, "token signed out")


def test_a_resume_of_a_user_moved_meanwhile_replays_only_what_they_may_read_now(resume_on_its_way):
    received = resume_on_its_way(lambda rt: rt.apply_identity("u-1", Identity("u-1", None, None, "nurse", "c-2")))
    connected = received.json()
    assert connected["type"] == "CONNECTED" and connected["data"]["recovered"] is True
    assert connected["data"]["channels"] == []
    error = received.json()
    assert error["type"] == "ERROR" and error["data"]["channel"] == "clinic:c-1:queue"
    received.timeout = 0.3
    with pytest.raises(TimeoutError):  # none of c-1's three updates
        received.next()


@pytest.fixture
def resumes_at_once():
    """``resumes_at_once(rt, users)``: one resume per user in ``users``, all at once, each waiting for a
    session that is not there (up to half a second, after the limits are checked); what each received."""
    peers = []

    def run(rt, users):
        assert rt._prime()
        pairs = [socket.socketpair() for _ in users]
        peers.extend(theirs for _, theirs in pairs)
        admitting = []
        for n, ((ours, _), user) in enumerate(zip(pairs, users, strict=True)):
            resume = ResumeRequest(f"{n:08x}-0000-0000-0000-000000000000", rt.sequencer.epoch, 0)
            admitting.append(gevent.spawn(rt.open_socket, ours, rt.tokens.mint(user), "test", resume=resume))
        gevent.joinall(admitting, timeout=5)
        return [ServerFrames(theirs) for _, theirs in pairs]

    yield run
    for peer in peers:
        peer.close()


def test_sockets_of_one_user_admitted_at_once_still_keep_to_the_per_user_limit(service, resumes_at_once):
    """Five resumes of one user at once: the first two in, the others 4429, not all five (none of
    them saw the others in the hub)."""
    rt = service(WS_MAX_CONNECTIONS_PER_USER=2)
    received = resumes_at_once(rt, ["u-1"] * 5)
    assert [frames.json()["data"]["reason"] for frames in received[:2]] == ["no_session", "no_session"]
    assert [frames.close_code()[0] for frames in received[2:]] == [Close.TOO_MANY_CONNECTIONS] * 3
    assert len(rt.hub) == 2 and rt._joining == 0 and rt._on_the_way == {}


def test_sockets_admitted_at_once_still_keep_to_ws_max_clients(service, resumes_at_once):
    rt = service(WS_MAX_CLIENTS=2)
    received = resumes_at_once(rt, [f"u-{n}" for n in range(5)])
    assert [frames.json()["type"] for frames in received[:2]] == ["CONNECTED", "CONNECTED"]
    assert [frames.close_code() for frames in received[2:]] == [(Close.TRY_AGAIN_LATER, "server full")] * 3
    assert len(rt.hub) == 2 and rt._joining == 0


def test_a_broadcast_that_arrives_while_the_stream_head_is_read_is_not_delivered_twice(service):
    """The sequencer is started at the stream's head on the first admission (the store was down at
    start); a broadcast that reaches the worker while that read waits starts it first, and stands."""
    rt = service()
    rt.sequencer.epoch = None  # as after a start with the store down
    read_head = rt.history.head

    def slow_head():
        head = read_head()
        gevent.sleep(0.05)
        return head

    rt.history.head = slow_head
    priming = gevent.spawn(rt._prime)
    gevent.sleep(0.01)
    announcement = Envelope("ANNOUNCEMENT", {}, Filter())
    appended = rt.history.append(announcement)
    placed = announcement.placed(appended.epoch, appended.offset)
    rt.sequencer.offer(placed).get(timeout=2)
    assert priming.get(timeout=2) is True
    assert rt.sequencer.position == placed.offset  # not moved back: the next offer of it is a duplicate
    assert rt.sequencer.offer(placed).get(timeout=2) == 0 and len(rt.sequencer.recent_after(0) or []) == 1


def test_a_process_without_a_token_secret_refuses_with_1011(tmp_path, sockets):
    settings = Settings.from_env({"REALTIME_INSTANCE_PATH": str(tmp_path / "empty")})  # a command before any start
    rt = Realtime(settings, directory=Directory(nurse))
    assert rt.tokens is None
    assert sockets(rt, "anything").close_code()[0] == Close.INTERNAL_ERROR


def _three_broadcasts_to_a_client(rt, sockets):
    """A client of u-1 admitted, then three broadcasts delivered: (the client, the epoch, the position)."""
    client = sockets(rt, rt.tokens.mint("u-1"))
    assert client.json()["type"] == "CONNECTED"
    for n in range(3):
        rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": n}, Filter()), source="api", scope="api")
    return client, rt.sequencer.epoch, rt.sequencer.position


def _store_came_back_older(rt, *, keep: int, new: int = 0) -> None:
    """What a Redis restarted from an older snapshot looks like, in the SQLite store: the broadcasts after
    offset ``keep`` are gone and the head is back there, then ``new`` other broadcasts took their offsets."""
    from relay import jsonsafe

    with rt.history._lock:
        db = rt.history._conn()
        db.execute("DELETE FROM history WHERE offset > ?", (keep,))
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'history'", (keep,))
        for n in range(new):
            stored = jsonsafe.compact(Envelope("ANNOUNCEMENT", {"other": n}, Filter()).to_json())
            db.execute("INSERT INTO history (at, envelope) VALUES (?, ?)", (int(time.time() * 1000), stored))


@pytest.mark.parametrize("new", [0, 3], ids=["head-behind", "head-passed-with-other-broadcasts"])
def test_a_stream_that_came_back_older_under_the_same_epoch_starts_over_and_tells_every_socket(service, sockets, new):
    """Its next offsets would be ones this worker delivered: dropped as duplicates, lost without a word."""
    rt = service()
    client, epoch, position = _three_broadcasts_to_a_client(rt, sockets)
    _store_came_back_older(rt, keep=position - 2, new=new)

    rt._resync()  # what the broker's listener runs when it is back

    assert rt.sequencer.epoch != epoch and rt.history.head()[0] == rt.sequencer.epoch
    assert client.close_code() == (Close.SERVICE_RESTART, "stream reset")
    receipt = rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": "after"}, Filter()), source="api", scope="api")
    assert receipt.epoch == rt.sequencer.epoch and rt.sequencer.position == receipt.offset  # delivered, not dropped


def test_a_broadcast_given_an_offset_already_delivered_starts_the_stream_over_at_once(service, sockets):
    """The store went back while this worker's listener never noticed (no outage of its own, or it came
    back after broadcasts had passed the old head): the broadcast itself gives it away (found by review)."""
    rt = service()
    client, epoch, position = _three_broadcasts_to_a_client(rt, sockets)
    _store_came_back_older(rt, keep=position - 2)
    reused = rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": "reused"}, Filter()), source="api", scope="api")
    assert reused.offset == position - 1 and reused.epoch == epoch
    gevent.sleep(0.1)  # the stream starts over in a greenlet of its own
    assert rt.sequencer.epoch != epoch and rt.history.head()[0] == rt.sequencer.epoch
    assert client.close_code() == (Close.SERVICE_RESTART, "stream reset")


def test_a_store_back_at_an_epoch_this_worker_left_is_started_over_not_taken_back(service):
    """It left that epoch because the stream went back once; the store back at it (restored from the same
    old copy again) would hand out its offsets a second time."""
    rt = service()
    for n in range(3):
        rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": n}, Filter()), source="api", scope="api")
    old = rt.sequencer.epoch
    _store_came_back_older(rt, keep=1)
    rt._resync()  # noticed: a new epoch
    newer = rt.sequencer.epoch
    assert newer != old
    with rt.history._lock:  # and the store restored from that copy again: the old epoch, head 1
        db = rt.history._conn()
        db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (old,))
    rt.history._epoch = None
    rt._resync()
    assert rt.sequencer.epoch not in (old, newer) and rt.history.head()[0] == rt.sequencer.epoch


def test_broadcasts_the_history_lost_before_they_reached_this_worker_close_its_sockets(service, sockets):
    """Its clients missed them: each must resume and be told the replay cannot be whole, never carry on
    past the gap as if nothing happened (found by review)."""
    rt = service()
    client = sockets(rt, rt.tokens.mint("u-1"))
    assert client.json()["type"] == "CONNECTED"
    epoch, position = rt.sequencer.epoch, rt.sequencer.position
    after_gap = Envelope("ANNOUNCEMENT", {"n": "after the gap"}, Filter()).placed(epoch, position + 2)
    assert rt.sequencer.offer(after_gap).get(timeout=5) == 0  # nobody left to take it
    frames = []
    while (frame := client.next())[0] != 0x8:
        frames.append(frame)
    assert frames == [] and struct.unpack("!H", frame[1][:2])[0] == Close.SERVICE_RESTART
    assert frame[1][2:] == b"stream gap"
    assert rt.sequencer.position == position + 2


def test_a_store_that_went_back_is_noticed_by_the_follower_without_a_listener_outage(service, sockets, monkeypatch):
    """Redis back from an older copy while this worker's listener never dropped (another host's Redis
    failover, or the listener's own check failed): the stream follower's reading of the head says so."""
    import relay.service

    monkeypatch.setattr(relay.service, "FOLLOW_INTERVAL", 0.05)
    rt = service()
    client, epoch, position = _three_broadcasts_to_a_client(rt, sockets)
    _store_came_back_older(rt, keep=position - 2)
    assert client.close_code() == (Close.SERVICE_RESTART, "stream reset")
    assert rt.sequencer.epoch != epoch and rt.history.head()[0] == rt.sequencer.epoch


def test_starting_the_stream_over_is_retried_until_the_store_answers(service, monkeypatch):
    """Once new broadcasts pass the reused offsets, none is offered again to say the store went back."""
    from relay.history import HistoryUnavailable

    rt = service()
    rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": 1}, Filter()), source="api", scope="api")
    epoch = rt.sequencer.epoch
    real, calls = rt.history.start_over, []

    def flaky(old):
        calls.append(old)
        if len(calls) < 3:
            raise HistoryUnavailable("Redis is loading")
        return real(old)

    monkeypatch.setattr(rt.history, "start_over", flaky)
    rt._stream_reused(epoch, 1)
    deadline = time.monotonic() + 5
    while rt.sequencer.epoch == epoch and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert rt.sequencer.epoch != epoch and len(calls) == 3


def test_a_store_that_only_moved_on_is_not_taken_for_one_that_went_back(service):
    rt = service()
    for n in range(3):
        rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": n}, Filter()), source="api", scope="api")
    epoch = rt.sequencer.epoch
    rt._resync()
    assert rt.sequencer.epoch == epoch and rt.history.head()[0] == epoch


@pytest.mark.parametrize("opcode", [0x9, 0xA], ids=["pings", "pongs"])
def test_a_flood_of_pings_or_pongs_is_rate_limited_like_messages(service, sockets, opcode):
    """Each is a parse and (for a ping) a pong to write: unlimited, one client kept a worker's loop busy
    ~15 ms of every read while never counting as a slow consumer (found by review)."""
    from wsframes import client_frame

    rt = service()
    rt.protocol.clock = lambda: 1000.0  # time stands still: the bucket does not refill while the test runs
    client = sockets(rt, rt.tokens.mint("u-1"))
    assert client.json()["type"] == "CONNECTED"
    client.sock.sendall(client_frame(opcode, b"") * 200)
    pongs, frames = 0, []
    while True:
        kind, payload = client.next()
        if kind == 0xA:
            pongs += 1
            continue
        frames.append((kind, payload))
        if kind == 0x8:
            break
    assert pongs == (40 if opcode == 0x9 else 0)  # the burst the bucket allows, no more
    assert json.loads(frames[0][1])["data"]["code"] == "rate_limited"
    assert int.from_bytes(frames[-1][1][:2], "big") == Close.POLICY_VIOLATION


def test_broadcasts_delivered_while_the_store_answers_the_resync_are_not_taken_for_a_store_gone_back(service):
    """head() is a round trip: a broadcast this worker delivers meanwhile is past the head it returns."""
    rt = service()
    rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": 0}, Filter()), source="api", scope="api")
    epoch = rt.sequencer.epoch
    asked = rt.history.head

    def head_answered_late():
        answer = asked()
        rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": 1}, Filter()), source="api", scope="api")
        return answer

    rt.history.head = head_answered_late
    rt._resync()
    assert rt.sequencer.epoch == epoch and asked()[0] == epoch  # no new epoch, no socket closed


def test_a_resync_does_not_take_the_worker_back_to_a_stream_it_left_while_the_store_answered(service):
    """Another worker started the stream over meanwhile, and a broadcast of the new one came through."""
    rt = service()
    rt.broadcast(BroadcastRequest("ANNOUNCEMENT", {"n": 0}, Filter()), source="api", scope="api")
    asked = rt.history.head

    def newer_stream_arrives_meanwhile():
        answer = asked()
        rt.sequencer.restart("newer", 50)  # what an offer of the newer stream's broadcast does
        return answer

    rt.history.head = newer_stream_arrives_meanwhile
    rt._resync()
    assert rt.sequencer.epoch == "newer"


# -- a resume while the old socket is still open (4409) -------------------------------------


def test_a_worker_told_a_session_was_resumed_elsewhere_closes_its_socket_4409_and_keeps_no_session(service):
    rt = service()
    ours, theirs = socket.socketpair()
    conn = rt.open_socket(ours, rt.tokens.mint("u-1"), "test")
    received = ServerFrames(theirs)
    assert first_frame(received) == "CONNECTED"
    message = {"kind": "replaced", "userId": "u-1", "clientId": conn.id}
    assert rt._on_control({**message, "clientId": "someone-else"}) == 0
    assert rt._on_control({**message, "userId": "u-2"}) == 0 and conn.state == "open"  # only the user's own
    assert rt.sessions.pending(conn.id) is not None and not rt.sessions.taken(conn.id)  # left as it was
    assert rt._on_control(message) == 1
    assert received.close_code() == (Close.REPLACED, "resumed on another socket")
    assert rt.sessions.taken(conn.id) and rt.sessions.pending(conn.id) is None
    theirs.close()


def test_a_session_resumed_elsewhere_just_after_its_socket_closed_here_is_not_written_here_again(service):
    """Its ended session, still to be written, would land in the store after the resume deleted it."""
    rt = service()
    ours, theirs = socket.socketpair()
    conn = rt.open_socket(ours, rt.tokens.mint("u-1"), "test")
    conn.close(Close.KEEPALIVE_TIMEOUT, "no answer to ping")
    assert rt.sessions.pending(conn.id) is not None  # ended here, not written yet
    assert rt._on_control({"kind": "replaced", "userId": "u-1", "clientId": conn.id}) == 0
    assert rt.sessions.pending(conn.id) is None and rt.sessions.taken(conn.id)
    theirs.close()


@pytest.mark.parametrize("was_open", [True, False])
def test_a_resume_asks_the_other_workers_to_close_the_old_socket_only_if_it_was_open(service, was_open):
    """A session written open: its worker may still hold the socket. Written as ended (a drain, a close):
    nobody does, and a reload's ten thousand resumes send nothing."""
    rt = service()
    assert rt._prime()
    # As a shared store (Redis) keeps it: the embedded one answers open=False (see Session).
    rt.history.load_session = lambda client_id: Session(client_id, "u-1", (), open=was_open)
    asked = []
    notify = rt.broker.notify
    rt.broker.notify = lambda message: asked.append(message) or notify(message)
    ours, theirs = socket.socketpair()
    resume = ResumeRequest(CLIENT, rt.sequencer.epoch, rt.sequencer.position)
    rt.open_socket(ours, rt.tokens.mint("u-1"), "test", resume=resume)
    assert ServerFrames(theirs).json()["data"]["recovered"] is True
    gevent.sleep(0.05)
    assert asked == ([{"kind": "replaced", "userId": "u-1", "clientId": CLIENT}] if was_open else [])
    theirs.close()


def test_a_page_rendered_before_the_stream_was_read_reads_it_and_carries_its_position(service):
    """A worker whose store was down at start reads the stream at its next admission; a page rendered
    before that carried no position, so a broadcast between its render and its socket's subscription
    reached it neither live nor replayed (found by review). The page reads it itself now."""
    rt = service()
    epoch, head = rt.history.head()
    rt.sequencer.epoch = None  # as it is when the store did not answer at start (not primed)
    rt._page_prime_at = time.monotonic()  # a page tried a moment ago (each try may wait on a store that is down)
    assert rt.stream_position() is None and not rt.sequencer.primed  # once a second at most
    rt._page_prime_at -= 1.0
    assert rt.stream_position() == (epoch, head)
    assert rt.sequencer.primed


def test_a_worker_that_heard_a_disconnect_does_not_apply_its_record_again_to_later_sockets(service, sockets):
    """The record is for the workers that did not hear the close. One that did, with a clock behind the
    recorder's, would have taken a socket the person opened just after the disconnect for one from
    before it, and closed it 4403 (found by review). A worker that did not hear it applies it."""
    rt = service()
    later = now_ms() + 2_000  # the recorder's clock, 2 s ahead of this worker's
    heard = sockets(rt, rt.tokens.mint("u-1"))
    assert heard.json()["type"] == "CONNECTED"
    rt._on_control({"kind": "disconnect", "userId": "u-1", "before": later})
    assert heard.close_code() == (Close.FORBIDDEN, "disconnected by an administrator")
    again = sockets(rt, rt.tokens.mint("u-1"))  # the person came back, "before" the recorder's moment here
    assert again.json()["type"] == "CONNECTED"
    assert rt.apply_disconnects({"u-1": later}) == 0  # the re-check reads the record: done here already
    assert rt.apply_disconnects({"u-1": later + 1}) == 1  # a newer disconnect, not heard here: applied
    assert again.close_code() == (Close.FORBIDDEN, "disconnected by an administrator")


def test_the_disconnects_a_worker_heard_are_forgotten_with_their_records(service):
    """Every sign-out everywhere sends one, and they were pruned only when a connected user had a record
    to apply: one entry per user for the worker's whole life (found by review)."""
    from relay.service import DISCONNECT_KEPT_S

    rt = service()
    long_ago = now_ms() - DISCONNECT_KEPT_S * 1000 - 1
    for n in range(3):
        rt._on_control({"kind": "disconnect", "userId": f"old-{n}", "before": long_ago - n})
    rt._on_control({"kind": "disconnect", "userId": "u-1", "before": now_ms()})
    assert list(rt._heard_disconnects) == ["u-1"]
