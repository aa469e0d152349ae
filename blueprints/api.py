"""The internal HTTP API: ``GET /health``, ``POST /broadcast``, ``POST /api/admin/broadcast``."""

from __future__ import annotations

import hmac

from flask import Blueprint, jsonify, request

from relay.broadcast import MAX_BODY_BYTES, BroadcastError, idempotency_key, parse_body
from relay.broker import BrokerUnavailable
from relay.codes import HttpError
from relay.history import IdempotencyConflict

from .auth import admin_required, bearer_token, csrf_required, realtime, signed_in
from .errors import error_response

bp = Blueprint("api", __name__)


@bp.get("/health")
def health():
    report = realtime().health()
    response = jsonify(report)
    # 503 only while draining: a degraded broker affects every worker alike, and taking them
    # all out of the load balancer would cut the sockets that still work.
    response.status_code = 503 if report["status"] == "draining" else 200
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/broadcast")
def broadcast():
    """For services: ``Authorization: Bearer <WS_ADMIN_SECRET>`` (or ``X-Admin-Secret``)."""
    if not _admin_secret_ok():
        return error_response(
            401,
            HttpError.UNAUTHORIZED,
            "send the admin secret as 'Authorization: Bearer <WS_ADMIN_SECRET>'",
            headers={"WWW-Authenticate": 'Bearer realm="broadcast"'},
        )
    return send_broadcast(source="api", scope="api")


@bp.post("/api/admin/broadcast")
@admin_required
@csrf_required
def admin_broadcast():
    """For signed-in admins (cookie session): needs the CSRF token in ``X-CSRF-Token``."""
    source = f"admin:{signed_in().user_id}"
    return send_broadcast(source=source, scope=source)


def send_broadcast(*, source: str, scope: str):
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


def _admin_secret_ok() -> bool:
    """Constant-time check; an empty secret never authorizes, whatever is configured."""
    configured = realtime().settings.admin_secret
    given = bearer_token()
    if given is None:
        given = request.headers.get("X-Admin-Secret", "").strip()
    if not given or not configured:
        return False
    return hmac.compare_digest(given.encode(), configured.encode())
