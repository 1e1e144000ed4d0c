"""Metrics, request ids, the access log and the headers every response carries."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from service.logs import JsonFormatter, QueuedStderrHandler, StderrWriter
from tests.conftest import (
    AUTH,
    PROJECT_ROOT,
    concurrent_client,
    free_port,
    row_locked,
    run_service,
    service_environment,
)

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
        "db_pool_max 10.0",  # DB_MAX_OVERFLOW is 0
        "db_pool_checked_out",
        "db_pool_checked_in 1.0",  # the one connection the requests above used, now idle
        "db_pool_overflow",
        "db_pool_wait_seconds_count",
    ):
        assert name in text
    waits = [line for line in text.splitlines() if line.startswith("db_pool_wait_seconds_count")]
    assert float(waits[0].split()[-1]) >= 3  # each request that used the database was timed


async def test_db_pool_max_counts_the_overflow(settings: Settings, notebook_rows: None) -> None:
    settings = dataclasses.replace(settings, db_pool_size=3, db_max_overflow=2)
    async with AsyncTestClient(app=create_app(settings)) as client:
        text = (await client.get("/metrics")).text
    assert "db_pool_size 3.0" in text
    assert "db_pool_max 5.0" in text


async def test_db_up_says_whether_the_database_answers_at_the_scrape(
    settings: Settings, notebook_rows: None
) -> None:
    async with AsyncTestClient(app=create_app(settings)) as client:
        # No /readyz was asked: the scrape runs the check itself.
        assert "db_up 1.0" in (await client.get("/metrics")).text
    nowhere = make_url(f"postgresql+asyncpg://postgres:pw@127.0.0.1:{free_port()}/nothing")
    down = dataclasses.replace(settings, database_url=nowhere, db_pool_timeout=1.0)
    async with AsyncTestClient(app=create_app(down)) as client:
        started = time.monotonic()
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert "db_up 0.0" in response.text
        assert time.monotonic() - started < 1.5  # within the check's own 1 s timeout


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


def access_lines(log: str) -> list[dict[str, Any]]:
    """The access log's JSON lines in a service's output."""
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "service.access"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "logged_statuses"), [("all", [200, 404]), ("errors", [404]), ("off", [])]
)
def test_access_log_writes_one_line_per_request_as_configured(
    database_url: URL, notebook_rows: None, tmp_path: Path, mode: str, logged_statuses: list[int]
) -> None:
    env = service_environment(database_url, ACCESS_LOG=mode)
    with run_service(env, tmp_path) as service, httpx.Client(base_url=service.base_url) as http:
        assert http.get("/items/6", headers={"X-Request-ID": "req-42"}).status_code == 200
        assert http.get("/items/999", headers={"X-Request-ID": "req-43"}).status_code == 404
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=30) == 0  # queued lines are written before exit
    lines = [line for line in access_lines(service.log()) if line["http"]["route"] != "/healthz"]
    assert [line["http"]["status"] for line in lines] == logged_statuses
    if mode == "all":
        line = lines[0]
        assert line["request_id"] == "req-42"
        assert line["http"]["method"] == "GET"
        assert line["http"]["route"] == "/items/{item_id}"
        assert line["http"]["duration_ms"] >= 0
        assert line["level"] == "INFO" and line["message"] == "GET /items/{item_id} 200"
        assert datetime.fromisoformat(line["time"]).tzinfo is not None


def test_log_records_are_written_by_the_writer_thread_as_json() -> None:
    stream = io.StringIO()
    writer = StderrWriter(stream)
    handler = QueuedStderrHandler(writer)
    handler.setFormatter(JsonFormatter())
    record = logging.makeLogRecord(
        {"name": "service.test", "levelname": "WARNING", "msg": "hello %s", "args": ("x",)}
    )
    handler.emit(record)
    writer.close()
    line = json.loads(stream.getvalue())
    assert line["message"] == "hello x" and line["level"] == "WARNING"


async def test_requests_past_max_in_flight_are_refused_after_the_refusal_delay(
    settings: Settings, engine: AsyncEngine, notebook_rows: None
) -> None:
    settings = dataclasses.replace(settings, max_in_flight=2, admission_refusal_delay_ms=400)
    async with concurrent_client(settings) as client:
        async with row_locked(engine, 5):
            # Two writes wait on the locked row: the service is at its limit.
            blocked = [
                asyncio.create_task(
                    client.patch("/items", json=[{"id": 5, "value": 2.0}], headers=AUTH)
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0.5)
            started = time.monotonic()
            refused = await client.get("/items")
            # Held about the refusal delay (give or take half), well below the 2 s pool timeout
            # a queued request would wait.
            assert 0.2 <= time.monotonic() - started < 1.5
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["content-type"] == "application/problem+json"
            assert "at capacity (2 requests in progress)" in refused.json()["detail"]
            assert "x-request-id" in refused.headers
            # Probes and metrics are never refused.
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert 'http_requests_total{method="GET",route="shed",status="503"} 1.0' in metrics
            assert 'admission_refusals_total{reason="in_flight_limit"} 1.0' in metrics
            assert "admission_in_flight 2.0" in metrics  # the two writes
            assert "http_requests_in_flight 3.0" in metrics  # the two writes and the scrape
        assert [r.status_code for r in await asyncio.gather(*blocked)] == [200, 200]
        assert (await client.get("/items")).status_code == 200


# In a child process, as the service configures logging: connect, invalidate a connection and
# dispose the engine (which recreates its pool), then log one line of our own.
POOL_CHURN = """
import asyncio, logging, sys
from sqlalchemy import text
from sqlalchemy.engine import make_url
from service.config import Settings
from service.db import create_engine
from service.logs import configure_logging

# SQLAlchemy quiets itself on import only when no level was set before: do not count on that.
logging.getLogger("sqlalchemy").setLevel(logging.NOTSET)
configure_logging("INFO", "json")

async def churn():
    engine = create_engine(Settings(database_url=make_url(sys.argv[1])))
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        await connection.invalidate()
    await engine.dispose()
    logging.getLogger("service.test").info("pool churned")

asyncio.run(churn())
"""


def test_sqlalchemy_pool_and_engine_lines_stay_out_of_the_log_at_info(database_url: URL) -> None:
    child = subprocess.run(
        [sys.executable, "-c", POOL_CHURN, database_url.render_as_string(hide_password=False)],
        cwd=PROJECT_ROOT,
        env={**service_environment(None), "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    lines = [json.loads(line) for line in child.stderr.splitlines()]
    assert [line["message"] for line in lines if line["logger"] == "service.test"] == [
        "pool churned"
    ]
    assert [line for line in lines if line["logger"].startswith("sqlalchemy")] == []
