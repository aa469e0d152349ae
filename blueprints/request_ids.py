"""A request id on every HTTP request: in each log line the request causes, and in its answer.

Taken from ``X-Request-Id`` when a proxy sends a sane one (1-128 of
``A-Z a-z 0-9 . _ : -``), otherwise made here; answered as ``X-Request-Id``.
"""

from __future__ import annotations

import re
import secrets

from flask import Blueprint, g, request

from relay import eventlog

from .socket import upgraded

bp = Blueprint("request_ids", __name__)
SANE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id(given: str) -> str:
    """The id of a request that sent ``given`` as its X-Request-Id: that, if sane, else a new one."""
    return given if SANE.fullmatch(given) else secrets.token_hex(8)


@bp.before_app_request
def bind_request_id() -> None:
    g.request_id = request_id(request.headers.get("X-Request-Id", ""))
    g.request_log_token = eventlog.bind(requestId=g.request_id)


@bp.after_app_request
def answer_request_id(response):
    if upgraded():
        return response  # never sent (the socket's log lines carry the id)
    request_id = g.get("request_id")
    if request_id:
        response.headers["X-Request-Id"] = request_id
    return response


@bp.teardown_app_request
def unbind_request_id(_error: BaseException | None) -> None:
    token = g.pop("request_log_token", None)
    if token is not None:
        eventlog.unbind(token)
