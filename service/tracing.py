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
per request for its send and receive events. The SQLAlchemy instrumentation listens to the
engine's statement events, and any such listener moves every statement, sampled or not, onto
SQLAlchemy's event path (the service's engines have no listener otherwise): with it, a read not
sampled cost 60 more Python calls than without, and the instrumentation starts a span for
each statement besides, and root spans for the probes' and the background tasks' statements.
Here the request's session (`TracedSession`) makes the statement's span, and only inside a
sampled request. The provider is the app's own, not the process-wide global one, so each app
(and each test) has its own exporter and shuts it down with its lifespan.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from contextvars import ContextVar, Token
from random import getrandbits
from typing import Any, cast

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import INVALID_TRACE_ID, Span, SpanKind, StatusCode
from sqlalchemy import Executable, Result
from sqlalchemy.ext.asyncio import AsyncConnection

from service import __version__, queries
from service.db import LeasedSession

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


class TracedSession(LeasedSession):
    """A leased session whose statements inside a sampled request are spans of their own,
    children of the request's: named by their constant in service.queries, with their SQL
    (placeholders, never the values). Outside one (not sampled, or no request at all: the
    background tasks) a statement costs one look at a context variable."""

    tracer: trace.Tracer  # the app's: `Tracing` makes a subclass of its own that sets it

    async def execute(self, statement: Executable, *args: Any, **kwargs: Any) -> Result[Any]:
        if not IN_SAMPLED_REQUEST.get():
            return await super().execute(statement, *args, **kwargs)
        span = self.tracer.start_span(
            STATEMENT_NAMES.get(id(statement), "statement"),
            kind=SpanKind.CLIENT,
            attributes=self._attributes(statement),
        )
        try:
            return await super().execute(statement, *args, **kwargs)
        except BaseException as error:
            # The error's type only: a database's message may quote the row's values.
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(StatusCode.ERROR, type(error).__qualname__)
            raise
        finally:
            span.end()

    def _attributes(self, statement: Executable) -> dict[str, Any]:
        connection = cast(AsyncConnection, self.bind)  # a leased session's own connection
        url = connection.engine.url
        sql = STATEMENT_SQL.get(id(statement))
        if sql is None:
            sql = str(statement.compile(dialect=connection.dialect))  # type: ignore[attr-defined]
            if id(statement) in STATEMENT_NAMES:  # a constant: lives as long as the process
                STATEMENT_SQL[id(statement)] = sql
        attributes: dict[str, Any] = {"db.system.name": "postgresql", "db.query.text": sql}
        if url.database:
            attributes["db.namespace"] = url.database
        if url.host:
            attributes["server.address"] = url.host
        if url.port:
            attributes["server.port"] = url.port
        return attributes


# Whether the request this task serves is sampled (set by `Tracing.start_request`): one
# context variable, where asking OpenTelemetry's context for the current span is five calls.
IN_SAMPLED_REQUEST: ContextVar[bool] = ContextVar("in_sampled_request", default=False)
# The SQL of each statement of service.queries as sent, compiled on first use.
STATEMENT_SQL: dict[int, str] = {}

# What a sampled request's span changed in the context, for `Tracing.end_request` to undo.
Tokens = tuple[Token[Context], Token[bool]]
# The type of `Tracing.start_request`'s answer: the span and, if it is sampled, its tokens; None
# for a request that is not traced at all.
TracedRequest = tuple[Span, Tokens | None] | None


class Tracing:
    """The tracer of one app, and what it does at each request and each statement."""

    def __init__(self, provider: TracerProvider, ids: PresetTraceIds) -> None:
        self.provider = provider
        self.ids = ids  # the provider's id generator
        self.keeps_new_trace = new_trace_decision(provider.sampler)
        self.tracer = provider.get_tracer("service", __version__)
        # The request sessions of this app's pools: statements as spans, with this tracer.
        self.session_class = type("TracedSession", (TracedSession,), {"tracer": self.tracer})
        self.propagator = propagate.get_global_textmap()
        # The headers the propagators read (traceparent, tracestate, baggage), as ASGI has them.
        self.fields = frozenset(name.encode("latin-1") for name in self.propagator.fields)

    def start_request(self, scope: Any) -> TracedRequest:
        """The request's server span, under the caller's trace context when it sends one.

        A trace of our own is first judged as the sampler would (`new_trace_decision`), and one
        it drops gets no span at all, where the SDK makes a span that records nothing (3 µs).
        One it keeps is started with the very trace id it was judged on, so the sampler's answer
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
            # As RandomIdGenerator draws them (0 is no trace id: once in 2**128).
            trace_id = getrandbits(128) or 1
            if not self.keeps_new_trace(trace_id):
                return None
            self.ids.preset = trace_id
            parent = ROOT
        else:
            parent = self.propagator.extract(carrier)
        span = self.tracer.start_span(method, parent, kind=SpanKind.SERVER)
        if not span.is_recording():  # the caller's trace, which the caller did not sample
            return span, None
        tokens: Tokens = (
            context.attach(trace.set_span_in_context(span, parent)),
            IN_SAMPLED_REQUEST.set(True),
        )
        return span, tokens

    def end_request(
        self,
        span: Span,
        tokens: Tokens | None,
        method: str,
        route: str,
        status: int,
        request_id: str,
    ) -> tuple[str, bool]:
        """End the request's span with what became known while it ran. Returns, for the access
        line, the trace id (32 hex digits) and whether the trace is sampled (a trace of our own
        that is not sampled has no span: nobody could look it up)."""
        if tokens is None:  # a caller's trace the caller did not sample: no span to end
            return format(span.get_span_context().trace_id, "032x"), False
        IN_SAMPLED_REQUEST.reset(tokens[1])
        context.detach(tokens[0])
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


def new_trace_decision(sampler: Sampler) -> Callable[[int], bool]:
    """Whether `sampler` keeps a new trace (one without a parent), by its trace id.

    The parent-based samplers hand such a trace to their root sampler. For the roots the SDK
    ships, the decision is their own rule, taken here without the sampler's 8 calls per request:
    always, never, or (TraceIdRatioBased) the trace id's low 64 bits below its bound. Any
    other sampler is asked.
    """
    root = getattr(sampler, "_root", sampler) if isinstance(sampler, ParentBased) else sampler
    if root is ALWAYS_ON:
        return lambda trace_id: True
    if root is ALWAYS_OFF:
        return lambda trace_id: False
    if isinstance(root, TraceIdRatioBased):
        limit, bound = root.TRACE_ID_LIMIT, root.bound
        return lambda trace_id: trace_id & limit < bound

    def ask(trace_id: int) -> bool:
        judged = root.should_sample(ROOT, trace_id, "request", SpanKind.SERVER)
        return judged.decision is Decision.RECORD_AND_SAMPLE

    return ask


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
