"""Structured logs: one JSON object per line on stderr.

``event("ws.connect", clientId=..., userId=...)`` writes
``{"ts": ..., "level": "info", "event": "ws.connect", "clientId": ..., ...}``.
Tokens and secrets are never passed here; as a second line of defence any
field whose name looks like one is replaced by ``"[redacted]"``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

logger = logging.getLogger("relay.events")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_SECRET_WORDS = ("token", "secret", "password", "authorization", "cookie")


def event(name: str, level: str = "info", **fields) -> None:
    numeric = _LEVELS[level]
    if logger.isEnabledFor(numeric):
        logger.log(numeric, name, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
        }
        fields = getattr(record, "fields", None)
        if fields is not None:
            out["event"] = record.msg
            for key, value in fields.items():
                out[key] = "[redacted]" if any(word in key.lower() for word in _SECRET_WORDS) else value
        else:
            out["logger"] = record.name
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str = "INFO") -> None:
    """Send every ``relay.*`` logger to stderr as JSON lines (idempotent)."""
    # Records never show thread or process names; asking for them costs a
    # gevent _DummyThread per greenlet that logs (measured: ~3% of a connect).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("relay")
    if not any(getattr(h, "_relay_json", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._relay_json = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
