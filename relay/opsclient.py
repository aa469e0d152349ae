"""The operator client: a small blocking client: health, broadcast, disconnect, and an end-to-end smoke test.

Used by ``flask ws health|broadcast|smoke`` and ``flask users set-password|sign-out``. Plain ``urllib`` for HTTP and the
``websockets`` library's sync client for the socket, so it runs anywhere
Python does, against a local or remote server.
"""

from __future__ import annotations

import http.client
import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from websockets.sync.client import connect
from websockets.sync.connection import Connection as WebSocket

from .clock import now_iso
from .codes import Close
from .tokens import TokenService


class ServiceError(Exception):
    """The server could not be reached or answered with an error."""


_ENDPOINTS = frozenset(("health", "broadcast", "ws", "metrics", "api"))  # what the commands add to --url


def _url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as the server's base address (checked before a command changes anything)."""
    if not url.isascii() or not url.isprintable() or " " in url:
        return "must be plain ASCII with no spaces (percent-encode the rest)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "names no host"
    if parts.query or parts.fragment:
        return "takes no query or fragment"
    endpoint = parts.path.strip("/")
    if endpoint in _ENDPOINTS:  # a proxy's prefix is fine (even /realtime/ws); the bare endpoint is a mistake
        return f"is the server's address, not one of its endpoints: leave /{endpoint} out"
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number from 0 to 65535)
    except ValueError:
        return "has a port that is not a number from 1 to 65535"
    return None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The admin secret (and the metrics token) go to ``--url`` and nowhere else: urllib follows a redirect
    with every header of the request, ``Authorization`` included, to whatever host it names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ServiceError(
            f"{req.full_url} answered {code}, a redirect to {newurl}: not followed, so that the admin secret "
            "(or metrics token) is not sent there; give the address it names as --url if that is the server"
        )


_opener = urllib.request.build_opener(_NoRedirects)


@dataclass
class OpsClient:
    base_url: str
    admin_secret: str | None = field(default=None, repr=False)
    timeout: float = 5.0
    metrics_token: str | None = field(default=None, repr=False)  # for /health's full report

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        problem = _url_problem(self.base_url)
        if problem:
            raise ValueError(f"--url {problem}, got {self.base_url!r}")

    @property
    def socket_url(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws"

    def request(self, method: str, path: str, body: object = None, headers: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=dict(headers or {}))
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _opener.open(req, timeout=self.timeout) as resp:
                return resp.status, _json(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _json(err.read())
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise ServiceError(f"cannot reach {self.base_url}: {getattr(err, 'reason', err)}") from None

    def health(self) -> tuple[int, dict]:
        """``/health``: the full report with this environment's ``METRICS_TOKEN``, the summary without."""
        headers = {"Authorization": f"Bearer {self.metrics_token}"} if self.metrics_token else None
        return self.request("GET", "/health", None, headers)

    def broadcast(self, message_type: str, data: object, flt: dict | None = None) -> tuple[int, dict]:
        body = {"message": {"type": message_type, "data": data}, "filter": flt or {}}
        return self.request("POST", "/broadcast", body, self._admin_headers())

    def disconnect(self, user_id: str) -> tuple[int, dict]:
        """Close every socket of ``user_id`` (``POST /api/users/<id>/disconnect``)."""
        return self.request("POST", f"/api/users/{quote(user_id, safe='')}/disconnect", None, self._admin_headers())

    def _admin_headers(self) -> dict:
        if not self.admin_secret:
            raise ServiceError(
                "no admin secret: set WS_ADMIN_SECRET (in development the server writes it to the instance "
                "folder's dev-secrets.json on its first start)"
            )
        return {"Authorization": f"Bearer {self.admin_secret}"}


@dataclass
class Step:
    name: str
    ok: bool
    detail: str


def smoke(client: OpsClient, tokens: TokenService | None, user_id: str | None, channel: str) -> list[Step]:
    """Token -> connect -> subscribe -> broadcast to this user only -> receive. Stops at the first failure."""
    steps: list[Step] = []

    def step(name: str, ok: bool, detail: str) -> bool:
        steps.append(Step(name, ok, detail))
        return ok

    try:
        status, body = client.health()
    except ServiceError as err:
        step("health", False, str(err))
        return steps
    if not step(
        "health", status == 200 and body.get("ok") is True, f"HTTP {status}, {body.get('clients', '?')} clients"
    ):
        return steps

    status, body = client.request("GET", "/api/ws/auth")
    if status == 200 and body.get("token"):
        token, user_id = body["token"], body["userId"]
        step("token", True, f"from /api/ws/auth for {user_id}")
    elif tokens is not None and user_id:
        token = tokens.mint(user_id)
        step("token", True, f"minted locally with WS_TOKEN_SECRET for {user_id} (/api/ws/auth said {status})")
    elif user_id:  # --user given, but no secret to mint with here
        step("token", False, f"/api/ws/auth answered {status}, and --user needs WS_TOKEN_SECRET in this environment")
        return steps
    else:
        step("token", False, f"/api/ws/auth answered {status}; set WS_TEST_USER_ID or pass --user")
        return steps

    url = f"{client.socket_url}?token={quote(token, safe='')}"
    try:
        with connect(url, open_timeout=client.timeout, close_timeout=1, max_size=2**20) as ws:
            first = json.loads(ws.recv(timeout=client.timeout))
            if not step(
                "connect",
                first.get("type") == "CONNECTED",
                f"first message {first.get('type')}"
                + (f" ({first.get('data', {}).get('code')})" if first.get("type") == "ERROR" else ""),
            ):
                return steps
            ws.send(json.dumps({"type": "SUBSCRIBE", "data": {"channels": [channel]}}))
            reply = _next_of(ws, ("SUBSCRIBED", "ERROR"), client.timeout)
            refused = ""
            if reply.get("type") == "ERROR":  # the channel refused (ahead of SUBSCRIBED): say why
                refused = error_text(reply)
                reply = _next_of(ws, ("SUBSCRIBED",), client.timeout)
            taken = reply.get("data", {}).get("channels", [])
            if not step("subscribe", channel in taken, f"SUBSCRIBED {taken}{refused}"):
                return steps
            nonce = secrets.token_hex(8)
            try:
                status, body = client.broadcast(
                    "SMOKE_TEST", {"nonce": nonce, "at": now_iso()}, {"userIds": [user_id], "channels": [channel]}
                )
            except ServiceError as err:
                step("broadcast", False, str(err))
                return steps
            if not step(
                "broadcast",
                status == 200 and body.get("delivered", 0) >= 1,
                f"HTTP {status}, delivered {body.get('delivered')}" + error_text(body),
            ):
                return steps
            got = _next_of(ws, ("SMOKE_TEST",), client.timeout, lambda m: m.get("data", {}).get("nonce") == nonce)
            step("receive", bool(got), f"message {got.get('id')} arrived")
    except TimeoutError:
        step("receive" if len(steps) >= 4 else "connect", False, f"nothing arrived within {client.timeout} s")
    except Exception as err:  # websockets raises several families; report, don't trace
        received = getattr(err, "rcvd", None)
        code = getattr(received, "code", None)
        said = f"closed {code} {getattr(received, 'reason', '')}".rstrip() if code else f"{type(err).__name__}: {err}"
        step("connect" if len(steps) < 3 else "receive", False, said + _CLOSE_HINTS.get(code, ""))
    return steps


# What a close the smoke test meets most often means for whoever runs it.
_CLOSE_HINTS: dict[int | None, str] = {
    Close.UNAUTHORIZED: " (the token was refused: is this environment's WS_TOKEN_SECRET the server's?)",
    Close.FORBIDDEN: " (the user is unknown or disabled: `flask users list` shows who can connect)",
    Close.TRY_AGAIN_LATER: " (the server is full or its stores are down: see /health)",
}


def _next_of(
    ws: WebSocket, types: tuple[str, ...], timeout: float, accept: Callable[[dict], bool] = lambda m: True
) -> dict:
    """The next message of one of ``types`` (skipping broadcasts meant for others)."""
    for _ in range(1000):
        message = json.loads(ws.recv(timeout=timeout))
        if message.get("type") in types and accept(message):
            return message
    raise TimeoutError


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {"raw": raw[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


def error_text(body: dict) -> str:
    """`` — code: message`` from an answer's ``{"error": {...}}`` (or an ERROR frame's ``data``), or
    nothing if it has none."""
    error = body.get("data") if body.get("type") == "ERROR" else body.get("error")
    return f" — {error.get('code')}: {error.get('message')}" if isinstance(error, dict) else ""
