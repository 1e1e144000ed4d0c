"""Probes, and what a request gets while the database cannot be reached."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from tests.conftest import AUTH, asyncpg_dsn, concurrent_client, free_port


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
    async with concurrent_client(settings) as client:
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


async def test_connections_dropped_while_idle_cost_no_request_an_error(
    client: AsyncTestClient[Any], server_url: URL
) -> None:
    # Warm every pooled connection and the probe's, then end their server sessions, as an idle
    # reaper, a pooler or a restart does.
    await asyncio.gather(*(client.get("/items/5") for _ in range(20)))
    assert (await client.get("/readyz")).status_code == 200
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            Settings.db_application_name,
        )
    finally:
        await admin.close()
    assert ended >= 2
    await asyncio.sleep(0.3)  # the servers' goodbyes reach the idle sockets
    assert (await client.get("/readyz")).status_code == 200
    reads = await asyncio.gather(*(client.get("/items/5") for _ in range(20)))
    writes = [
        await client.patch("/items", json=[{"id": 6, "value": float(i)}], headers=AUTH)
        for i in range(5)
    ]
    assert [r.status_code for r in reads + writes] == [200] * 25
