"""Errors: JSON for API callers, a page in the site's style for people.

Every JSON endpoint answers ``{"ok": false, "error": {"code", "message"}}``
with a stable code from :class:`relay.codes.HttpError`, never an HTML page.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from relay.codes import HttpError
from relay.directory import DirectoryUnavailable

bp = Blueprint("errors", __name__)
log = logging.getLogger("relay.http")

JSON_PREFIXES = ("/api/", "/broadcast", "/health", "/ws")
_CODES = {
    400: HttpError.INVALID_BODY,
    401: HttpError.UNAUTHORIZED,
    403: HttpError.FORBIDDEN,
    404: HttpError.NOT_FOUND,
    405: HttpError.METHOD_NOT_ALLOWED,
    408: HttpError.REQUEST_TIMEOUT,
    413: HttpError.BODY_TOO_LARGE,  # werkzeug's own limits too (more than 1,000 parts in a form)
    503: HttpError.UNAVAILABLE,
}
_MESSAGES = {
    401: "Sign in to see this page.",
    403: "Your account is not allowed to open this page.",
    404: "There is no page at this address.",
}


def wants_json() -> bool:
    if request.path.startswith(JSON_PREFIXES):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    response = jsonify(ok=False, error={"code": code, "message": message})
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


@bp.app_errorhandler(HTTPException)
def http_error(error: HTTPException) -> ResponseReturnValue:
    status = error.code or 500
    # A 405's Allow (RFC 9110 requires it): the methods the URL takes, which the message names too.
    headers = {name: value for name, value in error.get_headers() if name == "Allow"}
    if wants_json():
        message = error.description or error.name
        if "Allow" in headers:
            message = f"{message} It takes {headers['Allow']}."
        fallback = HttpError.INVALID_BODY if status < 500 else HttpError.INTERNAL  # the client's, or ours
        return error_response(status, _CODES.get(status, fallback), message, headers)
    html = render_template(
        "error.html", status=status, title=error.name, message=_MESSAGES.get(status, error.description)
    )
    return html, status, headers


@bp.app_errorhandler(DirectoryUnavailable)
def identity_unavailable(error: DirectoryUnavailable) -> ResponseReturnValue:
    """The identity source or the sign-out store is down: 503, and the session is left alone
    (see ``auth.current_user``). The message names neither: to the person both mean the same, and
    the log line carries which one it was."""
    log.warning("identity source unavailable on %s %s: %s", request.method, request.path, error)
    headers = {"Retry-After": "5"}
    if wants_json():
        message = "your sign-in cannot be checked right now; try again shortly (you are still signed in)"
        return error_response(503, HttpError.UNAVAILABLE, message, headers=headers)
    html = render_template(
        "error.html",
        status=503,
        title="Sign-in service unavailable",
        message="We cannot check your account right now. You are still signed in: try again in a moment.",
    )
    return html, 503, headers


@bp.app_errorhandler(Exception)
def unexpected_error(error: Exception) -> ResponseReturnValue:
    log.exception("unhandled error on %s %s", request.method, request.path)
    if wants_json():
        return error_response(500, HttpError.INTERNAL, "internal error; the server log has the details")
    return render_template(
        "error.html",
        status=500,
        title="Something went wrong",
        message="The server hit an error. Try again in a moment.",
    ), 500
