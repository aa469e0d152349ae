"""``flask ws ...``: operator tools that talk to a running server over HTTP and WebSocket.

They read secrets and ``WS_TEST_USER_ID`` from the same environment (and
development secrets file) as the server, so on a development machine
``flask ws smoke`` needs no arguments.
"""

from __future__ import annotations

import json
import math
import time

import click
from flask import Blueprint

from relay.broadcast_log import LogQuery, LogUnavailable, csv_text, iso, parse_when
from relay.clock import now_iso, now_ms
from relay.directory import DirectoryUnavailable
from relay.opsclient import OpsClient, ServiceError, error_text, smoke

from .auth import realtime

bp = Blueprint("ws", __name__, cli_group="ws")


def ops_client(url: str | None, timeout: float) -> OpsClient:
    """A client of the server at ``url`` (default: this host's ``WS_PORT``) with this environment's
    admin secret and metrics token; a ``url`` that is not one is a usage error, said before anything is done."""
    settings = realtime().settings
    try:
        base = url or f"http://127.0.0.1:{settings.port}"
        return OpsClient(base, settings.admin_secret, timeout, settings.metrics_token)
    except ValueError as problem:
        raise click.ClickException(str(problem)) from None


def _split(values: tuple[str, ...]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


class _Text(click.ParamType):
    """A string that is text. A byte the terminal's encoding cannot decode ("José" typed in Latin-1 into a
    UTF-8 locale) reaches Python as a lone surrogate, which SQLite, the password hash and HTTP refused
    with a traceback."""

    name = "text"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                self.fail("is not valid UTF-8 text: check the terminal's encoding (LANG, LC_ALL)", param, ctx)
        return value


TEXT = _Text()

url_option = click.option("--url", help="Server base URL [default: http://127.0.0.1:$WS_PORT]")


def _a_number(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if math.isnan(value):  # passes FloatRange: nan compares false with both bounds
        raise click.BadParameter("is not a number of seconds", ctx, param)
    return value


# Bounded: nan, a negative or an endless timeout raised from the socket (a traceback), and 0 failed every
# step with "Operation now in progress".
timeout_option = click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.1, 600),
    callback=_a_number,
    help="Seconds per step (0.1-600).",
)


@bp.cli.command("health")
@url_option
@timeout_option
def health(url, timeout):
    """Print /health; exit 1 unless the server says ok."""
    try:
        status, body = ops_client(url, timeout).health()
    except ServiceError as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(body, indent=2))
    if status != 200 or body.get("ok") is not True:
        raise SystemExit(1)


@bp.cli.command("broadcast")
@url_option
@timeout_option
@click.option("--message", required=True, help="Text for data.message.")
@click.option("--type", "message_type", default="ANNOUNCEMENT", show_default=True)
@click.option("--channels", multiple=True, help="Comma-separated; repeatable.")
@click.option("--users", multiple=True, help="User ids, comma-separated; repeatable.")
@click.option("--clinics", multiple=True, help="Clinic ids, comma-separated; repeatable.")
@click.option("--roles", multiple=True, help="Roles, comma-separated; repeatable.")
@click.option("--everyone", is_flag=True, help="Send it with no filter: to every connected client.")
def broadcast(url, timeout, message, message_type, channels, users, clinics, roles, everyone):
    """Send {type, data: {message, at}} through POST /broadcast."""
    flt = {
        key: _split(values)
        for key, values in (("channels", channels), ("userIds", users), ("clinicIds", clinics), ("roles", roles))
        if _split(values)
    }
    if not flt and not everyone:
        # A forgotten --channels (or one given as ",") would reach every screen of every clinic.
        raise click.UsageError(
            "no --channels, --users, --clinics or --roles: this would reach every connected client. "
            "Add --everyone to mean that."
        )
    if flt and everyone:
        raise click.UsageError("--everyone sends with no filter: leave it out, or leave out the filters")
    try:
        status, body = ops_client(url, timeout).broadcast(message_type, {"message": message, "at": now_iso()}, flt)
    except ServiceError as err:
        raise click.ClickException(str(err)) from None
    if status != 200:
        raise click.ClickException(f"HTTP {status}{error_text(body)}")
    if "delivered" not in body or "id" not in body:
        raise click.ClickException(f"HTTP 200, but not this service's answer to a broadcast: {str(body)[:200]}")
    click.echo(f"delivered to {body['delivered']} connection(s), id {body['id']}")


@bp.cli.command("log")
@click.option(
    "--since", default=None, help="30m, 2h, 7d, or an ISO time (UTC unless given); default: 1 h before --until."
)
@click.option("--until", default=None, help="The same forms; default now.")
@click.option("--type", "message_type", default=None, help="Only this message type.")
@click.option("--channel", default=None, help="Only broadcasts sent to this channel.")
@click.option("--sender", default=None, help="'service', or an admin's user id.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--csv", "as_csv", is_flag=True, help="CSV (the admin page's export) instead of lines.")
def log_command(since, until, message_type, channel, sender, limit, as_csv):
    """Print the broadcast log (from the store, every worker's broadcasts), newest first."""
    now = now_ms()
    try:
        end = parse_when(until, now) if until else None
        query = LogQuery(
            type=message_type,
            channel=channel,
            sender=sender,
            # The hour before (an --until of 1970-01-01T00:00Z is 0: a moment, not "not given").
            since=parse_when(since, now) if since else (now if end is None else end) - 3_600_000,
            until=end,
            limit=limit,
        )
        rows = realtime().broadcast_log.store.query(query)
    except ValueError as bad:
        raise click.BadParameter(str(bad)) from None
    except LogUnavailable as down:
        raise click.ClickException(str(down)) from None
    if as_csv:
        click.echo(csv_text(rows), nl=False)
        return
    for row in rows:
        who = "service" if row.source == "api" else row.sender
        to = json.dumps(row.filter, separators=(",", ":")) if row.filter else "everyone"
        click.echo(f"{iso(row.at)}  {row.type:<14} to {to}  delivered {row.delivered}  by {who}  {row.preview[:80]}")
    if not rows:
        click.echo("no broadcasts in that window", err=True)


@bp.cli.command("smoke")
@url_option
@timeout_option
@click.option("--user", "user_id", help="User to connect as when /api/ws/auth has no WS_TEST_USER_ID.")
@click.option("--channel", default="system:announcements", show_default=True)
def smoke_test(url, timeout, user_id, channel):
    """Token, connect, subscribe, broadcast (to this user only), receive. Exit 1 on any failure."""
    rt = realtime()
    steps = smoke(ops_client(url, timeout), rt.tokens, user_id or rt.settings.test_user_id, channel)
    for step in steps:
        click.echo(f"{'ok  ' if step.ok else 'FAIL'} {step.name:<10} {step.detail}")
    if len(steps) < 6 or not all(step.ok for step in steps):
        click.echo("smoke test FAILED", err=True)
        raise SystemExit(1)
    click.echo("smoke test passed")


@bp.cli.group("identity")
def identity():
    """The identity source (SQLite or Supabase)."""


@identity.command("check")
@click.argument("user_id", type=TEXT)
def identity_check(user_id):
    """Look USER_ID up in the configured identity source, bypassing any cache.

    Exit 0 when the user exists and is active, 1 when unknown or disabled,
    2 when the source cannot be reached.
    """
    directory = realtime().directory
    click.echo(f"identity source: {json.dumps(directory.status())}")
    try:
        for warning in directory.project_warnings():  # Supabase's: who may sign up
            click.echo(f"WARNING: {warning}", err=True)
    except DirectoryUnavailable as down:
        click.echo(f"WARNING: {down}", err=True)
    lookup = getattr(directory, "fetch", directory.get)
    started = time.perf_counter()
    try:
        user = lookup(user_id)
    except DirectoryUnavailable as down:
        click.echo(f"UNAVAILABLE after {time.perf_counter() - started:.2f} s: {down}", err=True)
        raise SystemExit(2) from None
    elapsed = f"{(time.perf_counter() - started) * 1000:.0f} ms"
    if user is None:
        click.echo(f"no user {user_id!r} ({elapsed})")
        raise SystemExit(1)
    click.echo(json.dumps({**user.public(), "active": user.active}, indent=2))
    click.echo(f"found in {elapsed}" + ("" if user.active else "; the user is DISABLED and cannot connect"))
    if not user.active:
        raise SystemExit(1)
