"""Tracing: spans reach a real OTLP/HTTP receiver, under the caller's trace, one per request and
one per statement; with tracing off nothing is traced or even imported."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service import queries
from service.app import create_app
from service.config import Settings
from service.db import LeasedSession
from service.tracing import new_trace_decision
from tests.conftest import (
    AUTH,
    PROJECT_ROOT,
    concurrent_client,
    row_locked,
    run_service,
    service_environment,
)
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

SERVER, CLIENT = 2, 3  # span kinds in OTLP
ERROR = 2  # status code
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
# What tracing loads: the SDK, the exporter and its protobuf messages, the tracing API.
TRACING_MODULES = (
    "service.tracing",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.proto",
    "opentelemetry.trace",
    "google.protobuf",
)


def traceparent(sampled: bool = True) -> dict[str, str]:
    return {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-{'01' if sampled else '00'}"}


def sql_of(statement: Any) -> str:
    """A statement's text as asyncpg receives it ($1 placeholders)."""
    return str(statement.compile(dialect=postgresql.asyncpg.dialect()))


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture
def traced_settings(
    settings: Settings, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The test settings with tracing on, the SDK configured as an operator would: OTEL_*."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "items-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return dataclasses.replace(settings, tracing=True)


def statement_hooks(engine: AsyncEngine) -> int:
    """Listeners on the engine's statement events: any one of them moves every statement onto
    SQLAlchemy's slower event path, sampled or not."""
    dispatch = engine.sync_engine.dispatch
    return sum(
        len(getattr(dispatch, name))
        for name in (
            "before_execute",
            "after_execute",
            "before_cursor_execute",
            "after_cursor_execute",
        )
    )


def server_span(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan:
    (span,) = [s for s in spans if s.kind == SERVER and s.attributes["request.id"] == request_id]
    return span


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


async def test_a_request_is_a_span_under_the_callers_trace_with_its_statement_as_child(
    traced_settings: Settings, notebook_rows: None, receiver: OtlpReceiver
) -> None:
    app = create_app(traced_settings)
    async with AsyncTestClient(app=app) as client:
        headers = {**traceparent(), "X-Request-ID": "req-traced"}
        assert (await client.get("/items/5", headers=headers)).status_code == 200
        assert not statement_hooks(app.state.engine)  # the session makes the spans
    # The lifespan's end flushed the exporter: everything sent is here.
    spans = receiver.wait_for(lambda spans: len(spans) >= 2)
    request = server_span(spans, "req-traced")
    assert (request.trace_id, request.parent_span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert request.name == "GET /items/{item_id}"
    assert request.attributes == {
        "http.request.method": "GET",
        "http.route": "/items/{item_id}",
        "http.response.status_code": 200,
        "request.id": "req-traced",
    }
    assert request.resource["service.name"] == "items-under-test"
    (statement,) = children(spans, request)
    assert statement.kind == CLIENT and statement.trace_id == CALLER_TRACE
    assert statement.name == "SELECT_ITEM"
    assert statement.attributes["db.query.text"] == sql_of(queries.SELECT_ITEM)
    assert statement.attributes["db.system.name"] == "postgresql"
    assert statement.attributes["db.namespace"] == traced_settings.database_url.database  # type: ignore[union-attr]
    assert request.start_ns <= statement.start_ns <= statement.end_ns <= request.end_ns
    # Nothing else: the lifespan's own statements (the idempotency expiry) made no root spans.
    assert len(spans) == 2


async def test_each_request_gets_one_child_span_per_statement_it_ran(
    traced_settings: Settings, notebook_rows: None, receiver: OtlpReceiver
) -> None:
    requests = [
        ("GET", "/items?limit=2", None, queries.SELECT_ITEMS),
        ("GET", "/items?min_value=1&limit=2", None, queries.SELECT_ITEMS_ABOVE_VALUE),
        ("PATCH", "/items", [{"id": 5, "value": 1.5}], queries.UPDATE_ITEM_VALUES),
        ("POST", "/items", [{"name": "traced", "value": 2.5}], queries.INSERT_ITEMS),
        ("DELETE", "/items/6", None, queries.DELETE_ITEM),
    ]
    async with AsyncTestClient(app=create_app(traced_settings)) as client:
        for number, (method, path, body, _) in enumerate(requests):
            headers = {**AUTH, "X-Request-ID": f"req-{number}"}
            response = await client.request(method, path, json=body, headers=headers)
            assert response.status_code < 300, response.text
        assert (await client.get("/items/999", headers={"X-Request-ID": "req-404"})).status_code
    spans = receiver.wait_for(lambda spans: len(spans) >= 2 * len(requests) + 2)
    for number, (method, _, _, statement) in enumerate(requests):
        request = server_span(spans, f"req-{number}")
        assert request.name.startswith(f"{method} /items")
        (child,) = children(spans, request)
        assert child.attributes["db.query.text"] == sql_of(statement)
        assert child.trace_id == request.trace_id != CALLER_TRACE  # a trace of its own
    missing = server_span(spans, "req-404")
    assert missing.attributes["http.response.status_code"] == 404
    assert missing.status_code != ERROR  # a client's mistake is not the server's error
    assert len(spans) == 2 * len(requests) + 2


async def test_the_callers_sampling_decision_is_followed(
    traced_settings: Settings,
    notebook_rows: None,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Sample no trace of our own: only a caller's sampled one is recorded.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    async with AsyncTestClient(app=create_app(traced_settings)) as client:
        await client.get("/items/5", headers={"X-Request-ID": "req-own"})
        await client.get("/items/5", headers={**traceparent(False), "X-Request-ID": "req-no"})
        await client.get("/items/5", headers={**traceparent(True), "X-Request-ID": "req-yes"})
    spans = receiver.wait_for(lambda spans: len(spans) >= 2)
    assert {s.trace_id for s in spans} == {CALLER_TRACE}
    assert server_span(spans, "req-yes").parent_span_id == CALLER_SPAN
    assert len(spans) == 2  # flushed at shutdown: the other two requests sent nothing


async def test_the_configured_share_of_the_services_own_traces_is_kept(
    traced_settings: Settings,
    notebook_rows: None,
    receiver: OtlpReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The sampler judges a new trace before any span is made (service.tracing): a kept one
    # must be kept by the SDK too, with its statement, so that the share kept is the ratio.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    requests = 400
    async with AsyncTestClient(app=create_app(traced_settings)) as client:
        for number in range(requests):
            await client.get("/items/5", headers={"X-Request-ID": f"req-{number}"})
    spans = receiver.wait_for(lambda spans: bool(spans))
    kept = [s for s in spans if s.kind == SERVER]
    # Binomial(400, 0.5): 200 +- 10; asking twice would keep a quarter, never asking all.
    assert 140 <= len(kept) <= 260
    for request in kept:
        (statement,) = children(spans, request)
        assert statement.name == "SELECT_ITEM"
    assert len(spans) == 2 * len(kept)


class EveryThirdTrace(Sampler):
    """A sampler the SDK does not ship: it must be asked."""

    def should_sample(self, parent_context: Any, trace_id: int, *args: Any, **kwargs: Any) -> Any:
        kept = trace_id % 3 == 0
        return SamplingResult(Decision.RECORD_AND_SAMPLE if kept else Decision.DROP)

    def get_description(self) -> str:
        return "EveryThirdTrace"


@pytest.mark.parametrize(
    "sampler",
    [
        ALWAYS_ON,
        ALWAYS_OFF,
        TraceIdRatioBased(0.7),
        ParentBased(TraceIdRatioBased(0.3)),
        ParentBased(ALWAYS_OFF),
        ParentBased(EveryThirdTrace()),
    ],
    ids=lambda sampler: sampler.get_description().split("{remote")[0],
)
def test_a_new_trace_is_kept_exactly_when_the_sampler_would_keep_it(sampler: Sampler) -> None:
    decide = new_trace_decision(sampler)
    rng = random.Random(7)
    for trace_id in [rng.getrandbits(128) for _ in range(3000)] + [1, 2**64 - 1, 2**128 - 1]:
        judged = sampler.should_sample(None, trace_id, "GET")
        assert decide(trace_id) is (judged.decision is Decision.RECORD_AND_SAMPLE), trace_id


async def test_a_statement_cut_by_its_timeout_is_an_error_span_under_a_5xx_request(
    traced_settings: Settings, notebook_rows: None, receiver: OtlpReceiver, engine: AsyncEngine
) -> None:
    settings = dataclasses.replace(traced_settings, db_statement_timeout_ms=300)
    async with concurrent_client(settings) as http:
        async with row_locked(engine, 5):  # the UPDATE waits for the lock past its timeout
            headers = {**AUTH, "X-Request-ID": "req-cut"}
            response = await http.patch("/items", json=[{"id": 5, "value": 7}], headers=headers)
        assert response.status_code == 503
    spans = receiver.wait_for(lambda spans: len(spans) >= 2)
    request = server_span(spans, "req-cut")
    assert request.status_code == ERROR
    assert request.attributes["http.response.status_code"] == 503
    (statement,) = children(spans, request)
    assert statement.name == "UPDATE_ITEM_VALUES" and statement.status_code == ERROR
    assert 0.3 <= (statement.end_ns - statement.start_ns) / 1e9 < 1.0


@pytest.mark.slow
def test_the_served_process_traces_as_the_environment_says_and_logs_the_trace_id(
    database_url: URL, notebook_rows: None, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    env = service_environment(
        database_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="50",
        # Keep only the traces callers sample.
        OTEL_TRACES_SAMPLER="parentbased_always_off",
    )
    unsampled_trace = "1" * 32
    with run_service(env, tmp_path) as service, httpx.Client(base_url=service.base_url) as http:
        headers = {**traceparent(), "X-Request-ID": "req-caller"}
        assert http.get("/items/6", headers=headers).status_code == 200
        unsampled = {"traceparent": f"00-{unsampled_trace}-{CALLER_SPAN}-00"}
        assert http.get("/items/6", headers={**unsampled, "X-Request-ID": "req-unsampled"})
        assert http.get("/items/6", headers={"X-Request-ID": "req-own"}).status_code == 200
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0  # the exporter is flushed before exit
    spans = receiver.wait_for(lambda spans: len(spans) >= 2)
    assert {span.trace_id for span in spans} == {CALLER_TRACE} and len(spans) == 2
    caller = server_span(spans, "req-caller")
    assert caller.parent_span_id == CALLER_SPAN
    assert caller.resource["service.name"] == "playing-with-neon-service"
    lines = {
        line["request_id"]: line
        for line in map(json.loads, filter(None, service.log().splitlines()))
        if line.get("logger") == "service.access" and line["request_id"].startswith("req-")
    }
    assert (lines["req-caller"]["trace_id"], lines["req-caller"]["trace_sampled"]) == (
        CALLER_TRACE,
        True,
    )
    # A caller's trace is named even when not sampled: the caller's own logs share the id.
    assert (lines["req-unsampled"]["trace_id"], lines["req-unsampled"]["trace_sampled"]) == (
        unsampled_trace,
        False,
    )
    assert "trace_id" not in lines["req-own"]  # a trace nobody kept or was told of
    assert f"tracing: spans to {receiver.endpoint}/v1/traces" in service.log()


@pytest.mark.slow
def test_with_the_sdk_disabled_nothing_is_traced_or_logged_as_traced(
    database_url: URL, notebook_rows: None, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    env = service_environment(
        database_url, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SDK_DISABLED="true"
    )
    with run_service(env, tmp_path) as service, httpx.Client(base_url=service.base_url) as http:
        assert http.get("/items/6", headers=traceparent()).status_code == 200
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0
    access = [line for line in service.log().splitlines() if '"service.access"' in line]
    assert access and not any("trace_id" in line for line in access)
    assert receiver.exports == 0 and "tracing:" not in service.log()


async def test_with_tracing_off_no_hook_runs_per_request_or_statement(
    settings: Settings, notebook_rows: None
) -> None:
    app = create_app(settings)
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/items/5")).status_code == 200
        assert app.state.sessions.session_class is LeasedSession
        assert not statement_hooks(app.state.engine)
    assert app.observed.tracing is None and not app.observed.server_timing  # type: ignore[attr-defined]


def test_with_tracing_off_the_sdk_is_never_imported(database_url: URL) -> None:
    # (Litestar itself looks for its OpenTelemetry plugin when an app is built, and finds the
    # API's namespace and semantic conventions: 1 ms, no tracer.)
    script = (
        "import sys\n"
        "from service.app import create_app\n"
        "from service.config import load_settings\n"
        "app = create_app(load_settings(env_file=None))\n"
        "print(sorted(name for name in sys.modules if name.startswith(SDK)))\n"
    ).replace("SDK", repr(TRACING_MODULES))
    env = service_environment(database_url)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]"
