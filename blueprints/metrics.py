"""``GET /metrics``: Prometheus text format, for every worker of this gunicorn (see ``relay.metrics``).

In production it needs ``Authorization: Bearer <METRICS_TOKEN>``, unless
``METRICS_PUBLIC=1`` says on purpose that whoever reaches the port may read
it; with neither set it refuses everyone (fail closed). In development it is
open. The same token opens ``/health``'s full report (``blueprints.api``).
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Response

from relay.codes import HttpError
from relay.metrics import CONTENT_TYPE

from .auth import bearer_token, realtime
from .errors import error_response

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics():
    rt = realtime()
    settings = rt.settings
    if settings.production and not settings.metrics_public:
        refusal = metrics_token_refusal("/metrics")
        if refusal is not None:
            return refusal
    rt.sample_gauges()  # this worker's gauges as of now; the others' are at most a second old
    return Response(rt.telemetry.metrics.exposition(), content_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


def metrics_token_refusal(what: str) -> Response | None:
    """None when the request's bearer token is ``METRICS_TOKEN`` (the operator's monitoring token,
    which opens ``/metrics`` and ``/health``'s full report); otherwise why not: 403 when the server
    has none (closed to everyone), 401 naming what to send."""
    configured, given = realtime().settings.metrics_token, bearer_token()
    if not configured:
        return error_response(403, HttpError.FORBIDDEN, f"{what} is closed: set METRICS_TOKEN to read it")
    if not given or not hmac.compare_digest(given.encode(), configured.encode()):
        return error_response(
            401,
            HttpError.UNAUTHORIZED,
            f"{what} needs 'Authorization: Bearer <METRICS_TOKEN>'",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    return None
