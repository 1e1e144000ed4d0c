"""Per-request duties: request id, admission, metrics, one access line, response headers,
and when configured a trace span and a Server-Timing header."""

from __future__ import annotations

import asyncio
import os
import re
import time
from itertools import count
from typing import TYPE_CHECKING

from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    Message,
    Receive,
    Scope,
    Send,
)

from service.admission import Admission, Refusal
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

    Requests to /items are taken on or refused by `admission` (service.admission) before
    anything else is done with them: a refusal is a 503 with Retry-After, encoded once, sent about
    `admission.refusal_delay` seconds later without routing the request or reading its body.
    Probes and metrics are never refused.

    With `tracing` each request is a server span, its trace id in the access line; with
    `server_timing` the /items answers say how long their statements took, and the whole.
    When both are off, they cost a request a few tests of None.
    """

    def __init__(
        self,
        app: ASGIApp,
        state: State,
        metrics: Metrics,
        access_log: AccessLog,
        admission: Admission,
        tracing: Tracing | None = None,
        server_timing: bool = False,
    ) -> None:
        self.app = app
        self.tracing = tracing
        self.server_timing = server_timing
        self.state = state
        self.metrics = metrics
        self.access_log = access_log
        self.admission = admission
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
        admission = self.admission
        refusal: Refusal | None = None
        admitted = scope["path"].startswith("/items")
        if admitted:
            refusal = admission.admit()
            admitted = refusal is None
        try:
            if refusal is not None:
                await self._refuse(observed_send, refusal)
            else:
                await self.app(scope, receive, observed_send)
        finally:
            if admitted:
                admission.done()
            metrics.requests_in_flight -= 1
            elapsed = time.perf_counter() - started
            method: str = scope["method"]
            # A refused request was never routed: it is counted and logged as route "shed".
            route: str = (
                "shed" if refusal is not None else scope.get("path_template") or "unmatched"
            )
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

    async def _refuse(self, send: Send, refusal: Refusal) -> None:
        if self.admission.refusal_delay:
            await asyncio.sleep(self.admission.hold())
        await send(refusal.start())
        body: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": refusal.body,
            "more_body": False,
        }
        await send(body)
