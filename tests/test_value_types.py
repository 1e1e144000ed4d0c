"""An existing table whose `value` is real or numeric, or whose id has no generator, still works."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL

from service.app import create_app
from service.config import Settings
from service.migrate import upgrade_to_head
from tests.conftest import AUTH, asyncpg_dsn, fresh_database

# The notebook's table as people made it by hand: no identity on id.
HAND_MADE_TABLE = (
    "CREATE TABLE playing_with_neon (id integer PRIMARY KEY, name text NOT NULL, value {type})"
)


@pytest.fixture(params=["real", "numeric", "numeric(10,3)", "double precision"])
async def hand_made_database(
    request: pytest.FixtureRequest, server_url: URL
) -> AsyncIterator[tuple[URL, str]]:
    async with fresh_database(server_url, prefix="service_adopt") as url:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await connection.execute(HAND_MADE_TABLE.format(type=request.param))
            await connection.execute(
                "INSERT INTO playing_with_neon VALUES (12, 'TAlha Bhai', 4265.3),"
                " (21, 'Updated_VSCODE2', 23.53), (5, 'low', 11)"
            )
        finally:
            await connection.close()
        yield url, request.param


async def test_existing_table_of_any_value_type_is_adopted(
    settings: Settings, hand_made_database: tuple[URL, str]
) -> None:
    url, value_type = hand_made_database
    adopted = dataclasses.replace(settings, database_url=url)
    await asyncio.to_thread(upgrade_to_head, adopted)
    async with AsyncTestClient(app=create_app(adopted)) as client:
        body = (await client.get("/items", params={"min_value": 23})).json()
        assert [item["id"] for item in body["items"]] == [12, 21]
        assert all(isinstance(item["value"], float) for item in body["items"])
        assert abs(body["items"][0]["value"] - 4265.3) < 1e-3

        response = await client.patch("/items", json=[{"id": 5, "value": 15.99}], headers=AUTH)
        assert response.status_code == 200
        assert abs((await client.get("/items/5")).json()["value"] - 15.99) < 1e-3

        # The migration gave id a generator that starts past the existing rows.
        response = await client.post("/items", json=[{"name": "new", "value": 1}], headers=AUTH)
        assert response.status_code == 201
        assert response.json()["items"][0]["id"] == 22

        # A value the column cannot hold is the client's error, and changes nothing.
        response = await client.patch("/items", json=[{"id": 5, "value": 1e300}], headers=AUTH)
        fits = value_type in ("numeric", "double precision")
        assert response.status_code == (200 if fits else 422), response.text
        if not fits:
            assert abs((await client.get("/items/5")).json()["value"] - 15.99) < 1e-3
