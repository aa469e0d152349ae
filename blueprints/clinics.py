"""Clinic pages: the live queue of one clinic, for its staff and for admins."""

from __future__ import annotations

import json

from flask import Blueprint, abort, redirect, render_template, request, url_for

from relay.channels import channels, is_valid_id

from .auth import csrf_required, login_required, realtime, signed_in
from .pages import from_before_render, note_stream_position, triggering_message

bp = Blueprint("clinics", __name__, url_prefix="/clinics")
bp.before_request(note_stream_position)  # see there: before the view reads its data


def _check_access(clinic_id: str) -> None:
    if not is_valid_id(clinic_id):
        abort(404)
    user = signed_in()
    if not (user.is_admin or user.clinic_id == clinic_id):
        abort(403)


@bp.get("")
@login_required
def open_clinic():
    """Target of the home page's "open a clinic" form (works without JavaScript)."""
    clinic_id = (request.args.get("clinic_id") or "").strip()
    if not is_valid_id(clinic_id):
        abort(404)
    return redirect(url_for("clinics.queue", clinic_id=clinic_id))


@bp.get("/<clinic_id>/queue")
@login_required
def queue(clinic_id):
    """The queue as it is now: the channel's last QUEUE_UPDATE is rendered at once (no JavaScript needed),
    and the page's subscription asks for it again (``last``), so nothing is missed in between. The alerts
    list starts with the latest CLINIC_ALERT sent before the page (with when it was sent): later ones
    are replayed to the page, and added above it."""
    _check_access(clinic_id)
    queue, alerts = channels.clinic.queue(clinic_id), channels.clinic.alerts(clinic_id)
    latest = realtime().latest({queue: "QUEUE_UPDATE", alerts: "CLINIC_ALERT"}, signed_in())
    view = queue_view(latest[queue].message()) if queue in latest else None
    alert = latest.get(alerts)
    if alert is not None and not from_before_render(alert):
        alert = None
    return render_template("clinics/queue.html", clinic_id=clinic_id, view=view, last_alert=alert)


@bp.post("/<clinic_id>/queue/render")
@login_required
@csrf_required
def render_queue(clinic_id):
    """Render the queue fragment from the QUEUE_UPDATE message that triggered the request."""
    _check_access(clinic_id)
    return render_template("clinics/_queue.html", view=queue_view(triggering_message()))


@bp.post("/<clinic_id>/alerts/render")
@login_required
@csrf_required
def render_alert(clinic_id):
    """Render the latest CLINIC_ALERT (the README's channel_subscriber example)."""
    _check_access(clinic_id)
    return render_template("clinics/_alert.html", message=triggering_message())


def queue_view(message: dict) -> dict:
    """What the queue fragment shows: the entries of ``data.queue``, or the data as readable JSON.

    A shape this page does not know is shown, not dropped: the people at the
    desk still see that something changed.
    """
    data = message.get("data")
    entries = data.get("queue") if isinstance(data, dict) else None
    at = data.get("at") if isinstance(data, dict) and isinstance(data.get("at"), str) else None
    if isinstance(entries, list) and all(isinstance(e, dict) and "number" in e and "name" in e for e in entries):
        return {
            "kind": "queue",
            "at": at,
            "entries": [
                {
                    "number": e["number"],
                    "name": e["name"],
                    "extra": {k: v for k, v in e.items() if k not in ("number", "name")},
                }
                for e in entries
            ],
        }
    return {"kind": "raw", "at": at, "json": json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True)}
