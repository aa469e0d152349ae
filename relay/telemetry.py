"""What happened, counted once and told to both of its readers: Prometheus and the last hour.

The core calls these methods where things happen (the admission, a socket's
close, an ERROR frame, a broadcast, a resume); each updates the Prometheus
metrics (``relay.metrics``) and this worker's minute buckets
(``relay.timeline``). Nothing here waits: the close callback runs on the
event loop.
"""

from __future__ import annotations

from .metrics import Metrics
from .timeline import Timeline, close_label


class Telemetry:
    def __init__(self, metrics: Metrics | None = None, timeline: Timeline | None = None):
        self.metrics = metrics or Metrics()
        self.timeline = timeline or Timeline()

    # The open-connections gauge is not set here: sample() reads it from the hub each second and
    # before a scrape, so a connect costs one counter update rather than two.
    def connected(self) -> None:
        self.metrics.opened.inc()
        self.timeline.connected()

    def disconnected(self, code: int | None, *, slow: bool = False) -> None:
        self.metrics.closed.labels(close_label(code)).inc()
        if slow:
            self.metrics.slow_consumers.inc()
        self.timeline.disconnected(code)

    def refused(self, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()

    def auth_failed(self, reason: str) -> None:
        self.metrics.auth_failures.labels(reason).inc()
        self.timeline.auth_failed(reason)

    def client_error(self, code: str) -> None:
        self.metrics.client_errors.labels(code).inc()
        self.timeline.client_error(code)

    def broadcast(self, source: str, delivered: int, seconds: float) -> None:
        self.metrics.broadcasts.labels(source).inc()
        self.metrics.delivered.inc(delivered)
        self.metrics.broadcast_duration.observe(seconds)
        self.timeline.broadcast(delivered, seconds * 1000)

    def recovery(self, recovered: bool) -> None:
        self.metrics.recoveries.labels("recovered" if recovered else "not_recovered").inc()

    def sample(self, *, connections: int, subscriptions: int, broker_up: bool, identity_up: bool) -> None:
        """The gauges that are read rather than counted (every second, from the service's sampler)."""
        self.metrics.connections.set(connections)
        self.metrics.subscriptions.set(subscriptions)
        self.metrics.broker_up.set(1 if broker_up else 0)
        self.metrics.identity_up.set(1 if identity_up else 0)
