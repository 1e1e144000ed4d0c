"""Metrics, request ids, the access log and the headers every response carries."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from service.logs import JsonFormatter
from tests.conftest import AUTH

Client = AsyncTestClient[Any]


async def test_metrics_count_requests_by_route_template_and_status(client: Client) -> None:
    await client.get("/items/5")
    await client.get("/items/7")
    await client.patch("/items", json=[{"id": 5, "value": 1}], headers=AUTH)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'http_requests_total{method="GET",route="/items/{item_id}",status="200"} 1.0' in text
    assert 'http_requests_total{method="GET",route="/items/{item_id}",status="404"} 1.0' in text
    assert 'http_requests_total{method="PATCH",route="/items",status="200"} 1.0' in text
    assert 'http_request_duration_seconds_bucket{le="0.005",method="GET"' in text
    assert "http_requests_in_flight 1.0" in text  # the scrape itself
    for name in (
        "db_pool_size 10.0",
        "db_pool_checked_out",
        "db_pool_overflow",
        "db_pool_wait_seconds_count",
    ):
        assert name in text
    waits = [line for line in text.splitlines() if line.startswith("db_pool_wait_seconds_count")]
    assert float(waits[0].split()[-1]) >= 3  # each request that used the database was timed


async def test_request_id_is_echoed_or_generated(client: Client) -> None:
    response = await client.get("/items/5", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = (await client.get("/items/5")).headers["x-request-id"]
    assert len(generated) == 32
    forged = await client.get("/items/5", headers={"X-Request-ID": 'x" level=ERROR'})
    assert forged.headers["x-request-id"] != 'x" level=ERROR'


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/items"), ("GET", "/no-such-route"), ("PUT", "/items"), ("GET", "/items/999")],
)
async def test_every_response_has_security_headers(client: Client, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "x-request-id" in response.headers
    assert "server" not in response.headers
    assert "access-control-allow-origin" not in response.headers


async def test_one_access_log_line_per_request(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.access"):
        await client.get("/items/6", headers={"X-Request-ID": "req-42"})
    records = [r for r in caplog.records if r.name == "service.access"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-42"
    assert line["http"]["method"] == "GET"
    assert line["http"]["route"] == "/items/{item_id}"
    assert line["http"]["status"] == 200
    assert line["http"]["duration_ms"] >= 0
    assert line["level"] == "INFO" and line["logger"] == "service.access"
