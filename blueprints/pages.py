"""Site pages for signed-in people."""

from __future__ import annotations

from flask import Blueprint, render_template

from .auth import current_user, login_required

bp = Blueprint("pages", __name__)


@bp.get("/")
@login_required
def home():
    return render_template("home.html", user=current_user())
