"""Application factory: settings in, Flask app out.

Configuration flows one way: the environment (plus ``config`` overrides,
which use the same variable names) is read once into
:class:`relay.config.Settings`, the core services are built from it, and the
blueprints reach them through ``current_app.extensions["realtime"]``.

The factory does nothing else: it writes no file, opens no connection and
starts no greenlet. The serving process starts the service
(``Realtime.start`` in ``gunicorn.conf.py``); development conveniences are
commands a person runs (``flask --app app users seed-demo``, which ``make run``
calls).
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import click
from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer
from werkzeug.middleware.proxy_fix import ProxyFix

from relay import eventlog
from relay.broadcast_log import iso
from relay.channels import channels
from relay.config import ConfigError, Settings
from relay.service import Realtime

log = logging.getLogger("relay.app")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app. ``config`` overrides environment variables by name (tests use it)."""
    overrides = dict(config or {})
    env = {**os.environ, **{key: str(value) for key, value in overrides.items()}}
    try:
        settings = Settings.from_env(env)
    except ConfigError as problem:
        if click.get_current_context(silent=True) is not None:
            # A `flask` command (make run's first step, an operator's `flask users ...`): one line, as the
            # server says it (wsgi.py), not the traceback of Flask loading the app.
            raise click.ClickException(f"cannot start: {problem}") from None
        raise
    app = RelayFlask(__name__, instance_path=settings.instance_path)

    eventlog.configure(settings.log_level)
    # The server says each once, as it starts; a `flask` command would repeat them on every run.
    in_a_command = click.get_current_context(silent=True) is not None
    for notice in settings.notices:
        log.log(logging.DEBUG if in_a_command else logging.INFO, notice)
    for warning in settings.warnings:
        log.warning(warning)

    app.config.update(
        SECRET_KEY=settings.secret_key,
        # The cookie's signature is refused once this old; auth.current_user also ends a sign-in this old.
        PERMANENT_SESSION_LIFETIME=dt.timedelta(seconds=settings.session_lifetime_s),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.production,
        SESSION_COOKIE_NAME="clinic_session",
        JSON_SORT_KEYS=False,
    )
    app.config.update({key: value for key, value in overrides.items() if key in ("TESTING", "DEBUG")})

    app.session_interface = CachedSerializerSessionInterface()
    app.extensions["realtime"] = Realtime(settings)

    from blueprints import (
        admin,
        api,
        auth,
        clinics,
        errors,
        metrics,
        pages,
        request_ids,
        request_limits,
        security_headers,
        socket,
        user_commands,
        ws_commands,
    )

    blueprints = (request_ids, errors, security_headers, auth, socket, api, metrics, pages, admin, clinics)
    for module in (*blueprints, user_commands, ws_commands):
        app.register_blueprint(module.bp)
    app.wsgi_app = request_limits.RequestLimits(
        app.wsgi_app,
        timeout=settings.http_request_timeout_ms / 1000,
        send_timeout=settings.http_send_timeout_ms / 1000,
    )
    if settings.trusted_proxies:
        # Behind a load balancer every request comes from its address: the client's is the one the
        # proxies appended to X-Forwarded-For (the last N: never trust what the client itself sent).
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n)
    app.jinja_env.globals.update(
        csrf_token=auth.csrf_token,
        current_user=auth.current_user_if_known,
        channels=channels,
        client_timing={"idle_ms": settings.client_idle_ms, "pong_timeout_ms": settings.client_pong_timeout_ms},
        now_time=lambda: dt.datetime.now().astimezone().strftime("%H:%M:%S %Z"),
    )
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["iso_ms"] = iso  # epoch ms (an envelope's ``at``) as ISO 8601, for ``when``
    return app


def _when(value: str | None) -> str:
    """An ISO timestamp from a message, shown as "2025-11-03 21:00:00 UTC" (or as given if unparseable)."""
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return parsed.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


class RelayFlask(Flask):
    """Flask, deciding once per function whether it is ``async def``.

    Flask asks ``inspect`` again for every hook and view of every request
    (seven times for a socket's upgrade, ~1.5 µs each); a function's kind
    never changes. The answer is kept per function (a bound method's, so a
    class-based view's new instance per request adds nothing), for at most
    ``ASYNC_CHECKS_KEPT`` of them: Flask also passes callables it makes per
    request (``copy_current_request_context``'s wrappers), which are asked.
    """

    ASYNC_CHECKS_KEPT = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._is_async: dict[Callable[..., Any], bool] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        key = getattr(func, "__func__", func)
        try:
            is_async = self._is_async[key]
        except KeyError:
            is_async = inspect.iscoroutinefunction(func)
            if len(self._is_async) < self.ASYNC_CHECKS_KEPT:
                self._is_async[key] = is_async
        except TypeError:  # an unhashable callable
            return super().ensure_sync(func)
        return self.async_to_sync(func) if is_async else func


class CachedSerializerSessionInterface(SecureCookieSessionInterface):
    """Flask's cookie sessions, building the signing serializer once instead of per request,
    and none at all for the socket.

    Flask opens the session for every request and builds a new itsdangerous
    serializer each time; the secret key never changes after start-up, so one
    is enough. A ``/ws`` upgrade authenticates with its token, never with the
    cookie: it gets Flask's null session, so a reconnect storm verifies and
    saves no cookies.
    """

    _serializer: URLSafeTimedSerializer | None = None

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if request.path == "/ws":
            return self.make_null_session(app)
        return super().open_session(app, request)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        if self._serializer is None:
            self._serializer = super().get_signing_serializer(app)
        return self._serializer
