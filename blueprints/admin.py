"""Admin pages: the dashboard (live figures, maintenance banner) and the broadcast form.

The broadcast form is a real form (``action``/``method``) that htmx
enhances: without JavaScript it posts and re-renders the page; with htmx the
panel is swapped in place. Either way it goes through the same
:class:`relay.broadcast.Broadcaster` as ``POST /broadcast``.
"""

from __future__ import annotations

import json

from flask import Blueprint, make_response, render_template, request

from relay.broadcast import BroadcastRequest
from relay.broker import BrokerUnavailable
from relay.clock import now_iso
from relay.envelope import Filter

from .auth import admin_required, csrf_ok, csrf_required, realtime, signed_in
from .pages import triggering_message

bp = Blueprint("admin", __name__, url_prefix="/admin")

# What the form offers, and the message type each channel carries.
CHANNEL_TYPES = {"system:announcements": "ANNOUNCEMENT", "system:maintenance": "MAINTENANCE"}
MAX_TEXT = 2000


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


@bp.get("")
@admin_required
def dashboard():
    return render_template("admin/dashboard.html", stats=realtime().health())


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
            recent=list(realtime().broadcaster.recent),
            max_text=MAX_TEXT,
        ),
        status,
    )
    response.headers["Vary"] = "HX-Request"
    return response


def _send(form: dict) -> tuple[int | None, str | None, int]:
    """Validate and send; returns (delivered, error, HTTP status)."""
    text = form["message"]
    if not csrf_ok():
        return None, "Your session has expired. Reload the page and send again.", 422
    if form["channel"] not in CHANNEL_TYPES:
        return None, "Choose a channel.", 422
    if not text.strip():
        return None, "Write a message.", 422
    if len(text) > MAX_TEXT:
        return None, f"Keep the message under {MAX_TEXT} characters (it has {len(text)}).", 422
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
