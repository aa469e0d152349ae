"""Sign-in, sign-out, and the connection-token endpoint ``GET /api/ws/auth``.

Also the small session toolkit the other blueprints use: ``current_user()``,
the ``login_required``/``admin_required`` decorators and CSRF tokens for
cookie-authenticated writes.
"""

from __future__ import annotations

import functools
import hmac
import secrets
import time
from math import ceil
from urllib.parse import urlsplit

from flask import Blueprint, abort, current_app, g, jsonify, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue

from relay.clock import now_ms
from relay.codes import HttpError
from relay.config import MAX_SESSION_HOURS
from relay.devices import COOKIE as DEVICE_COOKIE
from relay.devices import MAX_AGE_S as DEVICE_MAX_AGE_S
from relay.directory import (
    AccessTokenInvalid,
    AccessTokenOwner,
    AccessTokensUnsupported,
    DirectoryUnavailable,
    Identity,
)
from relay.eventlog import event
from relay.service import Realtime
from relay.signouts import SignoutsUnavailable
from relay.throttle import ThrottleUnavailable

from .errors import error_response, wants_json
from .socket import upgraded

bp = Blueprint("auth", __name__)


def realtime() -> Realtime:
    """The service this app was built with (``create_app`` puts it there)."""
    return current_app.extensions["realtime"]


# -- the session --------------------------------------------------------------------


def current_user() -> Identity | None:
    """The signed-in, still-active user of this request, looked up once per request.

    Raises :class:`DirectoryUnavailable` when the identity source cannot answer.
    The session is kept: an outage must never sign anyone out. The app answers
    503 (``errors.identity_unavailable``) and the user is still signed in once
    the source is back. Only a user the source says is gone or disabled loses
    the session (and ``g.user_refused`` says so, for an answer of 403 rather than 401).
    """
    if "user" not in g:
        user = None
        user_id = session.get("user_id")
        if user_id and not _session_current():
            session.clear()
        elif user_id:
            try:
                user = realtime().directory.get(user_id)
            except DirectoryUnavailable:
                g.identity_down = True
                raise
            if user is None or not user.active:
                session.clear()
                g.user_refused = True
                user = None
        g.user = user
    return g.user


CLOCK_SLACK_S = 300


def _started_ms(since: int) -> int:
    """When the sign-in started, in epoch ms: ``since_ms``, or for a cookie from before it existed
    the whole second ``since`` (a sign-out everywhere within that second ends it: the safe side)."""
    since_ms = session.get("since_ms")
    return since_ms if isinstance(since_ms, int) and not isinstance(since_ms, bool) else since * 1000


def _session_current() -> bool:
    """Whether this sign-in still holds: younger than SESSION_LIFETIME_HOURS, not signed out, and
    not started before its user was signed out everywhere.

    A cookie from before sessions had an id and a start (or a forged-looking
    one) is not current. Raises :class:`DirectoryUnavailable` when the
    sign-out store cannot answer: refused with 503 like an identity outage,
    never let through and never signed out.
    """
    started, session_id, user_id = session.get("since"), session.get("sid"), session.get("user_id")
    if (
        not isinstance(started, int)
        or not isinstance(session_id, str)
        or not session_id
        or not isinstance(user_id, str)
    ):
        return False
    now = time.time()
    # A start a little ahead of this host's clock is another host's (several behind one Redis).
    if not started - CLOCK_SLACK_S <= now < started + realtime().settings.session_lifetime_s:
        return False
    try:
        return not realtime().signouts.ended(session_id, user_id, _started_ms(started), now)
    except SignoutsUnavailable as problem:
        g.identity_down = True
        raise DirectoryUnavailable(str(problem)) from None


def current_user_if_known() -> Identity | None:
    """For templates: the user, or None while the identity source is down (an error page must still render)."""
    if g.get("identity_down"):
        return None
    try:
        return current_user()
    except DirectoryUnavailable:
        return None


def signed_in() -> Identity:
    """The user of a view behind ``login_required`` (never None there)."""
    user = current_user()
    if user is None:
        raise RuntimeError("signed_in() outside a login_required view")
    return user


def login_required(view):
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if current_user() is None:
            if wants_json():
                return error_response(401, HttpError.UNAUTHORIZED, "sign in first")
            if request.headers.get("HX-Request") == "true":
                # A fragment's update, not a page: a redirect would be followed and the sign-in page
                # swapped into the fragment (and a sign-in then sent to a POST-only address). site.js
                # reloads the page on a 401, which then goes to the sign-in page and back.
                return error_response(401, HttpError.UNAUTHORIZED, "signed out: reload the page to sign in again")
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapped


def admin_required(view):
    @functools.wraps(view)
    @login_required
    def wrapped(*args, **kwargs):
        if not signed_in().is_admin:
            if wants_json():
                return error_response(403, HttpError.FORBIDDEN, "admins only")
            abort(403)
        return view(*args, **kwargs)

    return wrapped


def bearer_token() -> str | None:
    """The credential of an ``Authorization: Bearer ...`` header, if the request has one."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_ok() -> bool:
    """A cookie-authenticated write must carry the session's CSRF token (header or form field)."""
    expected = session.get("csrf")
    sent = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    return isinstance(expected, str) and bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def csrf_required(view):
    """For htmx and API writes: 403 ``csrf_failed`` unless the request carries the session's token."""

    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not csrf_ok():
            message = "this page's CSRF token is missing or out of date (signed in again since?): reload the page"
            return error_response(403, HttpError.CSRF_FAILED, message)
        return view(*args, **kwargs)

    return wrapped


# -- pages ----------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return render_template("login.html", error=None)
    login_name = (request.form.get("login") or "").strip()
    password = request.form.get("password") or ""
    if not csrf_ok():
        return _login_page("Your session expired. Please try again.", 400)
    if not login_name or not password:
        return _login_page("Enter your email and password.", 400)
    throttle, address = realtime().throttle, request.remote_addr
    # A sign-out everywhere that lands while the password is being checked (against the old one,
    # maybe) ends this sign-in too: it counts from before the check, not from the answer.
    checked_from_ms = now_ms()
    try:
        # One count per account, however its name was typed (an email or an id).
        account = realtime().directory.account_of(login_name)
        # A browser that signed in to this account before is counted apart (see relay.devices).
        device = realtime().devices.device_of(request.cookies.get(DEVICE_COOKIE), account)
        known = device is not None
        # Counted before the password is checked (see relay.throttle): parallel guesses cannot slip through.
        attempt = throttle.attempt(account, address, device=device)
        if attempt.wait > 0:  # refused before the password is even looked at: the right one too
            retry = ceil(attempt.wait)
            fields = {"login": login_name[:120], "remote": address, "knownDevice": known, "retryAfter": retry}
            event("login.throttled", level="warning", **fields)
            return _too_many(attempt.wait)
        try:
            user = realtime().directory.authenticate(login_name, password)
        except DirectoryUnavailable:
            throttle.withdraw(attempt)  # nobody's fault: not a failure
            raise
        if user is None:
            fields = {"login": login_name[:120], "remote": address, "knownDevice": known}
            event("login_failed", level="warning", **fields, waitS=ceil(attempt.earned))
            return _login_page("Wrong email or password.", 401)
        throttle.succeeded(attempt)
    except (DirectoryUnavailable, ThrottleUnavailable):
        return _login_page("Sign-in is unavailable right now. Try again shortly.", 503)
    session.clear()  # a new session (new CSRF token): nothing from before the sign-in carries over
    session["user_id"] = user.user_id
    session["sid"] = secrets.token_urlsafe(18)  # what signing out records (relay.signouts)
    session["since"] = checked_from_ms // 1000  # the lifetime's start
    # To the millisecond, for a sign-out everywhere: the sign-ins before it end, the one right after
    # it holds. A field of its own: hosts still running older code read "since" as whole seconds.
    session["since_ms"] = checked_from_ms
    event("login", userId=user.user_id, role=user.role, knownDevice=known)
    response = redirect(_safe_next(request.args.get("next")))
    # Kept through sign-outs (it grants nothing but the throttle's trust): see relay.devices.
    cookie = realtime().devices.remember(request.cookies.get(DEVICE_COOKIE), account)
    secure = current_app.config["SESSION_COOKIE_SECURE"]
    response.set_cookie(
        DEVICE_COOKIE, cookie, max_age=DEVICE_MAX_AGE_S, path="/login", secure=secure, httponly=True, samesite="Strict"
    )
    return response


def _login_page(error: str, status: int, headers: dict | None = None) -> ResponseReturnValue:
    return render_template("login.html", error=error), status, headers or {}


def _too_many(wait: float) -> ResponseReturnValue:
    seconds = ceil(wait)
    when = f"{seconds} seconds" if seconds < 120 else f"{ceil(seconds / 60)} minutes"
    text = f"Too many failed sign-ins. For your account's safety, try again in {when}."
    return _login_page(text, 429, {"Retry-After": str(seconds)})


@bp.post("/logout")
def logout():
    """Ends the session here and on the server: a copy of the cookie is refused from now on.

    Remembered for the longest lifetime a session can be given, not the
    current one: raising SESSION_LIFETIME_HOURS later must not bring it back.
    If the sign-out store cannot record it, the browser is still signed out,
    and the failure is logged (``logout.unrecorded``): the copy then lasts
    until the session's lifetime ends, as before there was a store. A form
    without the session's CSRF token (another site's, or a page from before
    the last sign-in) signs nobody out, and says so.

    With ``everywhere=1`` (the "Sign out everywhere" button), every sign-in of
    this user ends, on every device. That one must be recorded, or it did
    nothing: if the store cannot, the person stays signed in and is told so.
    """
    if not csrf_ok():
        if session.get("user_id"):
            message = "You are still signed in: this page was out of date. Reload it and sign out again."
            return render_template("error.html", status=400, title="Not signed out", message=message), 400
        return redirect(url_for("auth.login"))
    user_id = session.get("user_id")
    if request.form.get("everywhere") == "1" and isinstance(user_id, str):
        # Only a sign-in that still holds: a copy of a cookie signed out before (the thief's) must
        # not be able to sign its owner out again and again. Such a copy is just signed out here.
        # _session_current, not current_user: a disabled user or an identity outage must not stop it.
        try:
            if _session_current():
                realtime().sign_out_everywhere(user_id, by="button")
        except (DirectoryUnavailable, SignoutsUnavailable) as problem:
            event("logout.everywhere_failed", level="warning", userId=user_id, error=str(problem))
            message = "Your sign-ins could not be ended right now. You are still signed in: try again in a moment."
            return render_template("error.html", status=503, title="Not signed out", message=message), 503
    session_id, started = session.get("sid"), session.get("since")
    if isinstance(session_id, str) and session_id and isinstance(started, int):
        until = started + MAX_SESSION_HOURS * 3600
        try:
            realtime().signouts.end(session_id, until)
        except SignoutsUnavailable as problem:
            event("logout.unrecorded", level="warning", userId=session.get("user_id"), error=str(problem))
    session.clear()
    return redirect(url_for("auth.login"))


def _safe_next(target: str | None) -> str:
    """Only a path on this site. "//host", "http://host", a backslash, a space or a control character
    are refused: URL parsers drop tabs and line breaks, so "/", a tab, "/host" would become "//host".
    So is anything not ASCII: no path here has it, and the server cannot put it in a header (a 500
    after a good sign-in, its cookie never set)."""
    if (
        target
        and target.isascii()
        and target.startswith("/")
        and not target.startswith("//")
        and "\\" not in target
        and all(" " < ch != "\x7f" for ch in target)
    ):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("pages.home")


# -- connection tokens -------------------------------------------------------------------


@bp.get("/api/ws/auth")
def ws_auth():
    """``{wsUrl, token, userId}`` for the signed-in user.

    The user is the one named by ``Authorization: Bearer <Supabase access token>``
    when that header is sent (a front end signed in with Supabase, no Flask
    session), else the session's user, else ``WS_TEST_USER_ID`` in development.
    """
    rt = realtime()
    # Dated from before the session is checked: a sign-out everywhere that lands while this request waits
    # (the identity lookup) ends this token too, as it does the session (see Realtime.apply_sign_outs).
    issued_ms = now_ms()
    access_token = bearer_token()
    if access_token is not None:
        address = request.remote_addr
        try:
            # An address whose tokens keep being refused is not heard for a while (relay.throttle):
            # each token checked may be a call to Supabase. Counted before the check, as passwords are.
            attempt = rt.throttle.token_attempt(address)
            if attempt.wait > 0:
                wait = ceil(attempt.wait)
                event("ws.token_throttled", level="warning", remote=address, retryAfter=wait)
                message = f"too many refused access tokens from this address; try again in {wait} s"
                return error_response(429, HttpError.TOO_MANY_ATTEMPTS, message, headers={"Retry-After": str(wait)})
            try:
                owner = rt.directory.user_for_access_token(access_token)
            except AccessTokenInvalid as refused:  # counted, as a wrong password is
                fields = {"reason": type(refused).__name__, "detail": str(refused), "remote": address}
                event("ws.token_refused", level="warning", **fields, waitS=ceil(attempt.earned))
                return error_response(401, HttpError.UNAUTHORIZED, str(refused))
            except BaseException:  # no verdict on the token (a server without them, an outage): not counted
                rt.throttle.withdraw(attempt)
                raise
            rt.throttle.withdraw(attempt)  # a good token
            user_id = owner.user_id
            user = rt.directory.get(user_id)
            issued_before_sign_out = user is not None and _issued_before_sign_out(owner, user.user_id)
        except AccessTokensUnsupported as unsupported:  # this server's configuration: nothing counted
            event("ws.token_refused", level="warning", reason=type(unsupported).__name__, detail=str(unsupported))
            return error_response(401, HttpError.UNAUTHORIZED, str(unsupported))
        except (DirectoryUnavailable, ThrottleUnavailable, SignoutsUnavailable):
            message = "the identity service is unavailable; try again shortly"
            return error_response(503, HttpError.UNAVAILABLE, message, headers={"Retry-After": "5"})
        if user is None or not user.active:
            return error_response(403, HttpError.FORBIDDEN, "this user may not connect")
        if issued_before_sign_out:
            event("ws.token_refused", level="warning", reason="signed_out", userId=user.user_id, remote=address)
            message = "this access token was issued before you were signed out everywhere; sign in again"
            return error_response(401, HttpError.UNAUTHORIZED, message)
    else:
        user = current_user()
        if g.get("user_refused"):  # signed in, then disabled (or removed): said once, the session has ended
            return error_response(403, HttpError.FORBIDDEN, "this user may not connect")
        user_id = user.user_id if user else (rt.settings.test_user_id or "")
    if not user_id:
        return error_response(401, HttpError.UNAUTHORIZED, "sign in first; connection tokens are per user")
    if rt.tokens is None:  # a serving process always has the secret (start-up refuses otherwise)
        return error_response(503, HttpError.UNAVAILABLE, "connection tokens are not configured (WS_TOKEN_SECRET)")
    response = jsonify(wsUrl=socket_url(), token=rt.tokens.mint(user_id, issued_ms), userId=user_id)
    response.headers["Cache-Control"] = "no-store"
    return response


def _issued_before_sign_out(owner: AccessTokenOwner, user_id: str) -> bool:
    """Whether a Supabase access token was issued before its user was signed out everywhere (or carries
    no ``iat`` while they were): Supabase cannot revoke one checked locally, so it would outlive the
    sign-out for its hour. Compared to the second, as ``iat`` is: one issued in the sign-out's second
    is taken to be after it, not before (a sign-in right after a sign-out must work). Raises
    ``SignoutsUnavailable``."""
    before = realtime().signouts.signed_out_before([user_id], time.time()).get(user_id)
    if before is None:
        return False
    return owner.issued_ms is None or owner.issued_ms < before // 1000 * 1000


@bp.after_app_request
def allow_listed_origins(response):
    """CORS for /api/ws/auth, so a front end on another origin (WS_ALLOWED_ORIGINS) can fetch tokens
    with its bearer access token. No cookies cross origins: the session stays same-site."""
    if upgraded():
        return response  # never sent
    origin = request.headers.get("Origin")
    if request.path == "/api/ws/auth" and origin:
        allowed = realtime().settings.allowed_origins
        if "*" in allowed or origin.lower().rstrip("/") in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization"
            response.headers["Access-Control-Allow-Methods"] = "GET"
            response.headers["Access-Control-Max-Age"] = "600"
        response.headers.add("Vary", "Origin")
    return response


def socket_url() -> str:
    configured = realtime().settings.public_url
    if configured:
        return configured
    scheme = "wss" if request.scheme == "https" else "ws"
    return f"{scheme}://{request.host}/ws"
