"""``GET /metrics``: Prometheus text format, for every worker of this gunicorn (see ``relay.metrics``).

In production it needs ``Authorization: Bearer <METRICS_TOKEN>``, unless
``METRICS_PUBLIC=1`` says on purpose that whoever reaches the port may read
it; with neither set it refuses everyone (fail closed). In development it is
open.
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
        configured, given = settings.metrics_token, bearer_token()
        if not configured:
            return error_response(403, HttpError.FORBIDDEN, "/metrics is closed: set METRICS_TOKEN to read it")
        if not given or not hmac.compare_digest(given.encode(), configured.encode()):
            return error_response(
                401,
                HttpError.UNAUTHORIZED,
                "send 'Authorization: Bearer <METRICS_TOKEN>'",
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
            )
    rt.sample_gauges()  # this worker's gauges as of now; the others' are at most a second old
    return Response(rt.telemetry.metrics.exposition(), content_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
