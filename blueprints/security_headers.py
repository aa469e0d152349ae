"""Security headers on every response; a Content-Security-Policy on every page.

The policy allows scripts, styles and sockets from this site only: no
``'unsafe-inline'`` anywhere (the pages have no inline script or style, and
htmx is told not to inject its indicator styles), no framing by anyone
(clickjacking), no plugins, forms that post only here; pages are not cached
(``no-store``). In production, HSTS.
"""

from __future__ import annotations

from flask import Blueprint, current_app, request

from .socket import upgraded

bp = Blueprint("security_headers", __name__)
# On every answer, pages or not (request_limits adds them to the refusals it writes before Flask).
EVERY_ANSWER = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"))


@bp.after_app_request
def add_security_headers(response):
    if upgraded():
        return response  # never sent
    settings = current_app.extensions["realtime"].settings
    headers = response.headers
    for name, value in EVERY_ANSWER:
        headers.setdefault(name, value)
    if settings.production:
        headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    if response.mimetype == "text/html":
        headers["Content-Security-Policy"] = content_security_policy(settings.public_url, request.host)
        headers["X-Frame-Options"] = "DENY"  # for browsers that predate frame-ancestors
        # Pages show patients' queues and the broadcast log: on a shared clinic workstation, Back
        # after sign-out must not bring them back from the browser's cache.
        headers.setdefault("Cache-Control", "no-store")
    return response


def content_security_policy(public_url: str | None, host: str) -> str:
    # The socket: WS_PUBLIC_URL's origin when set, else this host (ws: and wss:, since 'self'
    # does not cover them in every browser).
    if public_url:
        scheme, _, rest = public_url.partition("://")
        sockets = f"{scheme}://{rest.split('/', 1)[0]}"
    else:
        sockets = f"ws://{host} wss://{host}"
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {sockets}",
            "object-src 'none'",
            "base-uri 'self'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )
