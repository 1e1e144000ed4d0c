"""Probes, and what a request gets while the database cannot be reached."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url

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
