"""What the operator commands make of their input: a piped password, and a --url that names an endpoint."""

from __future__ import annotations

import io

import click
import pytest

from blueprints.user_commands import _ask_password
from relay.opsclient import _url_problem


def piped(data: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding="ascii")  # not a terminal; the locale's decoder is strict


@pytest.mark.parametrize(
    "data,password",
    [(b"s3cret-pw\n", "s3cret-pw"), (b"with spaces  \r\n", "with spaces  "), ("pâté-pw\n".encode(), "pâté-pw")],
)
def test_a_piped_password_is_the_first_line_as_it_is(monkeypatch, data, password):
    monkeypatch.setattr("sys.stdin", piped(data + b"second line\n"))
    assert _ask_password() == password


@pytest.mark.parametrize(
    "stdin,says",
    [(b"", "no password"), (b"\n", "no password"), (None, "no password"), (b"caf\xe9\n", "is not UTF-8 text")],
)
def test_nothing_or_not_text_piped_is_a_usage_error_not_a_traceback(monkeypatch, stdin, says):
    monkeypatch.setattr("sys.stdin", None if stdin is None else piped(stdin))  # None: started with no stdin at all
    with pytest.raises(click.UsageError, match=says):
        _ask_password()


@pytest.mark.parametrize(
    "url,problem",
    [
        ("http://127.0.0.1:3001", None),
        ("https://example.test/realtime/", None),  # the prefix a proxy serves it under
        ("https://example.test/realtime/ws", None),  # ...even one ending like an endpoint
        ("https://example.test/api-gateway/api", None),
        ("http://127.0.0.1:3001/health", "leave /health out"),
        ("http://127.0.0.1:3001/broadcast/", "leave /broadcast out"),
        ("http://127.0.0.1:3001/metrics", "leave /metrics out"),
    ],
)
def test_a_url_that_is_an_endpoint_is_refused_and_a_prefix_is_not(url, problem):
    said = _url_problem(url)
    assert said is None if problem is None else problem in (said or "")
