"""Database errors as the README promises them: 409 for a conflict, 503 for a database that is not
as configured, and statements left unbounded when DB_STATEMENT_TIMEOUT_MS=0."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings, describe_database
from tests.conftest import (
    AUTH,
    LOCK_ROW,
    concurrent_client,
    fresh_database,
    row_locked,
    table_snapshot,
)

WAITING_FOR_A_LOCK = text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE application_name = :name AND wait_event_type = 'Lock'"
)


async def wait_for_a_lock_wait(engine: AsyncEngine, settings: Settings) -> None:
    """Return once one of the service's statements waits for a row lock (5 s at most)."""
    for _ in range(100):
        async with engine.connect() as connection:
            name = {"name": settings.db_application_name}
            if (await connection.execute(WAITING_FOR_A_LOCK, name)).scalar_one():
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the service's statement never waited for the lock")


async def test_a_deadlock_is_409_with_retry_after_and_changes_nothing(
    settings: Settings, engine: AsyncEngine, notebook_rows: None
) -> None:
    before = await table_snapshot(engine)
    batch = [{"id": 5, "value": 1.0}, {"id": 6, "value": 2.0}]
    async with concurrent_client(settings) as client:
        async with row_locked(engine, 6) as outside:
            # The outside transaction checks for a deadlock only after 30 s, the service's
            # statement after PostgreSQL's default 1 s: the service's statement is the victim.
            await outside.execute(text("SET LOCAL deadlock_timeout = '30s'"))
            patch = asyncio.create_task(client.patch("/items", json=batch, headers=AUTH))
            await wait_for_a_lock_wait(engine, settings)  # it holds row 5 and waits for 6
            await outside.execute(LOCK_ROW, {"id": 5})  # returns once the deadlock is broken
            response = await patch
        assert response.status_code == 409, response.text
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        assert "busy in another transaction" in response.json()["detail"]
        assert await table_snapshot(engine) == before
        # Retrying, as Retry-After says, succeeds once the other transaction is gone.
        retried = await client.patch("/items", json=batch, headers=AUTH)
        assert (retried.status_code, retried.json()) == (200, {"updated": 2})
    values = {row[0]: row[2] for row in await table_snapshot(engine)}
    assert (values[5], values[6]) == (1.0, 2.0)


def refusal_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("service") and r.levelno >= logging.ERROR
    ]


async def test_a_missing_table_is_503_with_one_error_line(
    settings: Settings, server_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    async with fresh_database(server_url, prefix="service_unmigrated") as url:
        app = create_app(dataclasses.replace(settings, database_url=url))
        async with AsyncTestClient(app=app) as client:
            caplog.clear()
            response = await client.get("/items")
            records = refusal_records(caplog)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    where = describe_database(url)
    expected = (
        f"the database refuses the service's configuration ({where}): "
        "the table does not exist (run `python -m service migrate`)"
    )
    assert [(r.getMessage(), r.exc_info) for r in records] == [(expected, None)]


async def test_a_missing_database_is_503_with_one_error_line(
    settings: Settings, server_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    url = server_url.set(database="service_no_such_database")
    async with AsyncTestClient(
        app=create_app(dataclasses.replace(settings, database_url=url))
    ) as client:
        caplog.clear()
        response = await client.get("/items")
        records = refusal_records(caplog)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert len(records) == 1 and records[0].exc_info is None, records
    assert (
        records[0].getMessage().endswith("service_no_such_database): the database does not exist")
    )


@pytest.mark.parametrize(("timeout_ms", "status"), [(0, 200), (500, 503)])
async def test_statement_timeout_zero_lets_a_long_statement_finish(
    settings: Settings, engine: AsyncEngine, notebook_rows: None, timeout_ms: int, status: int
) -> None:
    # The row is held 1.5 s: past 500 ms and past the client's 1 s margin, so any bound on the
    # statement (the server's, the client's or the lease's) cuts it; 0 must leave it none.
    held = 1.5
    settings = dataclasses.replace(settings, db_statement_timeout_ms=timeout_ms)
    async with concurrent_client(settings) as client:
        async with row_locked(engine, 5):
            started = time.monotonic()
            patch = asyncio.create_task(
                client.patch("/items", json=[{"id": 5, "value": 7.0}], headers=AUTH)
            )
            await asyncio.sleep(held)
        response = await patch
        elapsed = time.monotonic() - started
    assert response.status_code == status, response.text
    value = {row[0]: row[2] for row in await table_snapshot(engine)}[5]
    if timeout_ms == 0:
        assert elapsed >= held and value == 7.0
    else:
        assert "nothing was changed" in response.json()["detail"] and value == 11.0
