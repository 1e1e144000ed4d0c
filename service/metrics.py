"""Prometheus metrics: HTTP requests by route template and status, in-flight, admission, the
pools, the read replica, whether the database answers, idempotent replays."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from litestar import get
from litestar.datastructures import State
from litestar.response import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.admission import MIN_QUEUE_PER_CONNECTION, Admission
from service.db import SessionPool
from service.health import Readiness
from service.replica import Replica

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The queue delay admission follows: finer around its target (ADMISSION_TARGET_MS, 10 ms).
QUEUE_DELAY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class PoolCollector(Collector):
    """Reads the session pool at scrape time, so the numbers are never stale."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        sessions: SessionPool | None = self.state.get("sessions")
        if sessions is None:
            return
        size = self.state.settings.db_pool_size
        connections = sessions.connections
        for name, doc, value in (
            ("db_pool_size", "Connections the pool keeps open.", size),
            (
                "db_pool_max",
                "Most connections in use at once: DB_POOL_SIZE + DB_MAX_OVERFLOW.",
                size + self.state.settings.db_max_overflow,
            ),
            ("db_pool_checked_out", "Connections in use by requests.", sessions.checked_out),
            ("db_pool_checked_in", "Open connections waiting for a request.", sessions.checked_in),
            ("db_pool_waiting", "Requests waiting for a connection.", sessions.waiting),
            (
                "db_pool_overflow",
                "Connections open beyond the pool size.",
                max(connections - size, 0),
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ReplicaCollector(Collector):
    """Reads by target and the replica's lag and health, when a read replica is configured."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        replica: Replica | None = self.state.get("replica")
        if replica is None:
            return
        reads = CounterMetricFamily(
            "db_reads",
            "Reads by where they were served: replica; primary (the replica had not replayed "
            "the Consistency-Token in time); fallback (the replica was down, lagging or failed, or "
            "every replica connection stayed busy for READ_CONSISTENCY_WAIT_MS).",
            labels=("target",),
        )
        for target, count in replica.reads.items():
            reads.add_metric([target], count)
        yield reads
        yield GaugeMetricFamily(
            "db_replica_lag_seconds",
            "Age of the oldest primary WAL position the replica has not replayed (last check).",
            value=replica.lag_seconds,
        )
        yield GaugeMetricFamily(
            "db_replica_max_lag_seconds",
            "READ_MAX_LAG_MS in seconds: past this lag, reads go to the primary.",
            value=replica.max_lag_seconds,
        )
        yield GaugeMetricFamily(
            "db_replica_healthy",
            "1 while reads go to the replica, 0 while it is left aside.",
            value=int(replica.healthy),
        )
        yield GaugeMetricFamily(
            "db_read_pool_checked_out",
            "Replica connections in use by requests.",
            value=replica.sessions.checked_out,
        )


class DatabaseCollector(Collector):
    """Whether the database answered the readiness check (`SELECT 1` within 1 s) that the scrape
    asked for, so an alert can tell "unreachable" from "slow" or "failing requests"."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        readiness: Readiness | None = self.state.get("readiness")
        if readiness is None:
            return
        yield GaugeMetricFamily(
            "db_up",
            "1 if the database answered SELECT 1 within 1 s at this scrape (or 0.25 s before).",
            value=int(readiness.answer),
        )


class AdmissionCollector(Collector):
    """Admission's state and refusals (service.admission), read at scrape time."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        admission: Admission | None = self.state.get("admission")
        if admission is None:
            return
        admission.settle()  # a scrape after the load has gone sees it gone
        sessions: SessionPool | None = self.state.get("sessions")
        refusals = CounterMetricFamily(
            "admission_refusals",
            "Requests to /items refused with 503 before any work, by reason: queue_delay (the "
            "queue for a connection stood above ADMISSION_TARGET_MS), in_flight_limit "
            "(MAX_IN_FLIGHT admitted requests were in progress).",
            labels=("reason",),
        )
        for reason, count in admission.refusals.items():
            refusals.add_metric([reason], count)
        yield refusals
        yield CounterMetricFamily(
            "admission_sheds",
            "Times the queue delay stood above the target for an interval and shedding began.",
            value=admission.sheds,
        )
        for name, doc, value in (
            (
                "admission_shedding",
                "1 while a standing queue is cut back to the target (ADMISSION_TARGET_MS), else 0.",
                int(admission.shedding),
            ),
            (
                "admission_queue_delay_seconds",
                "How long the oldest request waiting for a connection has waited, now.",
                sessions.queue_delay() if sessions is not None else 0.0,
            ),
            (
                "admission_queue_limit",
                "Waiters the pool serves within the target now, and at least "
                f"{MIN_QUEUE_PER_CONNECTION} per connection: while shedding, a request finding "
                "this many waiting is refused.",
                admission.queue_limit,
            ),
            (
                "admission_target_seconds",
                "The queue delay a standing queue is kept to (ADMISSION_TARGET_MS).",
                admission.target,
            ),
            (
                "admission_in_flight",
                "Admitted requests to /items in progress (MAX_IN_FLIGHT bounds it).",
                admission.in_flight,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class LoopHistogram(Collector):
    """A Prometheus histogram (with its count and sum) that only the event loop touches.

    prometheus_client takes a lock on every observation, for threads this service does not
    have: its requests and its scrapes (a synchronous handler run on the loop) share one
    thread. Plain numbers per label set, turned into metric families at scrape time, cost a
    fraction of that on every request.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        counter: tuple[str, str] | None = None,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.name = name
        self.buckets = buckets
        self.documentation = documentation
        self.labelnames = labelnames
        self.counter = counter  # (name, documentation) of a counter of the same observations
        self.series: dict[tuple[str, ...], list[Any]] = {}  # labels -> [count, sum, buckets]

    def observe(self, seconds: float, labels: tuple[str, ...] = ()) -> None:
        """Count one observation of `seconds` under these label values."""
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0, 0.0, [0] * (len(self.buckets) + 1)]
        series[0] += 1
        series[1] += seconds
        series[2][bisect_left(self.buckets, seconds)] += 1

    def collect(self) -> Iterator[Metric]:
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        counter = None
        if self.counter is not None:
            counter = CounterMetricFamily(*self.counter, labels=self.labelnames)
        bounds = [*map(str, self.buckets), "+Inf"]
        for labels, (count, total, buckets) in list(self.series.items()):
            cumulative = list(zip(bounds, accumulate(buckets), strict=True))
            histogram.add_metric(list(labels), cumulative, sum_value=total)
            if counter is not None:
                counter.add_metric(list(labels), count)
        if counter is not None:
            yield counter
        yield histogram


class Metrics:
    """One registry per app, so tests can build many apps in one process."""

    def __init__(self, state: State) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Observed once per request by service.middleware, with labels (method, route, status).
        self.requests = LoopHistogram(
            "http_request_duration_seconds",
            "Time from request to the end of the response, by method, route and status.",
            ("method", "route", "status"),
            counter=(
                "http_requests",
                "HTTP requests answered, by method, route template and status.",
            ),
        )
        self.registry.register(self.requests)
        # Counted by the middleware as a plain int, read only at scrape time.
        self.requests_in_flight = 0
        self.in_flight = Gauge(
            "http_requests_in_flight", "Requests being handled now.", registry=self.registry
        )
        self.in_flight.set_function(lambda: self.requests_in_flight)
        # The queue delay admission follows (fed through service.admission for the primary).
        self.pool_wait = LoopHistogram(
            "db_pool_wait_seconds",
            "Time a request waited for a database connection (or until it gave up).",
            buckets=QUEUE_DELAY_BUCKETS,
        )
        self.registry.register(self.pool_wait)
        self.registry.register(AdmissionCollector(state))
        self.registry.register(PoolCollector(state))
        self.registry.register(ReplicaCollector(state))
        self.registry.register(DatabaseCollector(state))
        # Counted by service.idempotency; a retry is rare, so the client's lock costs nothing.
        self.idempotent_replays = Counter(
            "idempotent_replays",
            "Keyed writes answered with the answer stored under their Idempotency-Key.",
            registry=self.registry,
        )


@get("/metrics", include_in_schema=False)
async def get_metrics(state: State) -> Response[bytes]:
    """The Prometheus text exposition of this process's metrics.

    Each scrape first asks the readiness check whether the database answers (shared with
    /readyz, so at most four `SELECT 1` a second), for `db_up`.
    """
    readiness: Readiness | None = state.get("readiness")
    if readiness is not None:
        await readiness.database_answers()
    return Response(generate_latest(state.metrics.registry), media_type=PROMETHEUS_TEXT)
