"""Admin pages: the dashboard (live figures, the last hour in charts, maintenance banner), the broadcast
form, and the broadcast log (filters, pages, CSV).

The broadcast form is a real form (``action``/``method``) that htmx
enhances: without JavaScript it posts and re-renders the page; with htmx the
panel is swapped in place. Either way it goes through the same
:class:`relay.broadcast.Broadcaster` as ``POST /broadcast``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from flask import Blueprint, make_response, render_template, request

from relay.broadcast import BroadcastRequest
from relay.broadcast_log import LoggedBroadcast, LogQuery, LogUnavailable, csv_text, iso, parse_when
from relay.broker import BrokerUnavailable
from relay.clock import now_iso, now_ms
from relay.envelope import Filter

from .auth import admin_required, csrf_ok, csrf_required, realtime, signed_in
from .pages import note_stream_position, triggering_message

bp = Blueprint("admin", __name__, url_prefix="/admin")
bp.before_request(note_stream_position)  # see there: before the view reads its data

# What the form offers, and the message type each channel carries.
CHANNEL_TYPES = {"system:announcements": "ANNOUNCEMENT", "system:maintenance": "MAINTENANCE"}
MAX_TEXT = 2000


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


LOG_FILTERS = ("type", "channel", "sender", "since", "until")  # the log page's query parameters
PAGE_ROWS = 50
CSV_MAX_ROWS = 10_000
RECENT_ROWS = 10


@bp.get("")
@admin_required
def dashboard():
    report = realtime().health(history=True)
    return render_template("admin/dashboard.html", stats=report, minutes=report["history"][-15:][::-1], iso=iso)


@bp.get("/last-hour")
@admin_required
def last_hour():
    """The dashboard's charts: the last hour as /health?history=1 reports it (there behind the
    monitoring token in production; here behind an admin's sign-in)."""
    response = make_response(realtime().last_hour())
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/stats")
@admin_required
def stats():
    """The figures panel, polled by the dashboard."""
    response = make_response(render_template("admin/_stats.html", stats=realtime().health()))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/broadcast", methods=["GET", "POST"])
@admin_required
def broadcast():
    form = {"channel": "system:announcements", "message": ""}
    delivered = error = None
    status = 200
    if request.method == "POST":
        form = {"channel": request.form.get("channel", ""), "message": request.form.get("message", "")}
        delivered, error, status = _send(form)
        if error is None:
            form["message"] = ""
    template = "admin/_broadcast_response.html" if is_htmx() else "admin/broadcast.html"
    response = make_response(
        render_template(
            template,
            form=form,
            delivered=delivered,
            error=error,
            channels=CHANNEL_TYPES,
            recent=_recent(),
            iso=iso,
            max_text=MAX_TEXT,
        ),
        status,
    )
    response.headers["Vary"] = "HX-Request"
    return response


@bp.get("/log")
@admin_required
def broadcast_log():
    """Every broadcast, newest first, from every worker and host (the store is shared)."""
    page, query, problem = _log_query(request.args, PAGE_ROWS)
    rows: list = []
    status = 400 if problem else 200
    if query is not None:
        rows, problem = _read(query)
        status = 503 if problem else 200
    html = render_template(
        "admin/log.html",
        rows=rows[:PAGE_ROWS],
        more=len(rows) > PAGE_ROWS,  # one row more than a page was asked for
        page=page,
        # Only the filters: the rest of a query string would reach url_for (?endpoint=x was a 500).
        args={k: v for k, v in request.args.items() if k in LOG_FILTERS and v},
        problem=problem,
        iso=iso,
        log_days=realtime().settings.broadcast_log_days,
    )
    return html, status


@bp.get("/log.csv")
@admin_required
def broadcast_log_csv():
    _, query, problem = _log_query(request.args, CSV_MAX_ROWS, paged=False)
    if query is None:
        return make_response(f"{problem}\n", 400, {"Content-Type": "text/plain; charset=utf-8"})
    rows, problem = _read(query)
    if problem is not None:
        return make_response(f"{problem}\n", 503, {"Content-Type": "text/plain; charset=utf-8", "Retry-After": "5"})
    response = make_response(csv_text(rows))
    response.headers["Content-Type"] = "text/csv; charset=utf-8"
    response.headers["Content-Disposition"] = 'attachment; filename="broadcast-log.csv"'
    response.headers["Cache-Control"] = "no-store"
    return response


def _log_query(args: Mapping[str, str], rows: int, *, paged: bool = True) -> tuple[int, LogQuery | None, str | None]:
    """(page, the query, None) from the query string, or (0, None, why it cannot be used).

    A paged query asks for one row more than a page, to know whether there is a next one.
    """
    now = now_ms()
    try:
        since = parse_when(args["since"], now) if args.get("since") else None
        until = parse_when(args["until"], now) if args.get("until") else None
    except ValueError as bad:
        return 0, None, str(bad)
    page_text = (args.get("page") or "0").strip() if paged else "0"
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    if not (page_text.isascii() and page_text.isdigit()) or int(page_text) > 10_000:
        return 0, None, "page must be a whole number from 0 to 10000"
    page = int(page_text)
    fields = {name: (args.get(name) or "").strip() or None for name in ("type", "channel", "sender")}
    limit = rows + 1 if paged else rows
    try:
        query = LogQuery(**fields, since=since, until=until, offset=page * rows, limit=limit)
    except ValueError as bad:
        return 0, None, str(bad)
    return page, query, None


def _read(query: LogQuery) -> tuple[list[LoggedBroadcast], str | None]:
    writer = realtime().broadcast_log
    writer.flush(deadline=1.0)  # what this worker has just sent is in the store before it is read
    try:
        return writer.store.query(query), None
    except LogUnavailable as down:
        return [], f"The broadcast log cannot be read right now: {down}"


def _recent() -> list:
    rows, _ = _read(LogQuery(limit=RECENT_ROWS))
    return rows


def _send(form: dict) -> tuple[int | None, str | None, int]:
    """Validate and send; returns (delivered, error, HTTP status)."""
    # A browser sends a textarea's line breaks as CRLF: one character each, as typed and as counted by
    # its maxlength.
    text = form["message"].replace("\r\n", "\n")
    if not csrf_ok():
        return None, "Your session has expired. Reload the page and send again.", 422
    if form["channel"] not in CHANNEL_TYPES:
        return None, "Choose a channel.", 422
    if not text.strip():
        return None, "Write a message.", 422
    if len(text) > MAX_TEXT:
        return None, f"Keep the message to at most {MAX_TEXT} characters (it has {len(text)}).", 422
    # The text goes out exactly as typed: it is escaped where it is shown, never here.
    outgoing = BroadcastRequest(
        CHANNEL_TYPES[form["channel"]],
        {"message": text, "at": now_iso()},
        Filter(channels=frozenset({form["channel"]})),
    )
    try:
        receipt = realtime().broadcast(
            outgoing, source=f"admin-page:{signed_in().user_id}", scope=f"admin:{signed_in().user_id}"
        )
    except BrokerUnavailable as down:
        return None, f"Not sent: {down}. Try again in a moment.", 503
    return receipt.delivered, None, 200


@bp.post("/maintenance/render")
@admin_required
@csrf_required
def maintenance_banner():
    """Render the dashboard's maintenance banner from the MAINTENANCE message that triggered it."""
    message = triggering_message()
    raw = message.get("data")
    data = raw if isinstance(raw, dict) else {}
    text = data.get("message") if isinstance(data.get("message"), str) else json.dumps(raw)
    return render_template("admin/_maintenance_banner.html", text=text, at=data.get("at"))
