"""Structured logs: one JSON object per line on stderr.

``event("ws.connect", clientId=..., userId=...)`` writes
``{"ts": ..., "level": "info", "event": "ws.connect", "clientId": ..., ...}``.
Tokens and secrets are never passed here; as a second line of defence any
field whose name looks like one is replaced by ``"[redacted]"``.

``bind(requestId=...)`` adds fields to every line written in the current
context: the HTTP layer binds the request id for the length of a request, so
each line a request causes carries it. (Under gevent every greenlet has its
own context: a line written from an event-loop callback carries none.)
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import re
import sys
import time
from collections import deque
from collections.abc import MutableMapping
from contextvars import ContextVar, Token

import gevent

from .logwriter import stream_for

logger = logging.getLogger("relay.events")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_WORDS = ("token", "secret", "password", "authorization", "cookie")


_direct = None  # the stream our own handler writes to, when it is the only one
_bound: ContextVar[dict | None] = ContextVar("relay_log_fields", default=None)


def bind(**fields: object) -> Token:
    """Add ``fields`` to every line of the current context until :func:`unbind` with the token."""
    return _bound.set({**(_bound.get() or {}), **fields})


def unbind(token: Token) -> None:
    _bound.reset(token)


def event(name: str, *, level: str = "info", **fields: object) -> None:
    numeric = _LEVELS[level]
    if not logger.isEnabledFor(numeric):
        return
    bound = _bound.get()
    if bound:
        fields = {**bound, **fields}
    if _direct is not None:
        # The usual case (our JSON handler alone): write the line without building a
        # LogRecord and walking handlers, a third of the cost, on every connect.
        _direct.write(_line(time.time(), level, fields, name) + "\n")
    else:
        logger.log(numeric, name, extra={"fields": fields})


class Sparse:
    """An event anyone who reaches the port can cause, once a request: at most one line per ``every_s``
    per key (the client's address), each with ``notLoggedBefore``, how many of that key went unlogged
    since the last. Remembers the ``kept`` keys logged most recently; a key forgotten is logged again
    at once (sooner, never later). Called from request greenlets; nothing here waits."""

    def __init__(self, name: str, *, level: str = "warning", every_s: float = 60.0, kept: int = 1000):
        self.name, self.level, self.every_s, self.kept = name, level, every_s, kept
        self._seen: dict[str, list[float]] = {}  # key -> [when last logged, how many since]; oldest first

    def __call__(self, key: str, **fields: object) -> None:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            seen[1] += 1
            return
        self._seen.pop(key, None)
        self._seen[key] = [now, 0]  # to the end: the key logged longest ago goes first
        if len(self._seen) > self.kept:
            del self._seen[next(iter(self._seen))]
        event(self.name, level=self.level, **fields, notLoggedBefore=int(seen[1]) if seen is not None else 0)


@functools.lru_cache(maxsize=256)
def _secret_name(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_WORDS)


# One encoder for every line (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return dt.datetime.fromtimestamp(whole, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(created: float) -> str:
    """``2026-12-03T13:30:00.123+00:00``: the formatted second is reused by every line written within it."""
    whole = int(created)
    return f"{_second(whole)}.{int((created - whole) * 1000):03d}+00:00"


def line(name: str, level: str, **fields: object) -> str:
    """One log line (without its newline), as :func:`event` writes it, stamped now."""
    return _line(time.time(), level, fields, name)


def _line(created: float, level: str, fields: dict, name: str | None = None, **extra: object) -> str:
    out: dict[str, object] = {"ts": _timestamp(created), "level": level}
    if name is not None:
        out["event"] = name
    for key, value in fields.items():
        out[key] = "[redacted]" if _secret_name(key) else value
    out.update(extra)
    return _encode(out)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        extra = {"exception": self.formatException(record.exc_info)} if record.exc_info else {}
        fields = getattr(record, "fields", None)
        if fields is not None:
            return _line(record.created, level, fields, record.msg, **extra)
        bound = _bound.get() or {}
        return _line(record.created, level, bound, logger=record.name, message=record.getMessage(), **extra)


# A query parameter and its value: "?token=abc" in "/ws?token=abc", or at the start of a bare query
# string (the access log's %(q)s). Linear in the line's length: a name cannot hold a delimiter, so no
# part of the line is tried twice (a lazy name with the secret words inside took 1.6 s on one 4 KB
# request line, found by review; an invalid request line is logged whole, unauthenticated).
_PARAMETER = re.compile(r"(^|[?&;])([^=&;?\s\"#]*)=([^&;\s\"#]*)")
# The access log's atoms that carry the URL (the others are headers and the environ: not redacted, as a
# token never travels there, and not scanned, as a hundred large headers would make each line slow).
_URL_ATOMS = ("r", "q", "{raw_uri}e", "{query_string}e", "{request_uri}e")


def _redact_parameter(match: re.Match) -> str:
    return f"{match[1]}{match[2]}=[redacted]" if _secret_name(match[2]) else match[0]


def redact_url(text: str) -> str:
    """``text`` with the value of every query parameter named like a secret replaced by ``[redacted]``."""
    return _PARAMETER.sub(_redact_parameter, text) if "=" in text else text


class RedactUrls(logging.Filter):
    """For other libraries' log lines that carry a request's URL: gunicorn's error log ("Error handling
    request /ws?token=...") and its access log, if an operator turns it on. A socket's connection token
    travels in its URL (the contract), and a token in a log is a live credential for its ten minutes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_url(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact_url(arg) if isinstance(arg, str) else arg for arg in args)
        elif isinstance(args, MutableMapping):  # the access log's atoms
            for key in _URL_ATOMS:
                value = args.get(key)
                if isinstance(value, str):
                    args[key] = redact_url(value)
        return True


class JsonHandler(logging.StreamHandler):
    """Our stderr handler (a class of its own, so ``configure`` can tell it from anyone else's); in a
    gevent worker it writes through a :class:`relay.logwriter.LineWriter`, which never waits."""

    def __init__(self) -> None:
        super().__init__(stream_for(sys.stderr))
        self.setFormatter(JsonFormatter())


class OffTheLoop(logging.Handler):
    """Someone else's handler on a ``relay`` logger (an operator's log config: syslog, a socket, HTTP),
    called by one greenlet of its own, in order, through a bounded queue.

    Lines are logged from event-loop callbacks (a SUBSCRIBE, a close), where nothing may wait: a
    handler that waited on a gevent socket, or on its own lock held by a greenlet that did, raised
    BlockingSwitchOutError there, which lost the line and left the frame's handling half done; and
    from greenlets that deliver to every socket (the stream's fan-out), which such a handler held up.
    Past ``MAX_WAITING`` lines waiting for a handler that does not keep up, the oldest are dropped,
    and said so on stderr every thousandth. Our own JSON handler writes to stderr without switching,
    and is not wrapped.
    """

    MAX_WAITING = 10_000

    def __init__(self, inner: logging.Handler):
        self.inner = inner  # first: Handler.__init__ hashes the new handler (see __hash__)
        super().__init__()
        self._waiting: deque[logging.LogRecord] = deque()
        self._writer: gevent.Greenlet | None = None
        self.dropped = 0

    def handle(self, record: logging.LogRecord) -> bool:  # no lock of our own: nothing here waits
        if record.levelno < self.inner.level:
            return False
        if len(self._waiting) >= self.MAX_WAITING:
            self._waiting.popleft()
            self.dropped += 1
            if self.dropped % 1000 == 1:
                message = f"{self.dropped} log lines dropped: {self.inner!r} does not keep up"
                notice = line("log.dropped", "error", count=self.dropped, message=message)
                stream_for(sys.stderr).write(notice + "\n")
        self._waiting.append(record)
        if self._writer is None:
            self._writer = gevent.spawn(self._write_waiting)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)

    # It stands for the handler it wraps: code that added that handler removes it by reference
    # (Logger.removeHandler compares with ==), and would otherwise leave this wrapper behind.
    def __eq__(self, other: object) -> bool:
        return other is self or other is self.inner

    def __hash__(self) -> int:
        return hash(self.inner)

    def _write_waiting(self) -> None:
        try:
            while self._waiting:
                self.inner.handle(self._waiting.popleft())
        finally:
            self._writer = None  # nothing switches between the last check and here: no line is left behind


def _move_others_off_the_loop() -> None:
    """Wrap every handler but ours on the ``relay`` loggers in :class:`OffTheLoop` (once each)."""
    names = ["relay", *(name for name in logging.Logger.manager.loggerDict if name.startswith("relay."))]
    for name in names:
        each = logging.getLogger(name)
        for index, handler in enumerate(each.handlers):
            if not isinstance(handler, (JsonHandler, OffTheLoop)):
                each.handlers[index] = OffTheLoop(handler)


def configure(level: str = "INFO") -> None:
    """Send every ``relay.*`` logger to stderr as JSON lines (idempotent); anyone else's handlers on
    them are called off the event loop (:class:`OffTheLoop`)."""
    # No record shows a thread name; asking for one costs a gevent _DummyThread per
    # greenlet that logs (measured: ~3% of a connect). (gunicorn's format needs the pid.)
    logging.logThreads = False
    root = logging.getLogger("relay")
    if not any(isinstance(h, JsonHandler) for h in root.handlers):
        root.addHandler(JsonHandler())
        root.propagate = False
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    global _direct
    ours = [h for h in root.handlers if isinstance(h, JsonHandler)]
    only_ours = len(root.handlers) == 1 and ours and not logger.handlers and logger.propagate
    _direct = ours[0].stream if only_ours else None
    _move_others_off_the_loop()
