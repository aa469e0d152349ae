"""Application factory: settings in, Flask app out.

Configuration flows one way: the environment (plus ``config`` overrides,
which use the same variable names) is read once into
:class:`relay.config.Settings`, the core services are built from it, and the
blueprints reach them through ``current_app.extensions["realtime"]``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys

from flask import Flask
from flask.sessions import SecureCookieSessionInterface

from relay import eventlog
from relay.channels import channels
from relay.config import Settings
from relay.service import Realtime
from relay.sqlite_directory import DEMO_USERS, SqliteDirectory

log = logging.getLogger("relay.app")


def create_app(config: dict | None = None) -> Flask:
    """Build the app. ``config`` overrides environment variables by name (tests use it)."""
    overrides = dict(config or {})
    env = {**os.environ, **{key: str(value) for key, value in overrides.items()}}
    app = Flask(__name__, instance_path=env.get("REALTIME_INSTANCE_PATH") or None)
    settings = Settings.from_env(env, app.instance_path)

    eventlog.configure(settings.log_level)
    for notice in settings.notices:
        log.info(notice)
    for warning in settings.warnings:
        log.warning(warning)

    app.config.update(
        SECRET_KEY=settings.secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.production,
        SESSION_COOKIE_NAME="clinic_session",
        JSON_SORT_KEYS=False,
    )
    app.config.update({key: value for key, value in overrides.items() if key in ("TESTING", "DEBUG")})

    app.session_interface = CachedSerializerSessionInterface()
    realtime = Realtime(settings)
    app.extensions["realtime"] = realtime
    if not settings.production and env.get("REALTIME_SEED_DEMO", "1") != "0":
        _seed_demo_users(realtime, settings.instance_path)

    from blueprints import admin, api, auth, clinics, errors, ops, pages, socket, users

    for module in (errors, auth, socket, api, pages, admin, clinics, users, ops):
        app.register_blueprint(module.bp)
    app.jinja_env.globals.update(
        csrf_token=auth.csrf_token,
        current_user=auth.current_user,
        channels=channels,
        client_timing={"idle_ms": settings.client_idle_ms, "pong_timeout_ms": settings.client_pong_timeout_ms},
        now_time=lambda: dt.datetime.now().astimezone().strftime("%H:%M:%S %Z"),
    )
    app.jinja_env.filters["when"] = _when
    return app


def _when(value: str | None) -> str:
    """An ISO timestamp from a message, shown as "2025-11-03 21:00:00 UTC" (or as given if unparseable)."""
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return parsed.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


class CachedSerializerSessionInterface(SecureCookieSessionInterface):
    """Flask's cookie sessions, building the signing serializer once instead of per request.

    Flask opens the session for every request, WebSocket upgrades included, and
    builds a new itsdangerous serializer each time; the secret key never changes
    after start-up, so one is enough.
    """

    def get_signing_serializer(self, app: Flask):
        cached = getattr(self, "_serializer", None)
        if cached is None:
            cached = self._serializer = super().get_signing_serializer(app)
        return cached


def _seed_demo_users(realtime: Realtime, instance_path: str) -> None:
    """On a first development run, create a demo admin and two clinic staff and say how to sign in."""
    directory = realtime.directory
    if not isinstance(directory, SqliteDirectory):
        return
    created = directory.seed_demo(DEMO_USERS)
    if not created:
        return
    path = os.path.join(instance_path, "demo-users.txt")
    lines = [f"{u.email:<22} password {u.password:<18} role {u.role:<12} clinic {u.clinic_id or '-'}" for u in created]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    banner = "\n".join(
        [
            "",
            "=" * 72,
            "Demo users created (development only). Sign in at /login with:",
            *lines,
            f"(kept in {path}; shown once)",
            "=" * 72,
            "",
        ]
    )
    print(banner, file=sys.stderr, flush=True)
