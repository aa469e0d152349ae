"""relay.eventlog: one JSON line per event, its timestamp exactly as datetime writes it."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest

from relay import eventlog


@pytest.mark.parametrize("created", [0.5, 1_700_000_000.0, 1_700_000_000.9999, 1_764_770_000.123456, 1_764_770_059.999])
def test_the_timestamp_is_utc_iso_to_the_millisecond(created):
    expected = dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")
    assert eventlog._timestamp(created) == expected


def test_a_line_is_one_json_object_with_secrets_redacted(monkeypatch):
    out = io.StringIO()
    eventlog.configure("INFO")
    monkeypatch.setattr(eventlog, "_direct", out)
    eventlog.event(
        "ws.connect", clientId="c-1", userId="bob", token="T0P-S3CRET", note="naïve ✓", at=dt.date(2026, 1, 2)
    )
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "ws.connect" and record["level"] == "info"
    assert record["clientId"] == "c-1" and record["userId"] == "bob"
    assert record["token"] == "[redacted]" and "T0P-S3CRET" not in line
    assert record["note"] == "naïve ✓" and "naïve" in line  # UTF-8, not \\u escapes
    assert record["at"] == "2026-01-02"  # anything else is written as its str()
    dt.datetime.fromisoformat(record["ts"])
