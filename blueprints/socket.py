"""``/ws``: Flask-Sock answers the upgrade, then the core owns the socket.

Before the upgrade (``before_request``): refuse a malformed upgrade with 400
``bad_upgrade`` (426 for another WebSocket version), foreign browser origins
with 403, and hand the handshake only the headers it needs (which drops the
client's permessage-deflate offer: ~90 KB of zlib state per connection for
messages of a few hundred bytes).

After the upgrade, the view takes the TCP socket away from simple-websocket
and gunicorn and hands it to :meth:`relay.service.Realtime.open_socket`,
which checks the token and the user and closes with 4401/4403/1012/1013 when
it must: a browser cannot read an HTTP status on a failed upgrade, but it can
read a close code. The request then ends, and the connection lives on the
event loop (see ``relay.connection``).
"""

from __future__ import annotations

import _socket
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from flask_sock import Sock
from simple_websocket import Server
from werkzeug.routing.exceptions import WebsocketMismatch

from relay.codes import HttpError
from relay.eventlog import Sparse
from relay.recovery import resume_request

from .errors import error_response

bp = Blueprint("socket", __name__)
sock = Sock()
_UPGRADED = "relay.upgraded"  # set in the environ once the 101 is on the wire


# One line a minute per address at most: a refusal costs the sender one request, no handshake.
_log_refused_origin = Sparse("ws.origin_refused")


def upgraded() -> bool:
    """Whether this request's upgrade was answered (the 101 is on the wire, the socket is the core's).

    Flask still runs the after-request hooks on the response Flask-Sock
    returns, but that response is never sent: a hook that adds headers
    should return it untouched (measured: 4% of a connect's instructions).
    A refused upgrade (400, 403, 426) is an ordinary answer and gets them.
    """
    return request.environ.get(_UPGRADED, False)


class _NoReaderThread:
    """Stands in for the reader thread simple-websocket starts per socket.

    The core reads every socket from the event loop, so the thread (and the
    greenlet and Event it would cost per connection) is never started.
    """

    name = "unused"

    def __init__(self, *args, **kwargs):
        pass

    def start(self) -> None:
        pass


@bp.record_once
def _configure(state: BlueprintSetupState) -> None:
    state.app.config["SOCK_SERVER_OPTIONS"] = {"thread_class": _NoReaderThread, "event_class": _NoReaderThread}


@bp.before_request
def guard_upgrade():
    if request.path != "/ws":
        return None
    problem = upgrade_problem(request.environ)
    if problem:
        return _bad_upgrade(*problem)
    origin = request.headers.get("Origin")
    allowed = current_app.extensions["realtime"].settings.allowed_origins
    if origin and not origin_allowed(origin, request.host, allowed):
        remote = request.remote_addr or "?"
        _log_refused_origin(remote, origin=origin[:200], remote=remote)
        message = (
            f"origin {origin[:200]!r} may not open sockets here (the server's WS_ALLOWED_ORIGINS lists those that may)"
        )
        return error_response(403, HttpError.FOREIGN_ORIGIN, message)
    _keep_only_handshake_headers(request.environ)
    return None


# What simple-websocket's handshake needs of the request (h11 insists on Host). It rebuilds the
# request from every HTTP_* key of the environ and parses it again through wsproto and h11, a
# regular expression per header: a browser's other eight (cookies, user agent, languages, ...)
# made it a third dearer than these five (measured: 300 vs 400 us a handshake here).
HANDSHAKE_HEADERS = frozenset(
    ("HTTP_HOST", "HTTP_UPGRADE", "HTTP_CONNECTION", "HTTP_SEC_WEBSOCKET_KEY", "HTTP_SEC_WEBSOCKET_VERSION")
)


def _keep_only_handshake_headers(environ: dict) -> None:
    """Drop every request header the handshake does not need, once the hooks have read theirs.

    Among them the client's permessage-deflate offer (``Sec-WebSocket-Extensions``), which would
    cost ~90 KB of zlib state per connection for messages of a few hundred bytes, and any
    subprotocol it asks for: none is offered either way, so the 101 names none (RFC 6455 4.2.2)
    and a client that insists on one gives up, as before. Runs after the checks above, after the
    app-wide hooks (the request id) and after the WSGI middleware (ProxyFix's forwarded address,
    the body limits); the core identifies the socket by its token and address. One reader is
    left: gunicorn's access log (off unless an operator turns it on), which would show "-" for a socket's
    User-Agent and Referer.
    """
    for key in [key for key in environ if key.startswith("HTTP_") and key not in HANDSHAKE_HEADERS]:
        del environ[key]


@bp.app_errorhandler(WebsocketMismatch)
def not_an_upgrade(error: WebsocketMismatch) -> ResponseReturnValue:
    """Routing refuses a request that is not a complete upgrade before any view or hook runs."""
    if request.path != "/ws":
        return error_response(400, HttpError.BAD_UPGRADE, f"{request.path[:200]} does not accept WebSocket upgrades")
    status, message = upgrade_problem(request.environ) or (400, "/ws only accepts WebSocket upgrade requests")
    return _bad_upgrade(status, message)


def _bad_upgrade(status: int, message: str) -> Response:
    headers = {"Sec-WebSocket-Version": "13"} if status == 426 else None
    return error_response(status, HttpError.BAD_UPGRADE, message, headers=headers)


def upgrade_problem(environ: dict) -> tuple[int, str] | None:
    """What RFC 6455 (4.2.1) requires of an upgrade, checked before simple-websocket sees it.

    simple-websocket raises on a malformed upgrade, which would be a 500 and a
    traceback; a client deserves a 400 naming the missing header instead.
    """
    if environ.get("HTTP_UPGRADE", "").strip().lower() != "websocket":
        return 400, "/ws only accepts WebSocket upgrade requests ('Upgrade: websocket')"
    tokens = [t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")]
    if "upgrade" not in tokens:
        return 400, "a WebSocket upgrade needs 'Connection: Upgrade'"
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        return 426, "this server speaks WebSocket version 13 (Sec-WebSocket-Version: 13)"
    if not environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip():
        return 400, "a WebSocket upgrade needs a Sec-WebSocket-Key header"
    host = environ.get("HTTP_HOST", "")
    try:  # h11 insists on a Host (HTTP/1.0 may send none); wsproto decodes it as IDNA and raises on one
        host.encode().decode("idna")  # that is not ("xn--zz"), encoded as simple-websocket encodes it
    except UnicodeError:
        host = ""
    if not host.strip():
        return 400, "a WebSocket upgrade needs a valid Host header"
    return None


def origin_allowed(origin: str | None, host: str, allowed: tuple[str, ...]) -> bool:
    """No Origin (servers, CLIs), this site's own origin, or one listed in WS_ALLOWED_ORIGINS."""
    if not origin:
        return True
    origin = origin.strip().lower().rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    try:
        return urlsplit(origin).netloc == host.lower()
    except ValueError:  # "http://[::1" is nobody's origin
        return False


@sock.route("/ws", bp=bp)
def socket(ws):
    request.environ[_UPGRADED] = True
    rt = current_app.extensions["realtime"]
    raw = _take_socket(ws)
    rt.open_socket(
        raw,
        request.args.get("token"),
        remote=request.remote_addr,
        pending=_read_ahead(request.environ),
        resume=resume_request(request.args),
    )


def _take_socket(ws: Server) -> _socket.socket:
    """Detach the TCP socket from simple-websocket and gunicorn, as a plain non-blocking socket.

    Why ``_socket.socket``: under gevent, ``socket.socket`` is gevent's
    cooperative class, whose every call may wait on the hub; the connection
    needs the C socket itself, driven by its own libev watchers and never
    waiting (see ``relay.connection``). Marking ``ws`` disconnected turns
    Flask-Sock's closing ``ws.close()`` into a no-op; detaching gunicorn's
    socket object makes its ``close()`` after the request a no-op too. The
    file descriptor is ours from here on.
    """
    ws.connected = False
    fd = ws.sock.detach()
    raw = _socket.socket(fileno=fd)
    raw.setblocking(False)
    return raw


def _read_ahead(environ: dict) -> bytes:
    """Bytes the client sent behind its upgrade request, which gunicorn's parser had already read.

    RFC 6455 says a client waits for the 101 before it sends frames, and
    browsers do; a client that does not would otherwise lose them. gunicorn
    (27) keeps them in the request's reader; anything else holds none.
    """
    unreader = getattr(getattr(environ.get("wsgi.input"), "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    return take() if callable(take) else b""
