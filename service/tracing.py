"""OpenTelemetry tracing: a span per request, a child span per statement, exported over OTLP/HTTP.

Imported only when the environment configures an exporter (`config.tracing_configured`), so a
service that does not trace never loads the SDK (about 45 ms of start-up). The SDK reads its
own settings from the environment: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, the sampler
(OTEL_TRACES_SAMPLER and _ARG; the default, parentbased_always_on, keeps every trace and
follows the sampled flag of a caller's `traceparent`), the exporter (OTEL_EXPORTER_OTLP_*:
endpoint, headers, timeout, compression), the batch processor (OTEL_BSP_*) and the propagators
(OTEL_PROPAGATORS, W3C trace context and baggage by default).

Spans are made here, not by the ASGI and SQLAlchemy instrumentations: `ObserveRequests`
already knows each request's route, status and id, and the ASGI instrumentation adds two spans
per request for its send and receive events; the SQLAlchemy instrumentation starts a span (and
reads the engine's URL again) for every statement, sampled or not, at about 10 µs each, where
this module checks that the request is sampled first (0.2 µs), and it opens root spans for the
probes' and background tasks' statements. The provider is the app's own, not the process-wide
global one, so each app (and each test) has its own exporter and shuts it down with its lifespan.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import INVALID_TRACE_ID, Span, SpanKind, StatusCode
from sqlalchemy import Executable, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine

from service import __version__, queries

DEFAULT_SERVICE_NAME = "playing-with-neon-service"
# A request without a caller's trace context starts a trace of its own, whatever context the
# server's task happens to run in.
ROOT = Context()
# The statement names spans are given: the constant's name in service.queries, by identity.
STATEMENT_NAMES = {
    id(value): name for name, value in vars(queries).items() if isinstance(value, Executable)
}


class PresetTraceIds(RandomIdGenerator):
    """The SDK's random ids, except that the next trace id can be drawn beforehand."""

    def __init__(self) -> None:
        self.preset = INVALID_TRACE_ID

    def generate_trace_id(self) -> int:
        trace_id, self.preset = self.preset, INVALID_TRACE_ID
        return trace_id or super().generate_trace_id()


# The type of `Tracing.start_request`'s answer: the span, the context token, whether the trace
# is the caller's; None for a request that is not traced at all.
TracedRequest = tuple[Span, object | None, bool] | None


class Tracing:
    """The tracer of one app, and what it does at each request and each statement."""

    def __init__(self, provider: TracerProvider, ids: PresetTraceIds) -> None:
        self.provider = provider
        self.ids = ids  # the provider's id generator
        self.sampler = provider.sampler
        self.tracer = provider.get_tracer("service", __version__)
        self.propagator = propagate.get_global_textmap()
        # The headers the propagators read (traceparent, tracestate, baggage), as ASGI has them.
        self.fields = frozenset(name.encode("latin-1") for name in self.propagator.fields)

    def start_request(self, scope: Any) -> TracedRequest:
        """The request's server span, under the caller's trace context when it sends one.

        A trace of our own is first put to the sampler, and one it drops gets no span at all:
        1 µs per request instead of the SDK's 3 µs for a span that records nothing. One it
        keeps is started with the very trace id it was judged on, so the sampler's answer
        inside the SDK is the same (every sampler the SDK ships decides by the trace id and the
        parent alone). A sampled span is made current, the parent of the request's statements.
        """
        carrier: dict[str, str] | None = None
        for name, value in scope.get("headers", ()):
            if name in self.fields:
                if carrier is None:
                    carrier = {}
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        method: str = scope["method"]
        if carrier is None:
            trace_id = self.ids.generate_trace_id()
            judged = self.sampler.should_sample(ROOT, trace_id, method, SpanKind.SERVER)
            if judged.decision is not Decision.RECORD_AND_SAMPLE:
                return None
            self.ids.preset = trace_id
            parent = ROOT
        else:
            parent = self.propagator.extract(carrier)
        span = self.tracer.start_span(method, parent, kind=SpanKind.SERVER)
        if not span.is_recording():  # the caller's trace, which the caller did not sample
            return span, None, carrier is not None
        return span, context.attach(trace.set_span_in_context(span, parent)), carrier is not None

    def end_request(
        self,
        span: Span,
        token: object | None,
        from_caller: bool,
        method: str,
        route: str,
        status: int,
        request_id: str,
    ) -> tuple[str, bool]:
        """End the request's span with what became known while it ran. Returns, for the access
        line, the trace id (32 hex digits) and whether the trace is sampled (a trace of our own
        that is not sampled has no span: nobody could look it up)."""
        if not span.is_recording():
            if not from_caller:
                return "", False
            return format(span.get_span_context().trace_id, "032x"), False
        context.detach(token)  # type: ignore[arg-type]
        span.update_name(f"{method} {route}")
        span.set_attributes(
            {
                "http.request.method": method,
                "http.route": route,
                "http.response.status_code": status,
                "request.id": request_id,
            }
        )
        if status >= 500:
            span.set_status(StatusCode.ERROR)
        span.end()
        span_context = span.get_span_context()
        return format(span_context.trace_id, "032x"), span_context.trace_flags.sampled

    def instrument(self, engine: AsyncEngine) -> None:
        """Give every statement `engine` runs inside a sampled request a child span with its
        SQL (placeholders, never the values); outside one (not sampled, or no request at all:
        the probes, the background tasks) a statement costs one look at the current span."""
        tracer = self.tracer
        url = engine.url
        attributes: dict[str, Any] = {"db.system.name": "postgresql"}
        if url.database:
            attributes["db.namespace"] = url.database
        if url.host:
            attributes["server.address"] = url.host
        if url.port:
            attributes["server.port"] = url.port

        def before(
            conn: Any, cursor: Any, statement: str, params: Any, execution: Any, many: bool
        ) -> tuple[str, Any]:
            if not trace.get_current_span().is_recording():
                return statement, params
            name = (
                STATEMENT_NAMES.get(id(execution.invoked_statement)) or statement.split(" ", 1)[0]
            )
            execution.trace_span = tracer.start_span(
                name, kind=SpanKind.CLIENT, attributes={**attributes, "db.query.text": statement}
            )
            return statement, params

        def after(
            conn: Any, cursor: Any, statement: str, params: Any, execution: Any, many: bool
        ) -> None:
            span = execution.__dict__.pop("trace_span", None)
            if span is not None:
                span.end()

        def failed(error: ExceptionContext) -> None:
            execution = error.execution_context
            span = execution.__dict__.pop("trace_span", None) if execution is not None else None
            if span is not None:
                span.record_exception(error.original_exception)
                span.set_status(StatusCode.ERROR, type(error.original_exception).__name__)
                span.end()

        # retval: the hook hands the statement on itself, without SQLAlchemy's wrapper call.
        event.listen(engine.sync_engine, "before_cursor_execute", before, retval=True)
        event.listen(engine.sync_engine, "after_cursor_execute", after)
        event.listen(engine.sync_engine, "handle_error", failed)

    def describe(self) -> str:
        """Where spans go and how they are sampled, for the start-up log line."""
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or (
            os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318").rstrip("/")
            + "/v1/traces"
        )
        return f"spans to {endpoint}, sampler {self.provider.sampler.get_description()}"

    async def close(self) -> None:
        """Send the spans still queued and stop the exporter (off the event loop: it blocks
        for as long as the collector takes to answer, OTEL_EXPORTER_OTLP_TIMEOUT at most)."""
        await asyncio.to_thread(self.provider.shutdown)


def start_tracing() -> Tracing:
    """Tracing as the environment configures it: the SDK's resource, sampler and batch
    processor, and an OTLP/HTTP exporter."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        # OTEL_SERVICE_NAME (or service.name in OTEL_RESOURCE_ATTRIBUTES) was not given.
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    if SERVICE_VERSION not in resource.attributes:
        resource = resource.merge(Resource({SERVICE_VERSION: __version__}))
    ids = PresetTraceIds()
    provider = TracerProvider(resource=resource, id_generator=ids)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider, ids)
