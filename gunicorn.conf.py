"""gunicorn settings, loaded by default: plain ``gunicorn -k gevent wsgi:app`` gets all of this.

Every value comes from the one :class:`relay.config.Settings` object, read
from the environment once, here, the same way the app reads it:

- binds ``WS_HOST:WS_PORT`` (127.0.0.1:3001), ``WEB_CONCURRENCY`` gevent workers;
- checks the environment in the master first (settings, several workers
  without REDIS_URL, an unreachable Redis, a graceful timeout too short for
  the drain, in production a SQLite user store with no users), so a
  bad environment stops with one clear line instead of a worker boot loop; in
  development it creates the instance folder and secrets;
- on SIGTERM/SIGHUP each worker closes its sockets with 1012 (and refuses new
  ones with 1012 while it does) before it stops accepting, instead of letting
  the master kill them with 1006 after the graceful timeout.
"""

import logging
import os
import signal
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from relay.config import ConfigError, Settings, prepare_instance, redacted  # noqa: E402

try:
    _settings = Settings.from_env(os.environ)
except ConfigError as _problem:
    print(f"cannot start: {_problem}", file=sys.stderr, flush=True)
    sys.exit(1)

# prometheus_client picks its storage when first imported: with this set, each worker writes
# its values to files here and any worker answers /metrics for all (relay/metrics.py). It must be
# in the environment before a worker imports the app; the folder is emptied when the master starts.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(_settings.instance_path, "prometheus")
# Made here, not only in on_starting: a --preload master builds the app (and its metrics) before any
# hook runs, and must get as far as refusing --preload with a clear message.
os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

worker_class = "gevent"
workers = _settings.web_concurrency
bind = _settings.address
# Sockets leave gunicorn's pool once upgraded (see relay/connection.py), so this
# bounds concurrent HTTP requests and handshakes, not open WebSockets. Kept high
# so a connect storm of 10,000 browsers is accepted rather than queued.
worker_connections = _settings.worker_connections
backlog = 4096
# The drain (WS_DRAIN_TIMEOUT_MS) and the last closing handshakes (WS_CLOSE_TIMEOUT_MS) must fit.
graceful_timeout = _settings.graceful_timeout_s
timeout = 30
# How long a request's headers (or an upgrade) may take, and how long an idle keep-alive connection
# is kept: gunicorn uses one timer for both (see blueprints/request_limits.py).
keepalive = max(1, min(5, _settings.http_request_timeout_ms // 1000))  # whole seconds (gunicorn takes an int)
max_requests = 0  # every WebSocket counts as a request; a recycle would cut them all
control_socket_disable = True


def on_starting(server):
    """Fail fast in the master, with one clear line, on an environment that cannot work."""
    try:
        for notice in prepare_instance(os.environ):
            print(notice, file=sys.stderr, flush=True)
        if server.cfg.preload_app:
            raise ConfigError(
                "preload_app is not supported: the app must load in each worker after gevent has patched it "
                "(its listener and keep-alive greenlets belong to the worker)."
            )
        if server.cfg.workers > 1 and not _settings.redis_url:
            raise ConfigError(
                f"{server.cfg.workers} workers need REDIS_URL: without a shared broker each worker "
                "would reach only its own clients. Set REDIS_URL (README: Scaling out) or run one worker."
            )
        if server.cfg.graceful_timeout < _settings.shutdown_budget_s:
            raise ConfigError(
                f"graceful_timeout is {server.cfg.graceful_timeout} s, shorter than the "
                f"{_settings.shutdown_budget_s:g} s a stopping worker may need (WS_DRAIN_TIMEOUT_MS + "
                "WS_CLOSE_TIMEOUT_MS): gunicorn would kill workers mid-drain. Raise it or leave the default."
            )
        if _settings.production and _settings.supabase is None:
            from relay.sqlite_directory import users_in

            # A mistyped path would start on a new, empty store (created then, or by a `flask` command run
            # with the same typo): every sign-in and socket refused, /health "ok".
            if users_in(_settings.db_path) == 0:
                raise ConfigError(
                    f"the user store {_settings.db_path} does not exist or has no users: production does not "
                    "start on an empty one. Fix REALTIME_DB (or REALTIME_INSTANCE_PATH), or add the first user "
                    "with `flask users add`."
                )
        if _settings.redis_url:
            _check_redis_apart(_settings.redis_url)
    except ConfigError as problem:
        print(f"cannot start: {problem}", file=sys.stderr, flush=True)
        sys.exit(1)


# Redis is asked from a process of its own: redis-py imports ssl, and every worker forked from a master that
# had imported it warned as gevent patched ssl after the fact (MonkeyPatchWarning, an operator's run).
_CHECK_REDIS = """
import os, sys
from relay.config import ConfigError
from relay.redis_broker import check_reachable
try:
    check_reachable(os.environ["REALTIME_CHECK_REDIS_URL"])
except ConfigError as problem:
    print(problem)
    sys.exit(1)
"""


def _check_redis_apart(url):
    """Redis answers a PING at ``url``, or ConfigError with the reason (the password never shown)."""
    env = {**os.environ, "REALTIME_CHECK_REDIS_URL": url}  # not on the command line, which anyone may read
    checking = f"checking Redis at REDIS_URL={redacted(url)}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHECK_REDIS], cwd=_HERE, env=env, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{checking}: no answer within 30 s") from None
    except OSError as problem:
        raise ConfigError(f"{checking}: {sys.executable} could not be run ({problem})") from None
    if done.returncode != 0:
        # The check's own message (ConfigError's) is its stdout; anything else, the last line of its stderr.
        said = done.stdout.strip() or (done.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise ConfigError(said if done.stdout.strip() else f"{checking} failed: {said}")


def when_ready(server):
    """Bound, no worker yet: the metrics start at zero now. Not in on_starting: a second start in the same
    instance folder, whose port the running server holds, stops at the bind, and had emptied the running
    server's counters first (its /metrics went blank until it restarted). Files of live processes stay."""
    try:
        _fresh_metrics_folder(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    except ConfigError as problem:
        print(f"cannot start: {problem}", file=sys.stderr, flush=True)
        sys.exit(1)


def _fresh_metrics_folder(folder):
    """Counters start at zero with the master: last run's files would be summed in otherwise. Only the files
    of processes that are gone: a master sharing the folder (one re-executed by USR2 beside the old one, or a
    second instance with --reuse-port) must not empty the counters of workers that are serving."""
    from relay.metrics import pid_of, running

    try:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            pid = pid_of(name)
            if name.endswith(".db") and (pid is None or not running(pid)):
                os.remove(os.path.join(folder, name))
    except OSError as problem:
        raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR {folder} cannot be prepared: {problem}") from None


def child_exit(server, worker):
    """A worker is gone: drop its live gauges (open connections), keep its counters (totals do not fall while
    the master runs; a new master, USR2's beside this one included, removes those of workers gone by then)."""
    from relay.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def _warm_up(realtime):
    """Fault in, at boot, the shared library code every connection uses, so the first clients do not.

    OpenSSL's digests (HMAC-SHA256 for the token, SHA-1 for the upgrade's
    Sec-WebSocket-Accept) and the C++ runtime greenlet unwinds through when a
    timed wait expires: ~1.5 MB of code pages, touched once per process. The
    first client used to pay for them, in its latency and in what looked like
    per-connection memory (shared harness, 1,000 clients: 3.8 KB a connection
    before, 2.3-2.5 after; the slope from 5,000 to 10,000 clients, 1.9 KB, is
    the same either way). A token service that cannot verify what it just
    minted fails the worker's boot here, before it refuses every client with 4401.
    """
    import hashlib

    from gevent.event import Event

    if realtime.tokens is not None:
        realtime.tokens.verify(realtime.tokens.mint("warm-up"))
    hashlib.sha1(b"warm-up").digest()
    Event().wait(0.001)


class _AnswerNotTaken(logging.Filter):
    """gunicorn logs an answer its client did not take within ``HTTP_SEND_TIMEOUT_MS`` (the socket
    timeout ``blueprints/request_limits.py`` sets) as "Socket error processing request." with a
    traceback; it is a client's doing, not ours: one ``http.send_timeout`` line instead."""

    def filter(self, record):
        problem = record.exc_info[1] if record.exc_info else None
        if isinstance(problem, TimeoutError) and record.msg == "Socket error processing request.":
            from relay.eventlog import event

            event("http.send_timeout", level="warning", timeoutMs=_settings.http_send_timeout_ms)
            return False
        return True


def post_worker_init(worker):
    """Start the service, and replace the worker's SIGTERM handler with drain-then-stop.

    Runs after gevent has patched the worker and the app is loaded. The
    drain greenlet closes every socket with 1012 and waits for them (bounded
    by WS_DRAIN_TIMEOUT_MS); only then does the worker stop accepting, so a
    browser that reconnects meanwhile is told 1012 at once as well.
    """
    import gc

    import gevent
    from gevent.server import StreamServer

    # One new connection per pass of the event loop (gevent's default: up to 100, which gunicorn
    # lowers to 1 only when there are several workers). An upgrade runs about a millisecond of CPU
    # without pausing; a hundred accepted at once kept /health, a broadcast's POST and its fan-out
    # waiting over 100 ms in a 10,000-client connect storm. One at a time, the rest wait in the
    # kernel's backlog (free), and everything else gets the loop between two upgrades.
    StreamServer.max_accept = 1

    from relay.eventlog import RedactUrls
    from relay.logwriter import stream_for

    logging.getLogger("gunicorn.error").addFilter(_AnswerNotTaken())
    for name in ("gunicorn.error", "gunicorn.access"):
        logging.getLogger(name).addFilter(RedactUrls())  # a socket's URL carries its token
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:  # "-": stderr, or stdout for the access log
                handler.setStream(stream_for(handler.stream))  # never waits for the log's reader
    gevent.get_hub().exception_stream = stream_for(sys.stderr)  # a greenlet's uncaught exception
    realtime = worker.wsgi.extensions["realtime"]
    realtime.start()
    _warm_up(realtime)
    # Everything loaded so far lives as long as the worker: keep it out of the
    # cyclic collector's way (full collections then scan only per-connection objects).
    gc.freeze()
    # And scan those rarely: a full collection considered after 100 collections of the middle
    # generation, not 10. With 10,000 sockets one takes 20-45 ms, and a fan-out set them off by
    # itself: each recipient's queue is a new list, and while the outbox catches up 10,000 of them
    # outlive two young collections and count as long-lived. Measured in the shared harness's
    # 10,000 x 10 case (4 runs each): full collections in the measured fan-out 0-2 (20-45 ms)
    # -> none; fan-out 0.21-0.28 s -> 0.18-0.22 s. Cycles still die young: a connection breaks
    # its own when it closes (Connection._finish), and request garbage rarely lives past two
    # (four rounds of 5,000 clients connecting, receiving and leaving: the worker's RSS after
    # each round 61.6 -> 63.8 MB, the same as with the default thresholds).
    gc.set_threshold(700, 10, 100)
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


def worker_exit(server, worker):
    """Write the log lines this worker still holds (relay/logwriter.py), waiting at most 3 s for the reader."""
    from relay.logwriter import flush_all

    flush_all()
