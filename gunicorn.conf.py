"""gunicorn settings, loaded by default: plain ``gunicorn -k gevent wsgi:app`` gets all of this.

- binds ``WS_HOST:WS_PORT`` (127.0.0.1:3001);
- one gevent worker unless ``WEB_CONCURRENCY`` says otherwise;
- checks the settings in the master first (and that Redis answers when
  REDIS_URL is set, and that several workers have REDIS_URL), so a bad
  environment stops with one clear line instead of a worker boot loop;
- on SIGTERM/SIGHUP each worker closes its sockets with 1012 (and refuses new
  ones with 1012 while it does) before it stops accepting, instead of letting
  the master kill them with 1006 after the graceful timeout.
"""

import os
import signal
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
bind = f"{os.environ.get('WS_HOST', '127.0.0.1')}:{os.environ.get('WS_PORT', '3001')}"
# Sockets leave gunicorn's pool once upgraded (see relay/connection.py), so this
# bounds concurrent HTTP requests and handshakes, not open WebSockets. Kept high
# so a connect storm of 10,000 browsers is accepted rather than queued.
worker_connections = int(os.environ.get("WS_WORKER_CONNECTIONS", "12000"))
backlog = 4096
graceful_timeout = 15  # must exceed WS_DRAIN_TIMEOUT_MS (5 s) + WS_CLOSE_TIMEOUT_MS (2 s)
timeout = 30
keepalive = 5
max_requests = 0  # every WebSocket counts as a request; a recycle would cut them all
control_socket_disable = True


def on_starting(server):
    """Fail fast in the master, with one clear line, on an environment that cannot work:
    bad settings, several workers without a shared broker, or an unreachable Redis."""
    from relay.config import ConfigError, Settings

    try:
        instance = os.environ.get("REALTIME_INSTANCE_PATH") or os.path.join(_HERE, "instance")
        settings = Settings.from_env(os.environ, instance)
        if server.cfg.preload_app:
            raise ConfigError(
                "preload_app is not supported: the app must load in each worker after gevent has patched it "
                "(its listener and keep-alive greenlets belong to the worker)."
            )
        if server.cfg.workers > 1 and not settings.redis_url:
            raise ConfigError(
                f"{server.cfg.workers} workers need REDIS_URL: without a shared broker each worker "
                "would reach only its own clients. Set REDIS_URL (README: Scaling out) or run one worker."
            )
        if settings.redis_url:
            from relay.redis_broker import check_reachable

            check_reachable(settings.redis_url)
    except ConfigError as problem:
        print(f"cannot start: {problem}", file=sys.stderr, flush=True)
        sys.exit(1)


def post_worker_init(worker):
    """Replace the worker's SIGTERM handler with drain-then-stop.

    Runs after gevent has patched the worker and the app is loaded. The
    drain greenlet closes every socket with 1012 and waits for them (bounded
    by WS_DRAIN_TIMEOUT_MS); only then does the worker stop accepting, so a
    browser that reconnects meanwhile is told 1012 at once as well.
    """
    import gc

    import gevent

    realtime = worker.wsgi.extensions["realtime"]
    realtime.hub.start()
    # Everything loaded so far lives as long as the worker: keep it out of the
    # cyclic collector's way (full collections then scan only per-connection objects).
    gc.freeze()
    state = {"draining": False}

    def drain_then_stop():
        try:
            realtime.drain()
        finally:
            worker.alive = False

    def on_term(signum, frame):
        if not state["draining"]:
            state["draining"] = True
            gevent.spawn(drain_then_stop)

    signal.signal(signal.SIGTERM, on_term)
