"""Per-request duties: request id, load shedding, metrics, one access line, response headers,
and when configured a trace span and a Server-Timing header."""

from __future__ import annotations

import os
import re
import time
from itertools import count
from typing import TYPE_CHECKING

import msgspec
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Message,
    Receive,
    Scope,
    Send,
)

from service.errors import PROBLEM_MEDIA_TYPE, RETRY_AFTER_SECONDS, problem_document
from service.logs import AccessLog
from service.metrics import Metrics
from service.replica import CONSISTENCY_STATE_KEY
from service.timing import CURRENT as CURRENT_STOPWATCH
from service.timing import Stopwatch, server_timing

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from service.tracing import Tracing

REQUEST_ID_HEADER = "x-request-id"
# An incoming id is echoed only if it is short and plain, so it cannot forge log fields.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# New ids: a random per-process prefix and a counter, 32 hex digits like a UUID. Unique across
# processes and pods without a system call per request; an id needs to be unique, not secret.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = count(1)


def request_id_of(scope: Scope) -> str:
    """The request's id: the caller's X-Request-ID when sane, else a new one; kept in the scope."""
    state = scope.setdefault("state", {})
    request_id: str | None = state.get("request_id")
    if request_id is None:
        incoming = ""
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        if VALID_REQUEST_ID.fullmatch(incoming):
            request_id = incoming
        else:
            request_id = f"{_ID_PREFIX}{next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
        state["request_id"] = request_id
    return request_id


class ObserveRequests:
    """The ASGI layer around everything the app serves, routed or not.

    It gives each request its id, adds the headers every response carries, counts and times
    the request for the metrics, and writes its access line. One layer outside Litestar, so
    that a request pays for one `send` wrapper here instead of Litestar's per-route middleware
    stack (with its own exception layer) plus a `before_send` hook.

    Requests to /items beyond `max_in_flight` at once are answered 503 with Retry-After at
    once, without touching the database: past that point more requests in flight only wait
    longer for a pooled connection, and every client's latency grows with the queue. Probes and
    metrics are never shed.

    With `tracing` each request is a server span, its trace id in the access line; with
    `server_timing` the /items answers say how long their statements took, and the whole.
    When both are off, neither costs a request more than a test of None.
    """

    def __init__(
        self,
        app: ASGIApp,
        state: State,
        metrics: Metrics,
        access_log: AccessLog,
        max_in_flight: int,
        tracing: Tracing | None = None,
        server_timing: bool = False,
    ) -> None:
        self.app = app
        self.tracing = tracing
        self.server_timing = server_timing
        self.state = state
        self.metrics = metrics
        self.access_log = access_log
        self.max_in_flight = max_in_flight
        self.overloaded_body = msgspec.json.encode(
            problem_document(
                503,
                f"the service is at capacity ({max_in_flight} requests in progress); retry shortly",
            )
        )
        # The label values of each (method, route, status) seen, made once.
        self.labels: dict[tuple[str, str, int], tuple[str, str, str]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope)
        status = 500  # if the app fails before it answers, uvicorn sends a 500
        tracing = self.tracing
        traced = tracing.start_request(scope) if tracing is not None else None
        stopwatch = None
        if self.server_timing and scope["path"].startswith("/items"):
            stopwatch = Stopwatch()
            timed = CURRENT_STOPWATCH.set(stopwatch)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers")
                if not isinstance(headers, list):
                    headers = message["headers"] = list(headers or ())
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"x-request-id", request_id.encode()))
                # A write's Consistency-Token (service.replica), when a read replica is set up.
                token = scope["state"].get(CONSISTENCY_STATE_KEY)
                if token is not None and status < 400:
                    headers.append((b"consistency-token", token.encode()))
                if stopwatch is not None:
                    elapsed = time.perf_counter() - started
                    headers.append((b"server-timing", server_timing(stopwatch, elapsed)))
                if self.state.draining:
                    # Shutting down: make clients open a new connection, which the load
                    # balancer sends to another pod, instead of reusing this one until it is
                    # closed under them.
                    headers.append((b"connection", b"close"))
            await send(message)

        metrics = self.metrics
        metrics.requests_in_flight += 1
        shed = metrics.requests_in_flight > self.max_in_flight and scope["path"].startswith(
            "/items"
        )
        try:
            if shed:
                await self._refuse(observed_send)
            else:
                await self.app(scope, receive, observed_send)
        finally:
            metrics.requests_in_flight -= 1
            elapsed = time.perf_counter() - started
            method: str = scope["method"]
            # A refused request was never routed: it is counted and logged as route "shed".
            route: str = "shed" if shed else scope.get("path_template") or "unmatched"
            key = (method, route, status)
            labels = self.labels.get(key)
            if labels is None:
                labels = self.labels[key] = (method, route, str(status))
            metrics.requests.observe(elapsed, labels)
            if stopwatch is not None:
                CURRENT_STOPWATCH.reset(timed)
            if tracing is not None and traced is not None:
                trace_id, sampled = tracing.end_request(*traced, method, route, status, request_id)
                self.access_log.record(
                    method, route, status, elapsed, request_id, trace_id, sampled
                )
            else:
                self.access_log.record(method, route, status, elapsed, request_id)

    async def _refuse(self, send: Send) -> None:
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"retry-after", RETRY_AFTER_SECONDS.encode()),
                (b"content-length", str(len(self.overloaded_body)).encode()),
            ],
        }
        body: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": self.overloaded_body,
            "more_body": False,
        }
        await send(start)
        await send(body)
