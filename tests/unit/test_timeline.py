"""The last hour by minute (``/health?history=1``): buckets, the window, merging workers, error rates."""

from relay.timeline import DURATION_BINS_MS, Minute, Timeline, close_label, error_rates, history_json, merge


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


START = 1_800_000_000 // 60 * 60  # the start of a minute


def test_each_kind_of_event_lands_in_the_current_minute():
    clock = Clock(START + 5)
    timeline = Timeline(clock)
    timeline.connected()
    timeline.connected()
    timeline.disconnected(1006)
    timeline.auth_failed("expired")
    timeline.client_error("invalid_json")
    timeline.client_error("invalid_json")
    timeline.broadcast(delivered=7, duration_ms=2.4)
    [minute] = timeline.snapshot()
    assert minute == {
        "start": START,
        "connectionsMax": 2,
        "connects": 2,
        "disconnects": {"1006": 1},
        "authFailures": {"expired": 1},
        "clientErrors": {"invalid_json": 2},
        "broadcasts": 1,
        "delivered": 7,
        "durations": [1 if bound == 3 else 0 for bound in DURATION_BINS_MS] + [0],
    }


def test_a_new_minute_starts_with_the_connections_still_open_as_its_maximum():
    clock = Clock(START)
    timeline = Timeline(clock)
    for _ in range(3):
        timeline.connected()
    timeline.disconnected(1000)
    clock.now += 60
    timeline.broadcast(1, 1.0)
    older, newer = timeline.snapshot()
    assert (older["connectionsMax"], newer["connectionsMax"]) == (3, 2)
    assert newer["connects"] == 0 and newer["broadcasts"] == 1


def test_only_the_last_hour_is_kept():
    clock = Clock(START)
    timeline = Timeline(clock)
    for _ in range(90):
        timeline.broadcast(1, 1.0)
        clock.now += 60
    kept = timeline.snapshot()
    assert len(kept) == 60
    assert kept[-1]["start"] == START + 90 * 60 and kept[0]["start"] == START + 31 * 60


def test_close_codes_are_a_bounded_label_set():
    assert [close_label(c) for c in (1000, 1006, 4401, 4409, 4429, None, 3999, 4999)] == [
        "1000",
        "1006",
        "4401",
        "4409",
        "4429",
        "1005",
        "other",
        "other",
    ]


def test_merging_workers_adds_counts_and_fills_empty_minutes():
    a, b = Timeline(Clock(START + 1)), Timeline(Clock(START + 2))
    for timeline, delivered in ((a, 3), (b, 4)):
        timeline.connected()
        timeline.broadcast(delivered, 1.0)
        timeline.auth_failed("bad_signature")
    b.auth_failed("expired")
    merged = merge([a.snapshot(), b.snapshot(), [{"start": "nonsense"}]], now=START + 59)
    assert len(merged) == 60 and merged[-1].start == START and merged[0].start == START - 59 * 60
    last = merged[-1]
    assert (last.connects, last.connections_max, last.broadcasts, last.delivered) == (2, 2, 2, 7)
    assert last.auth_failures == {"bad_signature": 2, "expired": 1}
    assert all(m.broadcasts == 0 for m in merged[:-1])


def test_percentiles_come_from_the_merged_histogram():
    minute = Minute(START)
    timeline = Timeline(Clock(START))
    for _ in range(98):
        timeline.broadcast(1, 0.8)  # the 1 ms bin
    timeline.broadcast(1, 40)  # the 50 ms bin
    timeline.broadcast(1, 40)
    minute.add(Minute.from_json(timeline.snapshot()[0]))
    assert (minute.percentile(0.5), minute.percentile(0.99)) == (1, 50)
    assert Minute(START).percentile(0.5) is None
    assert history_json([minute])["history"][0]["broadcastP99Ms"] == 50


def test_error_rates_over_1_5_and_15_minutes():
    clock = Clock(START)
    timeline = Timeline(clock)
    # 10 minutes ago: 6 auth failures, 4 abnormal closes of 4
    clock.now = START - 10 * 60
    for _ in range(6):
        timeline.auth_failed("expired")
    for _ in range(4):
        timeline.disconnected(1006)
    # now: 2 client errors, 1 normal close and 1 abnormal one
    clock.now = START
    timeline.client_error("rate_limited")
    timeline.client_error("invalid_json")
    timeline.disconnected(1000)
    timeline.disconnected(4408)
    rates = error_rates(merge([timeline.snapshot()], START))
    assert rates["1m"] == {"authFailuresPerMin": 0.0, "clientErrorsPerMin": 2.0, "abnormalCloseShare": 0.5, "closes": 2}
    assert rates["5m"]["clientErrorsPerMin"] == 0.4 and rates["5m"]["authFailuresPerMin"] == 0.0
    assert rates["15m"] == {
        "authFailuresPerMin": 0.4,
        "clientErrorsPerMin": round(2 / 15, 3),
        "abnormalCloseShare": round(5 / 6, 4),
        "closes": 6,
    }
