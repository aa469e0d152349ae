"""Prometheus metrics (``GET /metrics``), correct across gunicorn's workers.

prometheus_client picks its storage when it is first imported: with
``PROMETHEUS_MULTIPROC_DIR`` set, every process writes its values to mmap'd
files in that folder, and a scrape answered by any worker reads them all
(``MultiProcessCollector``), so the totals are the process group's.
``gunicorn.conf.py`` sets the folder (``instance/prometheus/``, wiped when the
master starts) before any worker imports this module, and removes a dead
worker's live gauges in ``child_exit``. Without the variable (``python
wsgi.py``, tests of the core) values live in memory.

In multiprocess mode prometheus_client has no process collector (it would
describe only the answering worker); :class:`GroupProcessCollector` reports
the master and every live worker instead, summed.

Updating a value is a dict lookup and a write to memory (mmap), never a wait:
safe from an event-loop callback.
"""

from __future__ import annotations

import glob
import os
import re
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from .codes import Close, Error

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Label values that exist from the start at 0, so that a dashboard or an alert rule sees the series
# (and a rate over it) before the first event of its kind; other values appear when they happen.
AUTH_FAILURE_REASONS = (  # every TokenError reason, then the user's
    "missing",
    "too_long",
    "not_base64",
    "not_json",
    "not_object",
    "missing_field",
    "bad_field",
    "bad_signature",
    "expired",
    "future",
    "unknown_user",
    "user_disabled",
    "directory_unavailable",
    "disconnected",
    "signed_out",
)
CLOSE_CODES = tuple(sorted({str(v) for k, v in vars(Close).items() if k.isupper()} | {"1001", "1005", "1006"}))
ERROR_CODES = tuple(v for k, v in vars(Error).items() if k.isupper())
REFUSAL_REASONS = ("server_full", "too_many_connections", "draining", "history_unavailable")
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """The service's metrics. Several instances in one process (tests) each get their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "realtime_connections", "Open WebSocket connections", registry=r, multiprocess_mode="livesum"
        )
        self.opened = Counter(
            "realtime_connections_opened", "Sockets admitted (after token and user checks)", registry=r
        )
        self.closed = Counter(
            "realtime_connections_closed", "Admitted sockets closed, by close code", ["code"], registry=r
        )
        self.refused = Counter(
            "realtime_connections_refused",
            "Sockets refused after a valid token: server_full, too_many_connections, draining, history_unavailable",
            ["reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "realtime_auth_failures", "Sockets refused for their token or user, by reason", ["reason"], registry=r
        )
        self.client_errors = Counter(
            "realtime_client_errors", "ERROR frames sent to clients, by code", ["code"], registry=r
        )
        self.subscriptions = Gauge(
            "realtime_subscriptions", "Channel subscriptions held", registry=r, multiprocess_mode="livesum"
        )
        self.broadcasts = Counter("realtime_broadcasts", "Broadcasts published, by source", ["source"], registry=r)
        self.delivered = Counter(
            "realtime_messages_delivered", "Frames handed to connections by the broadcasts published", registry=r
        )
        self.broadcast_duration = Histogram(
            "realtime_broadcast_duration_seconds",
            "Broadcast request to answer (history, broker, every worker's fan-out)",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.slow_consumers = Counter(
            "realtime_slow_consumers", "Sockets closed 1013 for owing more than WS_MAX_QUEUE_BYTES", registry=r
        )
        self.recoveries = Counter(
            "realtime_recoveries", "Resume attempts, by result (recovered, not_recovered)", ["result"], registry=r
        )
        # livemin: the cluster is only "up" if every live worker says so.
        self.broker_up = Gauge(
            "realtime_broker_up", "1 if the broker is reachable", registry=r, multiprocess_mode="livemin"
        )
        self.identity_up = Gauge(
            "realtime_identity_up", "1 if the identity source answers", registry=r, multiprocess_mode="livemin"
        )
        for counter, values in (
            (self.closed, CLOSE_CODES),
            (self.refused, REFUSAL_REASONS),
            (self.auth_failures, AUTH_FAILURE_REASONS),
            (self.client_errors, ERROR_CODES),
            (self.broadcasts, ("api", "admin")),
            (self.recoveries, ("recovered", "not_recovered")),
        ):
            for label in values:
                counter.labels(label)
        if multiprocess_dir() is None:
            ProcessCollector(registry=r)

    def exposition(self) -> bytes:
        """The text format, for the whole process group when in multiprocess mode."""
        folder = multiprocess_dir()
        if folder is None:
            return generate_latest(self.registry)
        scrape = CollectorRegistry()
        MultiProcessCollector(scrape, path=folder)
        GroupProcessCollector(folder, registry=scrape)
        return generate_latest(scrape)


class GroupProcessCollector:
    """``process_*`` for the master and its live workers (found from the metric files' pids), summed."""

    def __init__(self, folder: str, registry: CollectorRegistry):
        self.folder = folder
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        registry.register(self)

    def pids(self) -> list[int]:
        found = {pid for f in glob.glob(os.path.join(self.folder, "*.db")) if (pid := pid_of(f)) is not None}
        found.add(os.getppid())  # the master writes no metrics
        return sorted(pid for pid in found if running(pid))

    def collect(self):
        cpu = rss = vms = fds = 0.0
        started = None
        boot = _boot_time()
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue  # it exited between the listing and the read
            cpu += (float(fields[11]) + float(fields[12])) / self._ticks
            vms += float(fields[20])
            rss += float(fields[21]) * self._page
            start = boot + float(fields[19]) / self._ticks
            started = start if started is None else min(started, start)
        yield CounterMetricFamily("process_cpu_seconds", "CPU seconds of the master and its workers", value=cpu)
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory, master and workers", value=rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory, master and workers", value=vms)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors, master and workers", value=fds)
        if started is not None:
            yield GaugeMetricFamily("process_start_time_seconds", "When the oldest process started", value=started)


_PID = re.compile(r"_(\d+)\.db$")


def pid_of(filename: str) -> int | None:
    """The process a metrics file (``counter_123.db``) belongs to, or None."""
    found = _PID.search(filename)
    return int(found.group(1)) if found else None


def running(pid: int) -> bool:
    """Whether a process of that id runs on this machine now."""
    return os.path.exists(f"/proc/{pid}/stat")


def _boot_time() -> float:
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return time.time()  # pragma: no cover - not Linux


def mark_process_dead(pid: int) -> None:
    """gunicorn's ``child_exit``: drop a dead worker's live gauges (its counters stay: totals never go down)."""
    folder = multiprocess_dir()
    if folder is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)
