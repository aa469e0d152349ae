"""Site pages for signed-in people, and what fragment views share."""

from __future__ import annotations

import json

from flask import Blueprint, render_template, request

from relay import jsonsafe

from .auth import login_required, signed_in

bp = Blueprint("pages", __name__)
MAX_MESSAGE_CHARS = 64 * 1024


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
