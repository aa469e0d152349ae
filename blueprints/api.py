"""The internal HTTP API: ``GET /health``, ``POST /broadcast``, ``POST /api/admin/broadcast``, and for
incidents ``POST /api/users/<id>/disconnect`` and ``POST /api/users/<id>/sign-out``."""

from __future__ import annotations

import functools
import hmac

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from relay.broadcast import MAX_BODY_BYTES, BroadcastError, idempotency_key, parse_body
from relay.broker import BrokerUnavailable
from relay.channels import is_valid_id
from relay.codes import HttpError
from relay.eventlog import Sparse, event
from relay.history import IdempotencyConflict
from relay.signouts import SignoutsUnavailable

from .auth import admin_required, bearer_token, csrf_required, realtime, signed_in
from .errors import error_response
from .metrics import metrics_token_refusal

bp = Blueprint("api", __name__)


@bp.get("/health")
def health():
    """The summary for anyone; the full report in development, with ``HEALTH_PUBLIC=1``, or for the
    monitoring token. ``history=1`` without it is refused, saying why; a plain ``/health`` with a
    wrong token is still answered (the summary says ``"report": "summary"``): a load balancer that
    sends a stale token must keep seeing 200 and the draining 503, or it would pull working workers."""
    wanted = request.args.get("history", "0").strip().lower()
    if wanted not in ("0", "1", "true", "false", ""):
        return error_response(400, HttpError.INVALID_QUERY, "history must be 1 or 0 (or true or false)")
    history = wanted in ("1", "true")
    settings = realtime().settings
    full = not settings.production or settings.health_public
    if not full and (history or bearer_token() is not None):
        refusal = metrics_token_refusal("/health?history=1")
        if refusal is None:
            full = True
        elif history:
            return refusal
    report = realtime().health(full=full, history=history)
    response = jsonify(report)
    # 503 only while draining: a degraded broker affects every worker alike, and taking them
    # all out of the load balancer would cut the sockets that still work.
    response.status_code = 503 if report["status"] == "draining" else 200
    response.headers["Cache-Control"] = "no-store"
    return response


def admin_secret_required(view):
    """For services: ``Authorization: Bearer <WS_ADMIN_SECRET>`` (or the original ``X-Admin-Secret``)."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        given = _admin_secret_given()
        if not _admin_secret_ok(given):
            if given:
                # Who is trying secrets (never the secret): an operator sees the attempts, and a caller
                # whose secret went stale (a rotation, a regenerated development one) is told so.
                remote = request.remote_addr or "?"
                _log_refused_secret(remote, path=request.path[:200], remote=remote)
                message = "this is not the server's admin secret (WS_ADMIN_SECRET): send the one it runs with"
            else:
                message = "send the admin secret as 'Authorization: Bearer <WS_ADMIN_SECRET>'"
            return error_response(
                401, HttpError.UNAUTHORIZED, message, headers={"WWW-Authenticate": 'Bearer realm="broadcast"'}
            )
        return view(*args, **kwargs)

    return wrapped


@bp.post("/broadcast")
@admin_secret_required
def broadcast():
    return send_broadcast(source="api", scope="api")


@bp.post("/api/users/<user_id>/disconnect")
@admin_secret_required
def disconnect_user(user_id: str) -> ResponseReturnValue:
    """An incident: close every socket of this user, on every worker and host (4403: the browser stops).

    Disable the user as well, or a new sign-in opens new sockets.
    """
    if not is_valid_id(user_id):
        return error_response(400, HttpError.INVALID_BODY, f"user id {user_id[:80]!r} is not a valid id")
    # The source's spelling, as its sockets are keyed; unknown to it (deleted already) or out of reach:
    # as given, since the sockets may still be open.
    target, _ = realtime().spelled_by_source(user_id)
    try:
        done = realtime().disconnect_user(target)
    except BrokerUnavailable as down:
        return error_response(503, HttpError.UNAVAILABLE, f"not disconnected: {down}", headers={"Retry-After": "1"})
    event("ws.user_disconnected", level="warning", userId=target, sockets=done.delivered, workers=done.workers)
    return jsonify(
        ok=True, userId=target, disconnected=done.delivered, workers=done.workers, missingWorkers=done.missing
    )


@bp.post("/api/users/<user_id>/sign-out")
@admin_secret_required
def sign_out_user(user_id: str) -> ResponseReturnValue:
    """An incident, a password changed elsewhere: end every sign-in of this user and close their sockets.

    The id is looked up first, so that the sign-out is recorded under the source's spelling of it
    (a Supabase id typed in capitals is the same user); while the source is down it is recorded
    as given, rather than not at all. ``disconnected`` is null when the broker could not carry the
    close (the sign-ins have ended regardless): call ``/disconnect`` once it is back.
    """
    if not is_valid_id(user_id):
        return error_response(400, HttpError.INVALID_BODY, f"user id {user_id[:80]!r} is not a valid id")
    target, known = realtime().spelled_by_source(user_id)
    if known is False:
        return error_response(404, HttpError.UNKNOWN_USER, f"no user {user_id!r}; nobody was signed out")
    try:
        closed = realtime().sign_out_everywhere(target, by="api")
    except SignoutsUnavailable as down:
        return error_response(503, HttpError.UNAVAILABLE, f"not signed out: {down}", headers={"Retry-After": "1"})
    if closed is None:
        return jsonify(ok=True, userId=target, disconnected=None, workers=None, missingWorkers=None)
    return jsonify(
        ok=True, userId=target, disconnected=closed.delivered, workers=closed.workers, missingWorkers=closed.missing
    )


@bp.post("/api/admin/broadcast")
@admin_required
@csrf_required
def admin_broadcast():
    """For signed-in admins (cookie session): needs the CSRF token in ``X-CSRF-Token``."""
    source = f"admin:{signed_in().user_id}"
    return send_broadcast(source=source, scope=source)


def send_broadcast(*, source: str, scope: str) -> ResponseReturnValue:
    """Parse, publish, answer. ``scope``: whose ``Idempotency-Key`` this is (a service, or one admin)."""
    body = request.stream.read(MAX_BODY_BYTES + 1)
    try:
        key = idempotency_key(request.headers.get("Idempotency-Key"))
        parsed = parse_body(body)
        receipt = realtime().broadcast(parsed, source=source, scope=scope, key=key)
    except BroadcastError as bad:
        return error_response(400, bad.code, bad.message)
    except IdempotencyConflict as reused:
        return error_response(422, HttpError.IDEMPOTENCY_CONFLICT, f"{reused}; send it with a new key")
    except BrokerUnavailable as down:
        return error_response(503, HttpError.UNAVAILABLE, f"broadcast not sent: {down}", headers={"Retry-After": "1"})
    response = jsonify(receipt.answer())
    if receipt.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


# One line a minute per address at most: anyone who reaches the port could otherwise write a line per
# request (and the id in /api/users/<id>/... is theirs to make long).
_log_refused_secret = Sparse("api.admin_secret_refused")


def _admin_secret_given() -> str:
    """The secret the request sends (``Authorization: Bearer``, or the original ``X-Admin-Secret``), or ""."""
    given = bearer_token()
    return request.headers.get("X-Admin-Secret", "").strip() if given is None else given


def _admin_secret_ok(given: str) -> bool:
    """Constant-time check; an empty secret never authorizes, whatever is configured."""
    configured = realtime().settings.admin_secret
    if not given or not configured:
        return False
    return hmac.compare_digest(given.encode(), configured.encode())
