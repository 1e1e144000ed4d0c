"""Server-Timing: only when SERVER_TIMING is on, only on /items, with plausible figures."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from tests.conftest import AUTH, concurrent_client, row_locked

HEADER = re.compile(r"db;dur=(\d+\.\d\d), total;dur=(\d+\.\d\d)")


def timings(response: Any) -> tuple[float, float]:
    """(db, total) in milliseconds, from a response's Server-Timing header."""
    match = HEADER.fullmatch(response.headers["server-timing"])
    assert match, response.headers["server-timing"]
    return float(match[1]), float(match[2])


async def test_item_answers_say_where_their_time_went_when_enabled(
    settings: Settings, notebook_rows: None
) -> None:
    timed = dataclasses.replace(settings, server_timing=True)
    async with AsyncTestClient(app=create_app(timed)) as client:
        db, total = timings(await client.get("/items/5"))
        assert 0 < db <= total
        db, total = timings(await client.get("/items?limit=3"))
        assert 0 < db <= total
        # Refused before any statement: no time in the database.
        db, total = timings(await client.get("/items/0"))
        assert db == 0 and total > 0
        for path in ("/healthz", "/metrics", "/schema/openapi.json"):
            assert "server-timing" not in (await client.get(path)).headers


async def test_a_statement_that_waits_shows_in_db_and_total(
    settings: Settings, notebook_rows: None, engine: AsyncEngine
) -> None:
    timed = dataclasses.replace(settings, server_timing=True)
    async with concurrent_client(timed) as http, row_locked(engine, 5):
        patch = asyncio.create_task(
            http.patch("/items", json=[{"id": 5, "value": 2}], headers=AUTH)
        )
        started = time.perf_counter()
        await asyncio.sleep(0.3)  # the UPDATE waits for the row lock all this time
        assert not patch.done()
    response = await patch
    waited_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200
    db, total = timings(response)
    # The statement was sent a moment after the clock started, and the lock released 0.3 s on.
    assert 250 <= db <= total <= waited_ms


async def test_no_server_timing_unless_enabled(client: AsyncTestClient[Any]) -> None:
    for path in ("/items/5", "/items?limit=3", "/healthz"):
        assert "server-timing" not in (await client.get(path)).headers
