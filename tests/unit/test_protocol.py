"""ClientProtocol: every client message, every ERROR code, and the rate limit, on plain objects."""

from __future__ import annotations

import json

import gevent
import gevent.event
import pytest

import relay.protocol as protocol_module
from relay.codes import Close, Error
from relay.envelope import Envelope, Filter
from relay.hub import Hub
from relay.lastvalues import LastValues
from relay.protocol import MAX_BACKLOG, MAX_BACKLOG_CHARS, MAX_CHANNELS_PER_REQUEST, ClientProtocol
from relay.sequencer import Sequencer

ANN = "system:announcements"


class FakeConn:
    """What the protocol touches on a connection; frames it was given are decoded for the test."""

    def __init__(self, user_id="bob", role="sales_staff", clinic_id="clinic-1"):
        self.id = f"conn-{user_id}"
        self.admitted = True
        self.user_id, self.role, self.clinic_id = user_id, role, clinic_id
        self.channels: set[str] = set()
        self.rate_tokens = 0.0
        self.rate_at = 0.0
        self.sent_after = 0
        self.late = None
        self.backlog = None
        self.state = "open"
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None

    def push(self, frame: bytes) -> bool:
        self.sent.append(json.loads(frame[2:] if frame[1] < 126 else frame[4:]))
        return True

    send_now = push

    def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)
        self.state = "closing"

    def push_owed(self, frames: list[bytes]) -> None:
        for frame in frames:
            self.push(frame)

    def defer(self, work, *args) -> None:  # at once, here (a test that needs it waiting spawns it instead)
        work(*args)

    def take(self) -> list[dict]:
        sent, self.sent = self.sent, []
        return sent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def protocol(clock):
    return ClientProtocol(Hub(max_clients=10, ping_interval=30), max_subscriptions=3, clock=clock)


@pytest.fixture
def bob(protocol):
    conn = FakeConn()
    protocol.hub.add(conn)
    return conn


def say(protocol, conn, message) -> list[dict]:
    protocol.on_text(conn, message if isinstance(message, str) else json.dumps(message))
    return conn.take()


def test_ping_answers_pong_with_the_time(protocol, bob):
    [pong] = say(protocol, bob, {"type": "PING"})
    assert pong["type"] == "PONG" and isinstance(pong["data"]["timestamp"], int)
    assert set(pong["data"]) == {"timestamp"}  # no history: no position anywhere


def test_with_a_history_pong_carries_the_position_everything_before_it_was_sent_to(clock):
    stream = Sequencer(lambda e: 0, lambda a, n: [], on_reset=lambda e: None)
    protocol = ClientProtocol(Hub(max_clients=10, ping_interval=30), clock=clock, stream=stream)
    bob = FakeConn()
    protocol.hub.add(bob)
    [pong] = say(protocol, bob, {"type": "PING"})
    assert set(pong["data"]) == {"timestamp"}  # not primed yet: nothing to say
    stream.prime("e1", 41)
    [pong] = say(protocol, bob, {"type": "PING"})
    assert pong["data"]["epoch"] == "e1" and pong["data"]["offset"] == 41


def test_subscribe_answers_what_took_effect_and_unsubscribe_what_was_removed(protocol, bob):
    names = ["system:announcements", "clinic:clinic-1:queue", "system:announcements"]
    assert say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": names}}) == [
        {"type": "SUBSCRIBED", "data": {"channels": ["system:announcements", "clinic:clinic-1:queue"]}}
    ]
    assert bob.channels == {"system:announcements", "clinic:clinic-1:queue"}
    reply = say(protocol, bob, {"type": "UNSUBSCRIBE", "data": {"channels": ["clinic:clinic-1:queue", "system:x"]}})
    assert reply == [{"type": "UNSUBSCRIBED", "data": {"channels": ["clinic:clinic-1:queue"]}}]


ERRORS = [
    ("not json", "{nope", Error.INVALID_JSON),
    ("array", "[1, 2]", Error.INVALID_MESSAGE),
    ("no type", {"data": {}}, Error.INVALID_MESSAGE),
    ("numeric type", {"type": 7}, Error.INVALID_MESSAGE),
    ("unknown type", {"type": "DANCE"}, Error.UNKNOWN_TYPE),
    ("data not an object", {"type": "SUBSCRIBE", "data": "system:announcements"}, Error.INVALID_DATA),
    ("no data", {"type": "SUBSCRIBE"}, Error.INVALID_DATA),
    ("channels not a list", {"type": "SUBSCRIBE", "data": {"channels": "system:announcements"}}, Error.INVALID_DATA),
    ("a channel not a string", {"type": "UNSUBSCRIBE", "data": {"channels": [1]}}, Error.INVALID_DATA),
    (
        "too many channels in one request",
        {"type": "SUBSCRIBE", "data": {"channels": ["system:announcements"] * (MAX_CHANNELS_PER_REQUEST + 1)}},
        Error.INVALID_DATA,
    ),
]


@pytest.mark.parametrize("name,message,code", ERRORS, ids=[e[0] for e in ERRORS])
def test_a_bad_message_gets_one_error_with_a_stable_code_and_the_socket_stays_open(protocol, bob, name, message, code):
    [error] = say(protocol, bob, message)
    assert error["type"] == "ERROR" and error["data"]["code"] == code and len(error["data"]["message"]) > 10
    assert bob.closed is None and bob.channels == set()


class SlowLastValues:
    """The store's last values, answered only when the test says so; none stored."""

    def __init__(self):
        self.answer = gevent.event.Event()

    def fetch(self, names):
        self.answer.wait(5)
        return names

    def settle(self, fetched, who):
        return {}


def test_a_subscribe_with_last_is_authorized_again_once_the_store_answers(clock):
    """Moved to another clinic while the last values were fetched: that clinic's queue is no longer theirs."""
    last_values = SlowLastValues()
    protocol = ClientProtocol(Hub(max_clients=10, ping_interval=30), clock=clock, last_values=last_values)
    bob = FakeConn()
    bob.defer = lambda work, *args: gevent.spawn(work, *args)
    protocol.hub.add(bob)
    say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": ["clinic:clinic-1:queue", ANN], "last": True}})
    gevent.sleep(0.01)  # fetching
    bob.clinic_id = "clinic-2"  # what Realtime.apply_identity does to the connection (through the hub)
    last_values.answer.set()
    gevent.sleep(0.01)
    error, subscribed = bob.take()
    assert error["data"]["code"] == Error.FORBIDDEN_CHANNEL and error["data"]["channel"] == "clinic:clinic-1:queue"
    assert subscribed == {"type": "SUBSCRIBED", "data": {"channels": [ANN]}}
    assert bob.channels == {ANN}


def test_exactly_200_channels_in_one_request_is_accepted(protocol, bob):
    names = ["system:announcements"] * MAX_CHANNELS_PER_REQUEST
    assert say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": names}})[-1]["type"] == "SUBSCRIBED"


def test_binary_frames_are_refused_with_an_error(protocol, bob):
    protocol.on_binary(bob, b"\x00\x01")
    [error] = bob.take()
    assert error["data"]["code"] == Error.BINARY_NOT_SUPPORTED and bob.closed is None


@pytest.mark.parametrize(
    "channel,code",
    [
        ("clinic:clinic-2:queue", Error.FORBIDDEN_CHANNEL),
        ("user:carol:notifications", Error.FORBIDDEN_CHANNEL),
        ("system:secrets", Error.UNKNOWN_CHANNEL),
        ("clinic:" + "c" * 129 + ":queue", Error.UNKNOWN_CHANNEL),  # ids are at most 128 characters
    ],
)
def test_each_refused_channel_gets_an_error_before_subscribed(protocol, bob, channel, code):
    reply = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [channel, "system:announcements"]}})
    assert reply[0] == {
        "type": "ERROR",
        "data": {"code": code, "message": reply[0]["data"]["message"], "channel": channel},
    }
    assert reply[1] == {"type": "SUBSCRIBED", "data": {"channels": ["system:announcements"]}}


def test_a_long_refused_name_is_shortened_in_the_log_and_the_message(protocol, bob, monkeypatch):
    """One 64 KiB frame must not put 64 KiB into the log (20 a second, under the rate limit)."""
    logged = []
    monkeypatch.setattr(protocol_module, "event", lambda name, **fields: logged.append(fields))
    name = "system:" + "x" * 60_000
    [error, _] = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [name]}})
    assert error["data"]["channel"] == name  # the client's own, for it to match its request
    assert len(error["data"]["message"]) < 300 and len(logged[0]["channel"]) == 200


def test_a_subscribe_with_many_refused_channels_is_one_log_line(protocol, bob, monkeypatch):
    """200 forbidden names a message, 20 messages a second: 20 lines a second, not 4,000."""
    logged = []
    monkeypatch.setattr(protocol_module, "event", lambda name, **fields: logged.append((name, fields)))
    names = [f"clinic:other-{n}:queue" for n in range(MAX_CHANNELS_PER_REQUEST - 1)] + ["system:secrets"]
    reply = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": names}})
    assert len(reply) == MAX_CHANNELS_PER_REQUEST + 1  # still one ERROR each for the client
    [(name, fields)] = logged
    assert name == "ws.subscribe_denied" and fields["refused"] == MAX_CHANNELS_PER_REQUEST
    assert fields["channel"] == names[0] and fields["code"] == Error.FORBIDDEN_CHANNEL
    assert fields["channels"] == names[:10]


def test_a_128_character_id_is_a_real_channel(protocol):
    admin = FakeConn("alice", "admin", None)
    protocol.hub.add(admin)
    name = "clinic:" + "c" * 128 + ":queue"
    assert say(protocol, admin, {"type": "SUBSCRIBE", "data": {"channels": [name]}})[-1]["data"]["channels"] == [name]


def test_subscriptions_over_the_limit_are_refused_one_error_each(protocol, bob):
    names = ["system:announcements", "system:maintenance", "clinic:clinic-1:queue", "clinic:clinic-1:alerts"]
    reply = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": names}})
    assert [m["data"].get("code") for m in reply[:-1]] == [Error.TOO_MANY_SUBSCRIPTIONS]
    assert reply[0]["data"]["channel"] == "clinic:clinic-1:alerts"
    assert reply[-1]["data"]["channels"] == names[:3]


def test_a_burst_of_40_passes_the_41st_is_rate_limited_and_closed_1008(protocol, bob):
    for _ in range(40):
        assert say(protocol, bob, {"type": "PING"})[0]["type"] == "PONG"
    reply = say(protocol, bob, {"type": "PING"})
    assert reply == [{"type": "ERROR", "data": {"code": Error.RATE_LIMITED, "message": "too many messages; slow down"}}]
    assert bob.closed == (Close.POLICY_VIOLATION, "rate limit exceeded")


def test_the_bucket_refills_at_20_per_second(protocol, bob, clock):
    for _ in range(40):
        say(protocol, bob, {"type": "PING"})
    clock.now += 0.5  # half a second: ten more
    for _ in range(10):
        assert say(protocol, bob, {"type": "PING"})[0]["type"] == "PONG"
    assert say(protocol, bob, {"type": "PING"})[0]["data"]["code"] == Error.RATE_LIMITED


def test_sustained_20_per_second_is_never_limited(protocol, bob, clock):
    for _ in range(200):  # ten seconds at exactly the sustained rate, after the burst is spent
        clock.now += 0.05
        assert say(protocol, bob, {"type": "PING"})[0]["type"] == "PONG"


def test_binary_frames_count_against_the_rate_limit_too(protocol, bob):
    for _ in range(40):
        protocol.on_binary(bob, b"x")
    protocol.on_binary(bob, b"x")
    assert bob.take()[-1]["data"]["code"] == Error.RATE_LIMITED and bob.closed[0] == Close.POLICY_VIOLATION


def test_a_message_nested_deeper_than_the_parser_goes_is_invalid_json_and_the_socket_stays_open(protocol, bob):
    [error] = say(protocol, bob, "[" * 5000 + "]" * 5000)
    assert error["data"]["code"] == Error.INVALID_JSON and bob.closed is None


def test_a_channel_name_with_an_unpaired_surrogate_is_invalid_data_not_a_crash(protocol, bob):
    [error] = say(protocol, bob, '{"type":"SUBSCRIBE","data":{"channels":["clinic:\\ud800:queue"]}}')
    assert error["data"]["code"] == Error.INVALID_DATA and bob.closed is None


def test_messages_piling_up_behind_a_slow_subscribe_with_last_are_bounded(clock):
    """While the store takes its time, a client may queue MAX_BACKLOG messages, not megabytes."""
    last_values = SlowLastValues()
    protocol = ClientProtocol(Hub(max_clients=10, ping_interval=30), clock=clock, last_values=last_values)
    protocol.rate_burst = 1000  # the rate limit is not what is tested here
    bob = FakeConn()
    bob.defer = lambda work, *args: gevent.spawn(work, *args)
    protocol.hub.add(bob)
    say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "last": True}})
    for _ in range(MAX_BACKLOG):
        say(protocol, bob, {"type": "PING"})
    assert bob.closed is None and len(bob.backlog) == MAX_BACKLOG
    [refused] = say(protocol, bob, {"type": "PING"})
    assert refused["data"]["code"] == Error.RATE_LIMITED and bob.closed == (
        Close.POLICY_VIOLATION,
        "rate limit exceeded",
    )
    last_values.answer.set()


def test_messages_piling_up_behind_a_slow_subscribe_with_last_are_bounded_in_size_too(clock):
    last_values = SlowLastValues()
    protocol = ClientProtocol(Hub(max_clients=10, ping_interval=30), clock=clock, last_values=last_values)
    protocol.rate_burst = 1000
    bob = FakeConn()
    bob.defer = lambda work, *args: gevent.spawn(work, *args)
    protocol.hub.add(bob)
    say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "last": True}})
    big = {"type": "PING", "data": {"pad": "x" * 60_000}}
    for _ in range(MAX_BACKLOG_CHARS // 60_100):
        say(protocol, bob, big)
    assert bob.closed is None and len(bob.backlog) < MAX_BACKLOG
    [refused] = say(protocol, bob, big)
    assert refused["data"]["code"] == Error.RATE_LIMITED and bob.closed[0] == Close.POLICY_VIOLATION
    last_values.answer.set()


# -- SUBSCRIBE since: what a page rendered at a position would otherwise never see -------------------

QUEUE = "clinic:clinic-1:queue"


def stream_of(*filters: Filter, start: int = 0) -> Sequencer:
    """A stream in epoch e1 whose broadcasts start + 1, + 2, ... had these audiences (delivered to
    nobody here; this worker began at ``start``)."""
    stream = Sequencer(lambda e: 0, lambda a, n: [], on_reset=lambda e: None)
    stream.prime("e1", start)
    for offset, flt in enumerate(filters, start=start + 1):
        stream.offer(Envelope("T", {"n": offset}, flt, id=f"id-{offset}").placed("e1", offset))
    return stream


def since_protocol(clock, stream, **kwargs) -> ClientProtocol:
    return ClientProtocol(Hub(max_clients=10, ping_interval=30), clock=clock, stream=stream, **kwargs)


def test_subscribe_since_replays_what_the_connection_was_not_sent_then_answers_recovered(clock):
    stream = stream_of(
        Filter(channels=frozenset({QUEUE})),  # 1: the channel it takes now
        Filter(),  # 2: everyone, before it joined
        Filter(channels=frozenset({ANN})),  # 3: a channel it holds, at the offset it joined at
        Filter(user_ids=frozenset({"bob"})),  # 4: for bob, after it joined: it came live
        Filter(channels=frozenset({"clinic:clinic-2:queue"})),  # 5: another clinic's
        Filter(channels=frozenset({ANN})),  # 6: the channel it held, after it joined: it came live
        Filter(channels=frozenset({QUEUE}), roles=frozenset({"doctor"})),  # 7: the channel, another role
        Filter(channels=frozenset({QUEUE})),  # 8: the channel it takes now, after it joined
    )
    protocol = since_protocol(clock, stream)
    bob = FakeConn()
    bob.sent_after = 3
    protocol.hub.add(bob)
    protocol.hub.subscribe(bob, [ANN], 10)
    sent = say(
        protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "since": {"epoch": "e1", "offset": 0}}}
    )
    assert [frame.get("id") for frame in sent] == ["id-1", "id-2", "id-3", "id-8", None]
    assert [frame["offset"] for frame in sent[:4]] == [1, 2, 3, 8]
    assert sent[4] == {
        "type": "SUBSCRIBED",
        "data": {"channels": [QUEUE], "recovered": True, "epoch": "e1", "offset": 8},
    }
    # From a later position, only what came after it; with nothing after it, nothing.
    carol = FakeConn_subscribed(protocol, "carol")
    carol.sent_after = 8  # joined just now, as a page's first connection does
    again = say(
        protocol,
        carol,
        {"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "since": {"epoch": "e1", "offset": 1}}},
    )
    assert [frame.get("id") for frame in again] == ["id-2", "id-8", None]  # everyone's, and the channel's
    late = say(
        protocol,
        FakeConn_subscribed(protocol, "dan"),
        {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": {"epoch": "e1", "offset": 9}}},
    )
    assert late == [{"type": "SUBSCRIBED", "data": {"channels": [ANN], "recovered": True, "epoch": "e1", "offset": 8}}]


def test_a_second_subscribe_since_replays_only_what_its_own_channels_add(clock):
    """A page's first connection sends two (plain, then with "last"); the first replayed the user's and
    its channels' broadcasts, and sending those again would be for nothing (and a way to make a worker
    scan and copy its window for every message)."""
    stream = stream_of(
        Filter(user_ids=frozenset({"bob"})),  # 1: for bob
        Filter(channels=frozenset({ANN})),  # 2: the first SUBSCRIBE's channel
        Filter(channels=frozenset({QUEUE})),  # 3: the second's
    )
    protocol = since_protocol(clock, stream)
    bob = FakeConn_subscribed(protocol, "bob")
    bob.sent_after = 3  # joined after all three
    since = {"epoch": "e1", "offset": 0}
    first = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})
    assert [frame.get("id") for frame in first] == ["id-1", "id-2", None]
    second = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "since": since}})
    assert [frame.get("id") for frame in second] == ["id-3", None] and second[-1]["data"]["recovered"] is True
    assert say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})[0].get("id") is None
    # Unsubscribed and taken again: its broadcasts may have been dropped with it, and come again.
    say(protocol, bob, {"type": "UNSUBSCRIBE", "data": {"channels": [ANN]}})
    again = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})
    assert [frame.get("id") for frame in again] == ["id-2", None]


def test_a_channel_taken_without_since_counts_only_from_then_for_a_later_subscribe_since(clock):
    """A broadcast to two channels, sent before the connection took one of them plainly, was counted as
    sent through that one by a later SUBSCRIBE since of the other, and left out of its replay: it had
    reached the connection through neither (found by review). What came after the plain SUBSCRIBE did."""
    stream = stream_of(
        Filter(),  # 1: everyone, before it joined
        Filter(channels=frozenset({QUEUE, ANN})),  # 2: after it joined, to both: it held neither
        Filter(channels=frozenset({ANN})),  # 3: the other channel
    )
    protocol = since_protocol(clock, stream)
    bob = FakeConn_subscribed(protocol, "bob")
    bob.sent_after = 1
    [plain] = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE]}})  # from now on: after 3
    assert plain["type"] == "SUBSCRIBED" and bob.late == {QUEUE: 3}
    # To both again, after the plain SUBSCRIBE: it came live through the channel it took.
    stream.offer(Envelope("T", {"n": 4}, Filter(channels=frozenset({QUEUE, ANN})), id="id-4").placed("e1", 4))
    since = {"epoch": "e1", "offset": 1}
    replayed = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})
    assert [frame.get("id") for frame in replayed] == ["id-2", "id-3", None]
    assert replayed[-1]["data"]["recovered"] is True and bob.late is None  # every channel has all after 1 now
    # Dropped, it is not late any more; taken plainly again, it is late from then.
    say(protocol, bob, {"type": "UNSUBSCRIBE", "data": {"channels": [QUEUE]}})
    say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE]}})
    assert bob.late == {QUEUE: 4}
    say(protocol, bob, {"type": "UNSUBSCRIBE", "data": {"channels": [QUEUE]}})
    assert bob.late == {}


def test_a_subscribe_since_from_after_the_connection_joined_leaves_what_came_before_it_untold(clock):
    """A SUBSCRIBE since a position after the connection's start replays only from there: the channels it
    held are complete from there (and before it only as they were), not from its start (found by review:
    a fragment rendered later, then one rendered earlier, lost a broadcast to both of theirs)."""
    zone = "clinic:clinic-1:alerts"
    stream = stream_of(
        Filter(),  # 1: everyone, before it joined
        Filter(channels=frozenset({QUEUE, ANN})),  # 2: to two channels it did not hold
        Filter(channels=frozenset({zone})),  # 3: to a third
    )
    protocol = since_protocol(clock, stream)
    bob = FakeConn_subscribed(protocol, "bob")
    bob.sent_after = 1
    say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE]}})  # plainly, after 3
    later = say(
        protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [zone], "since": {"epoch": "e1", "offset": 2}}}
    )
    assert [frame.get("id") for frame in later] == ["id-3", None]
    assert bob.sent_after == 1 and bob.late == {QUEUE: 2, zone: 2}  # complete from 2 on, not from 1
    earlier = say(
        protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": {"epoch": "e1", "offset": 1}}}
    )
    assert [frame.get("id") for frame in earlier] == ["id-2", None]  # it reached neither of the others
    assert bob.sent_after == 1 and bob.late is None


def test_subscribe_since_pays_in_the_rate_limit_for_the_broadcasts_it_looks_through(clock):
    """Looking through the recent window costs ~40-60 plain SUBSCRIBEs per 4,096: a client that sends since
    again and again is slowed down (and closed 1008) as one that sends anything too fast."""
    protocol = since_protocol(clock, stream_of(*[Filter(user_ids=frozenset({"someone-else"}))] * 2048))
    with_since = {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": {"epoch": "e1", "offset": 0}}}
    bob = FakeConn_subscribed(protocol, "bob")
    for _ in range(8):  # 1 + 2048 // 512 = 5 messages each: the burst of 40
        assert say(protocol, bob, with_since)[-1]["type"] == "SUBSCRIBED"
    assert say(protocol, bob, with_since)[0]["data"]["code"] == Error.RATE_LIMITED
    assert bob.closed == (Close.POLICY_VIOLATION, "rate limit exceeded")
    carol = FakeConn_subscribed(protocol, "carol")
    for _ in range(9):  # the same without since: one message each
        assert say(protocol, carol, {"type": "SUBSCRIBE", "data": {"channels": [ANN]}})[-1]["type"] == "SUBSCRIBED"
    assert carol.closed is None


def test_subscribe_since_from_before_this_workers_window_reads_it_back_from_the_store(clock):
    """A page rendered just before a deploy whose socket lands on the new worker: its window begins at
    the worker's start, after the render. The broadcasts in between are read back from the store (once,
    for every such page, as resumes do) and replayed; they used to be refused (history_gone: refetch)."""
    history = [
        Envelope("T", {"n": offset}, flt, id=f"id-{offset}").placed("e1", offset)
        for offset, flt in enumerate(
            [Filter(), Filter(channels=frozenset({QUEUE})), Filter(user_ids=frozenset({"carol"})), Filter()], start=1
        )
    ]
    reads = []

    def fetch(after, limit):
        reads.append(after)
        return [e for e in history if e.offset > after][:limit]

    stream = Sequencer(lambda e: 0, fetch, on_reset=lambda e: None)
    stream.prime("e1", 4)  # this worker began after all four
    protocol = since_protocol(clock, stream)
    bob = FakeConn_subscribed(protocol, "bob")
    bob.sent_after = 4
    waiting = gevent.event.Event()
    bob.defer = lambda work, *args: gevent.spawn(lambda: (waiting.wait(5), work(*args)))
    since = {"epoch": "e1", "offset": 1}
    protocol.on_text(bob, json.dumps({"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "since": since}}))
    protocol.on_text(bob, json.dumps({"type": "PING"}))  # waits behind it
    assert bob.take() == [] and bob.backlog is not None
    waiting.set()
    for _ in range(500):  # bounded: 5 s
        if bob.backlog is None:
            break
        gevent.sleep(0.01)
    sent = bob.take()
    assert [frame.get("id") for frame in sent[:3]] == ["id-2", "id-4", None]  # not carol's
    assert sent[2]["type"] == "SUBSCRIBED" and sent[2]["data"]["recovered"] is True
    assert sent[3]["type"] == "PONG"  # answered after it, in order
    # Once read, the window reaches back: another page's SUBSCRIBE since is answered at once.
    carol = FakeConn_subscribed(protocol, "carol")
    carol.sent_after = 4
    reads.clear()
    again = say(protocol, carol, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})
    assert [frame.get("id") for frame in again] == ["id-3", "id-4", None] and reads == []


def test_subscribe_since_whose_broadcasts_the_store_cannot_give_back_is_history_gone(clock):
    def fetch(after, limit):
        raise RuntimeError("the store is away")

    stream = Sequencer(lambda e: 0, fetch, on_reset=lambda e: None)
    stream.prime("e1", 4)
    protocol = since_protocol(clock, stream)
    bob = FakeConn_subscribed(protocol, "bob")
    sent = say(
        protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "since": {"epoch": "e1", "offset": 1}}}
    )
    assert [frame["type"] for frame in sent] == ["SUBSCRIBED"] and sent[0]["data"]["reason"] == "history_gone"
    assert bob.channels == {QUEUE}  # subscribed all the same: the client refetches


def test_a_pages_two_subscribes_since_over_a_full_window_leave_room_in_the_burst(clock):
    """realtime.js sends two (plain, and with last) as the socket opens: even over a window of 4,096
    (or more, read back after a deploy) they cost 18 of the 40, and what the page sends next is answered."""
    protocol = since_protocol(clock, stream_of(*[Filter(user_ids=frozenset({"someone-else"}))] * 4352))
    bob = FakeConn_subscribed(protocol, "bob")
    for name in (ANN, QUEUE):
        message = {"type": "SUBSCRIBE", "data": {"channels": [name], "since": {"epoch": "e1", "offset": 0}}}
        assert say(protocol, bob, message)[-1]["type"] == "SUBSCRIBED"
    for _ in range(20):
        assert say(protocol, bob, {"type": "PING"})[0]["type"] == "PONG"
    assert bob.closed is None


def FakeConn_subscribed(protocol, user_id):  # noqa: N802 (reads as the class it builds)
    conn = FakeConn(user_id)
    protocol.hub.add(conn)
    return conn


@pytest.mark.parametrize(
    "since,reason",
    [
        ({"epoch": "e0", "offset": 0}, "epoch_changed"),  # rendered in a stream that is gone
        ({"epoch": "e1", "offset": 1}, "history_gone"),  # from before this worker began (at 2)
    ],
)
def test_subscribe_since_that_cannot_be_replayed_says_why_and_replays_nothing(clock, since, reason):
    stream = stream_of(Filter(), start=2)
    protocol = since_protocol(clock, stream)
    bob = FakeConn_subscribed(protocol, "bob")
    sent = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})
    assert sent == [
        {
            "type": "SUBSCRIBED",
            "data": {"channels": [ANN], "recovered": False, "reason": reason, "epoch": "e1", "offset": 3},
        }
    ]
    assert bob.channels == {ANN}  # subscribed all the same: the client refetches


def test_subscribe_since_with_more_to_replay_than_allowed_or_without_a_history_replays_nothing(clock):
    protocol = since_protocol(clock, stream_of(Filter(), Filter(), Filter()), max_replay=2)
    bob = FakeConn_subscribed(protocol, "bob")
    bob.sent_after = 3
    sent = say(
        protocol,
        bob,
        {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": {"epoch": "e1", "offset": 0}}},
    )
    assert [frame["type"] for frame in sent] == ["SUBSCRIBED"] and sent[0]["data"]["reason"] == "too_many_missed"
    plain = ClientProtocol(Hub(max_clients=10, ping_interval=30), clock=clock)
    sent = say(
        plain,
        FakeConn_subscribed(plain, "bob"),
        {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": {"epoch": "e1", "offset": 0}}},
    )
    assert sent == [{"type": "SUBSCRIBED", "data": {"channels": [ANN], "recovered": False, "reason": "disabled"}}]


@pytest.mark.parametrize(
    "since",
    [
        7,
        "e1:0",
        {"epoch": "e1"},
        {"offset": 0},
        {"epoch": "", "offset": 0},
        {"epoch": "e1", "offset": -1},
        {"epoch": "e1", "offset": True},
        {"epoch": "e1", "offset": 1.5},
        {"epoch": "e" * 65, "offset": 0},
    ],
)
def test_a_malformed_since_is_an_error_and_subscribes_nothing(protocol, bob, since):
    [error] = say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": since}})
    assert error["data"]["code"] == Error.INVALID_DATA and '"since"' in error["data"]["message"]
    assert bob.channels == set()


class StoredLastValues:
    """A history whose last value of every channel asked is the one envelope given."""

    def __init__(self, envelope: Envelope):
        self.envelope = envelope

    def last_values(self, names, max_age_ms):
        return {name: [self.envelope] for name in names}


def paused_fan_out(clock, pausing, *, last: Envelope | None = None):
    """A protocol over a real hub and sequencer, whose fan-outs pause after taking their recipients and
    before pushing to any: ``pausing()`` runs then (the messages handled meanwhile)."""

    def push_all(conns, frame) -> int:
        pausing()
        for conn in conns:
            conn.push(frame)
        return len(conns)

    hub = Hub(max_clients=10, ping_interval=30, push_all=push_all)
    stream = Sequencer(hub.deliver, lambda a, n: [], on_reset=lambda e: None)
    stream.prime("e1", 0)
    last_values = LastValues(StoredLastValues(last), stream, ttl_ms=60_000) if last is not None else None
    return ClientProtocol(hub, clock=clock, stream=stream, last_values=last_values), stream


def test_a_plain_subscribe_made_while_a_fan_out_pauses_is_sent_what_it_adds_to_that_fan_out(clock):
    """The fan-out's recipients were taken before the SUBSCRIBE, and it was answered with the offset
    before: that broadcast to the channel never came, and the next PONG, past it, said it had (found by
    review). It comes with the answer now; not to a connection that gets it live (one that dropped the
    channel and took it again meanwhile too), nor to one admitted during the pause (it starts after it)."""
    subscribe = {"type": "SUBSCRIBE", "data": {"channels": [QUEUE]}}
    answers: dict[str, list[dict]] = {}
    conns: dict[str, FakeConn] = {}

    def pausing() -> None:
        if answers:
            return  # one pause is enough
        for name in ("bob", "carol", "dan"):
            answers[name] = say(protocol, conns[name], subscribe)
        say(protocol, conns["eve"], {"type": "UNSUBSCRIBE", "data": {"channels": [QUEUE]}})
        answers["eve"] = say(protocol, conns["eve"], subscribe)
        # Two SUBSCRIBEs in one pause (a page's plain group, then its `last` group): the broadcast comes
        # with the first only; the second's channel adds nothing the first did not (found by review).
        answers["fay"] = say(protocol, conns["fay"], subscribe)
        answers["fay, again"] = say(protocol, conns["fay"], {"type": "SUBSCRIBE", "data": {"channels": [ANN]}})
        # A SUBSCRIBE since that cannot be replayed: nothing catches the broadcast up, and a later SUBSCRIBE
        # since must not count it as sent through the channel taken (found by review).
        gone = {"epoch": "gone", "offset": 0}
        answers["gus"] = say(
            protocol, conns["gus"], {"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "since": gone}}
        )

    protocol, stream = paused_fan_out(clock, pausing)
    for name in ("bob", "carol", "dan", "eve", "fay", "gus"):
        conns[name] = FakeConn_subscribed(protocol, name)
    protocol.hub.subscribe(conns["carol"], [ANN], 10)  # a recipient: it reaches her live
    protocol.hub.subscribe(conns["eve"], [QUEUE], 10)  # a recipient, who drops the channel and takes it again
    conns["dan"].sent_after = 1  # admitted during the pause: his CONNECTED said offset 1 (he starts after it)
    stream.offer(Envelope("T", {"n": 1}, Filter(channels=frozenset({QUEUE, ANN})), id="id-1").placed("e1", 1))
    frame = {"type": "T", "data": {"n": 1}, "id": "id-1", "offset": 1}
    subscribed = {"type": "SUBSCRIBED", "data": {"channels": [QUEUE], "epoch": "e1", "offset": 0}}
    assert answers["bob"] == [frame, subscribed]
    assert answers["carol"] == [subscribed] and conns["carol"].take() == [frame]  # live, once
    assert answers["dan"] == [subscribed] and conns["dan"].take() == []
    assert answers["eve"] == [subscribed] and conns["eve"].take() == [frame]  # live, once
    assert answers["fay"] == [frame, subscribed] and conns["fay"].take() == []
    assert answers["fay, again"] == [{"type": "SUBSCRIBED", "data": {"channels": [ANN], "epoch": "e1", "offset": 0}}]
    assert answers["gus"][-1]["data"]["recovered"] is False and conns["gus"].take() == []
    caught = say(
        protocol,
        conns["gus"],
        {"type": "SUBSCRIBE", "data": {"channels": [ANN], "since": {"epoch": "e1", "offset": 0}}},
    )
    assert [frame.get("id") for frame in caught] == ["id-1", None]
    # Once the fan-out is done, a SUBSCRIBE is plain again: nothing replayed.
    assert say(protocol, FakeConn_subscribed(protocol, "erin"), subscribe) == [
        {"type": "SUBSCRIBED", "data": {"channels": [QUEUE], "epoch": "e1", "offset": 1}}
    ]


def test_a_second_subscriber_asking_the_last_value_while_it_is_being_sent_out_gets_it(clock):
    """A page's second fragment of a channel it holds asks for its last value during that value's
    fan-out: it was dropped as if the broadcast were replayed to it, and the fragment waited for the
    next update (found by review of the change above)."""
    answers: list[dict] = []
    update = Envelope("T", {"n": 1}, Filter(channels=frozenset({QUEUE})), id="id-1").placed("e1", 1)

    def pausing() -> None:
        if not answers:
            answers.extend(say(protocol, bob, {"type": "SUBSCRIBE", "data": {"channels": [QUEUE], "last": True}}))

    protocol, stream = paused_fan_out(clock, pausing, last=update)
    bob = FakeConn_subscribed(protocol, "bob")
    protocol.hub.subscribe(bob, [QUEUE], 10)
    stream.offer(update)
    assert answers == [
        {"type": "T", "data": {"n": 1}, "id": "id-1", "offset": 1, "last": True},
        {"type": "SUBSCRIBED", "data": {"channels": [QUEUE], "epoch": "e1", "offset": 0}},
    ]
    assert bob.take() == [{"type": "T", "data": {"n": 1}, "id": "id-1", "offset": 1}]  # and live, as its own
