"""Prometheus metrics: HTTP requests by route template and status, in-flight, the pool."""

from __future__ import annotations

from collections.abc import Iterator

from litestar import get
from litestar.datastructures import State
from litestar.response import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.db import SessionPool

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class PoolCollector(Collector):
    """Reads the engine's pool at scrape time, so the numbers are never stale."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sessions: SessionPool | None = self.state.get("sessions")
        if sessions is None:
            return
        size = self.state.settings.db_pool_size
        connections = sessions.connections
        for name, doc, value in (
            ("db_pool_size", "Connections the pool keeps open.", size),
            ("db_pool_checked_out", "Connections in use by requests.", sessions.checked_out),
            ("db_pool_open", "Connections open to the database now.", connections),
            (
                "db_pool_overflow",
                "Connections open beyond the pool size.",
                max(connections - size, 0),
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    """One registry per app, so tests can build many apps in one process."""

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from request to the end of the response, by method, route and status.",
            ("method", "route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Counted by the middleware as a plain int, read only at scrape time.
        self.requests_in_flight = 0
        self.in_flight = Gauge(
            "http_requests_in_flight", "Requests being handled now.", registry=self.registry
        )
        self.in_flight.set_function(lambda: self.requests_in_flight)
        self.pool_wait = Histogram(
            "db_pool_wait_seconds",
            "Time a request waited for a database connection.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(PoolCollector(state))


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def get_metrics(state: State) -> Response[bytes]:
    """The Prometheus text exposition of this process's metrics."""
    return Response(generate_latest(state.metrics.registry), media_type=PROMETHEUS_TEXT)
