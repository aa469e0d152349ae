"""``flask users ...``: manage the embedded SQLite identity store, and sign users out (a CLI group, not a URL area)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import click
from flask import Blueprint

from relay.channels import ADMIN_ROLE, is_valid_id
from relay.opsclient import OpsClient, ServiceError
from relay.signouts import SignoutsUnavailable
from relay.sqlite_directory import DEMO_USERS, SqliteDirectory, UserError

from .auth import realtime
from .ws_commands import TEXT, ops_client, url_option

bp = Blueprint("users", __name__, cli_group="users")


def _store() -> SqliteDirectory:
    directory = realtime().directory
    if not isinstance(directory, SqliteDirectory):
        raise click.ClickException(
            f"users are managed in {directory.name}, not here: these commands edit the embedded SQLite store"
        )
    return directory


def _ask_password() -> str:
    """At a terminal, asked twice without echo; else (a script's pipe) the first line of stdin, as it is:
    there is no terminal to hide it on, and getpass warned so on every run."""
    if sys.stdin is not None and sys.stdin.isatty():
        return click.prompt("Password", hide_input=True, confirmation_prompt=True, type=TEXT)
    # Bytes, decoded here: the locale's decoder would raise on a byte that is not UTF-8 (a traceback).
    line = sys.stdin.buffer.readline(4096) if sys.stdin is not None else b""  # None: no stdin at all
    try:
        password = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise click.UsageError("the password piped in is not UTF-8 text") from None
    if not password:
        raise click.UsageError("no password: give --password, type one at a terminal, or pipe it as the first line")
    return password


def _apply(action: Callable[..., object], *args: object) -> None:
    try:
        action(*args)
    except UserError as problem:
        raise click.ClickException(str(problem)) from None


@bp.cli.command("add")
@click.argument("user_id")
@click.option("--email", type=TEXT, help="Sign-in email (unique).")
@click.option("--password", type=TEXT, help="Sign-in password; prompted for when omitted.")
@click.option("--role", required=True, help="One word: admin, sales_staff, nurse, ... (admin may open admin pages).")
@click.option("--clinic", "clinic_id", help="Clinic id, for clinic staff.")
@click.option("--name", "display_name", type=TEXT, help="Display name.")
@click.option("--no-password", is_flag=True, help="Create a user that cannot sign in (socket-only, e.g. a screen).")
def add(user_id, email, password, role, clinic_id, display_name, no_password):
    """Add a user."""
    if password is not None and no_password:
        raise click.UsageError("give --password or --no-password, not both")
    if password is None and not no_password:
        password = _ask_password()
    try:
        user = _store().add_user(
            user_id, email=email, password=password, role=role, clinic_id=clinic_id, display_name=display_name
        )
    except UserError as problem:
        raise click.ClickException(str(problem)) from None
    click.echo(f"added {user.user_id} ({user.email or 'no email'}), role {user.role}, clinic {user.clinic_id or '-'}")
    _note_new_role(user.user_id, user.role)


@bp.cli.command("list")
def list_users():
    """List users."""
    users = _store().list_users()
    click.echo(f"{'id':<24} {'email':<28} {'role':<14} {'clinic':<12} active")
    for user in users:
        click.echo(
            f"{user.user_id:<24} {user.email or '-':<28} {user.role:<14} {user.clinic_id or '-':<12} "
            f"{'yes' if user.active else 'no'}"
        )
    click.echo(f"{len(users)} user(s)")


@bp.cli.command("set-role")
@click.argument("user_id")
@click.argument("role")
def set_role(user_id, role):
    """Change a user's role (open sockets follow within about a second: subscriptions it no longer allows end)."""
    _apply(_store().set_role, user_id, role)
    click.echo(f"{user_id} is now {role}")
    _note_new_role(user_id, role)


def _note_new_role(user_id: str, role: str) -> None:
    """Roles are free words (a clinic has its own): one that nobody else has may be a typo ("admn"),
    which would quietly take the user's access away. Said, not refused."""
    others = {user.role for user in _store().list_users() if user.user_id != user_id}
    if others and role not in others:
        click.echo(
            f"note: no other user has role {role!r} (roles in use: {', '.join(sorted(others))}); "
            f"only {ADMIN_ROLE!r} may use the admin pages, and a broadcast to roles names them exactly"
        )


@bp.cli.command("set-clinic")
@click.argument("user_id")
@click.argument("clinic_id", required=False)
def set_clinic(user_id, clinic_id):
    """Change (or, without CLINIC_ID, clear) a user's clinic (open sockets follow within about a second)."""
    _apply(_store().set_clinic, user_id, clinic_id)
    click.echo(f"{user_id} clinic is now {clinic_id or '-'}")


@bp.cli.command("set-password")
@click.argument("user_id")
@click.option("--password", type=TEXT, help="The new password; prompted for when omitted.")
@url_option
def set_password(user_id, password, url):
    """Set a user's sign-in password, and sign them out everywhere (whoever knew the old one is out)."""
    server = _admin_client(url)
    if password is None:
        password = _ask_password()
    _apply(_store().set_password, user_id, password)
    try:
        realtime().end_sign_ins(user_id, by="cli")
    except SignoutsUnavailable as down:
        raise click.ClickException(
            f"the password of {user_id} changed, but their sign-ins could not be ended ({down}): "
            f"run 'flask users sign-out {user_id}' once the sign-out store is back"
        ) from None
    click.echo(f"password of {user_id} changed; every sign-in of {user_id} has ended")
    _close_sockets(server, user_id, again=f"flask users sign-out {user_id} --url {server.base_url}")


@bp.cli.command("sign-out")
@click.argument("user_id")
@url_option
def sign_out(user_id, url):
    """End every sign-in of a user and close their sockets (a lost laptop), whatever the identity source.

    The sign-ins end in the sign-out store itself (their pages and /api/ws/auth ask them to sign in
    again, on every host that shares it); the sockets are closed by the server at --url. Exits 1 if
    either could not be done. Connection tokens minted before are refused from then on; a socket
    opened with one is closed at the next identity re-check (WS_IDENTITY_RECHECK_MS).
    """
    if not is_valid_id(user_id):
        raise click.ClickException(f"{user_id[:80]!r} is not a user id; nobody was signed out")
    server = _admin_client(url)
    spelled, known = realtime().spelled_by_source(user_id)
    if known is None:
        source = realtime().directory.name
        click.echo(
            f"could not check that {user_id} exists ({source} is down); signing out {user_id!r} as typed", err=True
        )
    elif not known:
        raise click.ClickException(f"no user {user_id!r} in {realtime().directory.name}; nobody was signed out")
    user_id = spelled
    try:
        realtime().end_sign_ins(user_id, by="cli")
    except SignoutsUnavailable as down:
        raise click.ClickException(f"not signed out: {down}") from None
    click.echo(f"every sign-in of {user_id} has ended")
    _close_sockets(server, user_id, again=f"flask users sign-out {user_id} --url {server.base_url}")


@bp.cli.command("disconnect")
@click.argument("user_id")
@url_option
def disconnect(user_id, url):
    """Close every socket of a user, on every worker and host (4403), without ending their sign-ins.

    Recorded in the sign-out store first, then asked of the server at --url: a server (or a worker)
    that does not hear it closes them at its next identity re-check (WS_IDENTITY_RECHECK_MS). Exits 1
    if the server did not confirm. Disable the user as well, or a new sign-in opens new sockets.
    """
    if not is_valid_id(user_id):
        raise click.ClickException(f"{user_id[:80]!r} is not a user id; nobody was disconnected")
    server = _admin_client(url)
    user_id, known = realtime().spelled_by_source(user_id)  # as their sockets are keyed; unknown: as typed
    if known is False:
        # Still done: a user removed from the source may have sockets open. But a typo would look like success.
        source = realtime().directory.name
        click.echo(f"WARNING: no user {user_id!r} in {source}: check the id (disconnecting it anyway)", err=True)
    try:
        realtime().record_disconnect(user_id)
    except SignoutsUnavailable as down:
        click.echo(f"not recorded ({down}): only the server can close their sockets now", err=True)
    else:
        every = realtime().settings.identity_recheck_ms
        click.echo(
            f"recorded in the sign-out store: a worker the server cannot reach now closes them at its next "
            f"identity re-check (within {every} ms)"
        )
    _close_sockets(server, user_id, again=f"flask users disconnect {user_id} --url {server.base_url}")


def _admin_client(url: str | None) -> OpsClient:
    """The running server, which holds the sockets, and the admin secret it wants: both checked
    before anything is changed (a password must not change and then leave the sockets open)."""
    server = ops_client(url, 5.0)
    if not server.admin_secret:
        raise click.ClickException(
            "no admin secret to ask the server to close the sockets with: set WS_ADMIN_SECRET (in development "
            "the server writes it to the instance folder's dev-secrets.json on its first start); nothing was changed"
        )
    return server


def _close_sockets(server: OpsClient, user_id: str, *, again: str) -> None:
    """Ask the server to close the user's sockets; exit 1 saying what is left if it did not."""
    later = "each worker closes them at its next identity re-check (WS_IDENTITY_RECHECK_MS), or"
    try:
        status, body = server.disconnect(user_id)
    except ServiceError as unreachable:
        raise click.ClickException(
            f"their open sockets were not closed now ({unreachable}): {later} run {again!r}"
        ) from None
    if status != 200:
        error = body.get("error")
        reason = error.get("message") if isinstance(error, dict) and error.get("message") else f"HTTP {status}"
        raise click.ClickException(f"their open sockets were not closed now ({reason}): {later} run {again!r}")
    click.echo(f"{body.get('disconnected')} open socket(s) closed")
    missing = body.get("missingWorkers") or 0
    if missing:
        raise click.ClickException(
            f"{missing} worker(s) did not answer in time, their sockets may be open: run {again!r}"
        )


@bp.cli.command("disable")
@click.argument("user_id")
def disable(user_id):
    """Stop a user from signing in and connecting (open sockets are closed with 4403 within about a second)."""
    _apply(_store().set_active, user_id, False)
    click.echo(f"{user_id} disabled")


@bp.cli.command("enable")
@click.argument("user_id")
def enable(user_id):
    """Re-enable a disabled user."""
    _apply(_store().set_active, user_id, True)
    click.echo(f"{user_id} enabled")


@bp.cli.command("seed-demo")
def seed_demo():
    """Development: create a demo admin and two clinic staff if there are no users yet, and say how to sign in.

    ``make run`` calls this before it starts the server. The passwords are random, printed once and kept
    in the instance folder (``demo-users.txt``, mode 0600). Never in production; nothing to do with Supabase.
    """
    settings = realtime().settings
    login_url = f"http://{settings.address}/login"
    if settings.production:
        click.echo("APP_ENV=production: demo users are never created.")
        return
    directory = realtime().directory
    if not isinstance(directory, SqliteDirectory):
        click.echo(f"Users come from {directory.name}; sign in at {login_url} with an account there.")
        return
    path = os.path.join(settings.instance_path, "demo-users.txt")
    created = directory.seed_demo(DEMO_USERS)
    if not created:
        kept = f" (demo passwords are in {path})" if os.path.exists(path) else ""
        click.echo(f"Sign in at {login_url}{kept}.")
        return
    lines = [f"{u.email:<22} password {u.password:<18} role {u.role:<12} clinic {u.clinic_id or '-'}" for u in created]
    os.makedirs(settings.instance_path, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    rule = "=" * 72
    click.echo(
        "\n".join(
            [
                rule,
                f"Demo users created (development only). Sign in at {login_url} with:",
                *lines,
                f"(kept in {path}; shown once)",
                rule,
            ]
        )
    )
