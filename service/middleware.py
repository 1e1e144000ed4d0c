"""Per-request observability: request id, one access log line, metrics, response headers."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

access_log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
# An incoming id is echoed only if it is short and plain, so it cannot forge log fields.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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
        request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else secrets.token_hex(16)
        state["request_id"] = request_id
    return request_id


async def add_response_headers(message: Message, scope: Scope) -> None:
    """`before_send` hook: every response, routed or not, carries these headers."""
    if message["type"] != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    headers["x-content-type-options"] = "nosniff"
    headers["x-request-id"] = request_id_of(scope)
    app = scope.get("app")
    if app is not None and app.state.get("draining"):
        # Shutting down: make clients open a new connection, which the load balancer will
        # send to another pod, instead of reusing this one until it is closed under them.
        headers["connection"] = "close"


class ObserveRequests:
    """ASGI middleware around every routed HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # prometheus_client's labels() builds and hashes a key on every call; the handful of
        # (method, route, status) combinations are looked up once and kept.
        self.children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        started = time.perf_counter()
        status = 500  # if the app fails before it answers, uvicorn sends a 500
        request_id = request_id_of(scope)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"
            labels: dict[str, Any] = {
                "method": method,
                "route": route,
                "status": str(status),
            }
            key = (method, route, labels["status"])
            children = self.children.get(key)
            if children is None:
                children = self.children[key] = (
                    self.metrics.requests.labels(**labels),
                    self.metrics.latency.labels(**labels),
                )
            children[0].inc()
            children[1].observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "%s %s %s",
                    method,
                    route,
                    status,
                    extra={
                        "http": {
                            **labels,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 2),
                        },
                        "request_id": request_id,
                    },
                )
