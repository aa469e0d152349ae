"""Site pages for signed-in people, and what fragment views share."""

from __future__ import annotations

import json

from flask import Blueprint, g, render_template, request

from relay import jsonsafe
from relay.envelope import Envelope

from .auth import login_required, realtime, signed_in

bp = Blueprint("pages", __name__)
MAX_MESSAGE_CHARS = 64 * 1024


def note_stream_position() -> None:
    """Before a page's view reads what it shows: the stream's position (``g.stream_at``), which
    ``base.html`` renders into ``<body>`` for realtime.js to subscribe ``since`` it. What is broadcast
    between this render and the page's subscription is then replayed, not lost. Taken before the view
    reads anything: a broadcast just after may be shown twice (rendered, then replayed), never missed.
    Registered on the blueprints of pages (not on ``/ws``, whose every upgrade would pay for it)."""
    g.stream_at = realtime().stream_position()


bp.before_request(note_stream_position)


def from_before_render(envelope: Envelope) -> bool:
    """Whether ``envelope`` is at or before the position this page renders (``g.stream_at``): one after
    it is replayed to the page, and a list that rendered it too would show it twice."""
    at = g.get("stream_at")
    return at is None or envelope.epoch != at[0] or (envelope.offset or 0) <= at[1]


@bp.get("/")
@login_required
def home():
    return render_template("home.html", user=signed_in())


def triggering_message() -> dict:
    """The realtime message that triggered an htmx fragment request (form field ``message``).

    ``static/js/site.js`` adds it to every request a ``realtime:*`` event
    triggers. Anything malformed reads as an empty message.
    """
    raw = request.form.get("message", "")
    if len(raw) > MAX_MESSAGE_CHARS:
        return {}
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    # jsonsafe: "\ud800" parses but cannot be written into the UTF-8 page; 1e400 would show as inf.
    return message if isinstance(message, dict) and jsonsafe.problem(message) is None else {}
