"""Request bodies: whole within a deadline, and no bigger than their route needs, or refused unread;
and answers: taken by the client within a deadline, or the connection is closed.

A WSGI middleware in front of the app. gunicorn bounds how long a request's
headers (or an upgrade request) may take: its ``keepalive``, which
``gunicorn.conf.py`` sets to ``HTTP_REQUEST_TIMEOUT_MS`` capped at 5 s, the
same wait that closes an idle keep-alive connection (gunicorn's parser cannot
tell a silent client from an idle one, so those are closed without an
answer). It does not bound the body: a client announcing
60,000 bytes and sending one every two seconds would hold a request slot and a
greenlet for a day, and a few thousand of them would starve real users. Here:

- a body announced bigger than its route's limit is refused before a byte of
  it is read (413; ``/broadcast`` keeps its documented 400 ``body_too_large``);
- a body must have fully arrived within ``HTTP_REQUEST_TIMEOUT_MS`` after the
  headers, or the request is answered 408 and the connection closed;
- the app then reads the body from memory (it is at most its route's limit).

A waiting body costs only a parked greenlet (no CPU), so while thousands
trickle, other requests and sockets are served as usual until the deadline
frees them. WebSocket upgrades carry no body and pass straight through.

Nor does gunicorn bound writing the answer: its sockets have no timeout, so
a client that asks for a large file (or many, pipelined) and never reads
held its request slot for good once the kernel's send buffer was full (a
closed receive window is kept open by the kernel as long as the client
acknowledges its probes), and ``WS_WORKER_CONNECTIONS`` such clients kept
everyone else out. Here every request's socket gets ``HTTP_SEND_TIMEOUT_MS``
when its answer starts: one write of the answer (gunicorn's ``sendall`` of
a page, whole, or of each 8 KiB of a file it sends) that the client has not
taken by then raises in gunicorn's writer, which closes the connection.
It stays on the socket for the keep-alive wait and the next request's body,
which gunicorn's ``keepalive`` and ``HTTP_REQUEST_TIMEOUT_MS`` bound sooner
(the settings refuse a send timeout shorter than the request timeout). An
answered upgrade starts no answer (its socket is detached for the event
loop, ``blueprints/socket.py``, whose writer never waits).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import IO, Any
from wsgiref.types import StartResponse, WSGIApplication

import gevent

from relay.codes import HttpError

from .request_ids import request_id
from .security_headers import EVERY_ANSWER

RENDER_LIMIT = 3 * 64 * 1024 + 8 * 1024  # a message of up to 64 KiB, percent-encoded, and htmx's own fields
# Path prefix -> the largest body it needs (bytes); the first match wins.
ROUTE_LIMITS: tuple[tuple[str, int], ...] = (
    ("/broadcast", 64 * 1024),
    ("/api/admin/broadcast", 64 * 1024),
    ("/api/users/", 1024),  # .../disconnect and .../sign-out take no body
    ("/login", 4 * 1024),
    ("/logout", 4 * 1024),
    # Form bodies are percent-encoded: each UTF-8 byte of a field can take three.
    ("/admin/broadcast", 32 * 1024),  # a 2,000-character message (up to 4 bytes each), plus the form's fields
    ("/clinics/", RENDER_LIMIT),  # fragment renders carry the triggering message (up to 64 KiB)
    ("/admin/maintenance/render", RENDER_LIMIT),
)
DEFAULT_LIMIT = 16 * 1024
CONTRACT_400 = ("/broadcast", "/api/admin/broadcast")  # the original contract: oversize is a 400
JSON_PATHS = ("/api/", "/broadcast", "/health", "/ws")


class RequestLimits:
    def __init__(self, app: WSGIApplication, *, timeout: float, send_timeout: float):
        self.app = app
        self.timeout = timeout
        self.send_timeout = send_timeout

    def __call__(self, environ, start_response):
        length_text = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in (environ.get("HTTP_TRANSFER_ENCODING") or "").lower()
        if not chunked and length_text in ("", "0"):
            return self.app(environ, self._answer_within(environ, start_response))  # no body: GETs, upgrades
        path = environ.get("PATH_INFO") or "/"
        limit = limit_for(path)
        try:
            announced = int(length_text) if length_text else None
        except ValueError:
            return _refuse(start_response, environ, 400, HttpError.INVALID_BODY, "Content-Length is not a number")
        if announced is not None and announced > limit:
            return _too_large(start_response, environ, limit)
        try:
            with gevent.Timeout(self.timeout):
                body = _read(environ["wsgi.input"], limit + 1 if announced is None else announced)
        except gevent.Timeout:
            return _refuse(
                start_response,
                environ,
                408,
                HttpError.REQUEST_TIMEOUT,
                f"the request body did not arrive within {self.timeout:g} s",
            )
        if len(body) > limit:
            return _too_large(start_response, environ, limit)
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, self._answer_within(environ, start_response))

    def _answer_within(self, environ: dict, start_response: StartResponse) -> StartResponse:
        """``start_response`` that first gives the socket its send timeout: set once the body has been
        read, and never on an answered upgrade, which starts no response (its socket leaves for the
        event loop). The refusals here do without: a few hundred bytes, which the kernel's send buffer
        always takes."""
        sock = environ.get("gunicorn.socket")
        if sock is None:
            return start_response
        send_timeout = self.send_timeout

        def answering(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            sock.settimeout(send_timeout)  # gevent's socket: an attribute its waits read, no system call
            return start_response(status, headers, exc_info)

        return answering


def limit_for(path: str) -> int:
    return next((limit for prefix, limit in ROUTE_LIMITS if path.startswith(prefix)), DEFAULT_LIMIT)


def _read(stream: IO[bytes], size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(min(left, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _too_large(start_response: StartResponse, environ: dict, limit: int) -> list[bytes]:
    status = 400 if environ.get("PATH_INFO") in CONTRACT_400 else 413
    return _refuse(
        start_response, environ, status, HttpError.BODY_TOO_LARGE, f"the body is over this route's {limit}-byte limit"
    )


def _refuse(start_response: StartResponse, environ: dict, status: int, code: str, message: str) -> list[bytes]:
    path = environ.get("PATH_INFO") or "/"
    reasons = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large"}
    if path.startswith(JSON_PATHS):
        body = json.dumps({"ok": False, "error": {"code": code, "message": message}}).encode()
        kind = "application/json"
    else:
        body = f"{status} {reasons[status]}: {message}\n".encode()
        kind = "text/plain; charset=utf-8"
    # The rest of the body is never read, so the connection cannot be reused.
    # gunicorn drops a "Connection: close" set by the app (hop-by-hop) and would
    # read the unread body to reach the next request: tell its response object
    # directly (start_response is gunicorn's bound Response.start_response).
    force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
    if callable(force_close):
        force_close()
    start_response(
        f"{status} {reasons[status]}",
        [
            ("Content-Type", kind),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Request-Id", request_id(environ.get("HTTP_X_REQUEST_ID", ""))),  # as request_ids answers
            *EVERY_ANSWER,  # answered outside Flask: security_headers never sees these
        ],
    )
    return [body]
