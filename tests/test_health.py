"""Probes, and what a request gets while the database cannot be reached."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from tests.conftest import AUTH, free_port


async def test_probes_with_the_database_up(client: AsyncTestClient[Any]) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def unreachable(settings: Settings) -> Settings:
    """Settings pointing at a loopback port where nothing listens."""
    url = make_url(f"postgresql+asyncpg://postgres:pw@127.0.0.1:{free_port()}/nothing")
    return dataclasses.replace(settings, database_url=url, db_pool_timeout=1.0)


async def test_database_down_is_503_with_retry_after_and_liveness_stays_up(
    settings: Settings,
) -> None:
    async with AsyncTestClient(app=create_app(unreachable(settings))) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        for method, path, body in [
            ("GET", "/items", None),
            ("GET", "/items/5", None),
            ("PATCH", "/items", [{"id": 5, "value": 1}]),
            ("POST", "/items", [{"name": "n", "value": 1}]),
            ("DELETE", "/items/5", None),
        ]:
            started = time.monotonic()
            response = await client.request(method, path, json=body, headers=AUTH)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers["retry-after"] == "1"
            assert response.headers["content-type"].startswith("application/problem+json")
            assert "pw" not in response.text
            assert elapsed < 2.5  # bounded by the 1 s pool timeout, never a hang


async def test_readiness_does_not_queue_behind_a_busy_pool(
    settings: Settings, engine: AsyncEngine, notebook_rows: None
) -> None:
    settings = dataclasses.replace(settings, db_pool_size=2, db_pool_timeout=1.0)
    async with AsyncTestClient(app=create_app(settings)) as client:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            await connection.execute(
                text("SELECT id FROM playing_with_neon WHERE id = 5 FOR UPDATE")
            )
            # Both pooled connections wait on the locked row.
            blocked = [
                asyncio.create_task(
                    client.patch("/items", json=[{"id": 5, "value": 2.0}], headers=AUTH)
                )
                for _ in range(2)
            ]
            await asyncio.sleep(0.5)
            read = await client.get("/items/6")
            assert read.status_code == 503  # no connection became free within the pool timeout
            assert "busy" in read.json()["detail"]
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text  # the database answers: ready
            await transaction.rollback()
        assert [r.status_code for r in await asyncio.gather(*blocked)] == [200, 200]
