"""The migration: it creates the table, or adopts the notebook's hand-made one without losing or
misdescribing a row, and its downgrade drops only a table it created."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL

from service.app import create_app
from service.config import Settings
from service.migrate import alembic_config, upgrade_to_head
from tests.conftest import AUTH, asyncpg_dsn, fresh_database, run_cli, service_environment

# The notebook's table as it was made by hand: every column nullable.
NOTEBOOK_TABLE = "CREATE TABLE playing_with_neon (id SERIAL, name TEXT, value REAL)"
NOTEBOOK_ROWS = (
    "INSERT INTO playing_with_neon (name, value) VALUES ('TAlha Bhai', 4265.3), ('low', 11)"
)


@pytest.fixture
async def database(server_url: URL) -> AsyncIterator[URL]:
    """A new database with nothing in it."""
    async with fresh_database(server_url, prefix="service_migrate") as url:
        yield url


async def run_sql(url: URL, *statements: str) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def table_state(url: URL) -> dict[str, Any]:
    """The table's rows, which columns allow NULL, and whether Alembic recorded a revision."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if await connection.fetchval("SELECT to_regclass('playing_with_neon')") is None:
            return {"table": None}
        rows = await connection.fetch("SELECT id, name, value FROM playing_with_neon ORDER BY id")
        nullable = await connection.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name ="
            " 'playing_with_neon' AND is_nullable = 'YES' ORDER BY column_name"
        )
        revision = None
        if await connection.fetchval("SELECT to_regclass('alembic_version')") is not None:
            revision = await connection.fetchval("SELECT version_num FROM alembic_version")
        return {
            "rows": [tuple(row) for row in rows],
            "nullable": [row["column_name"] for row in nullable],
            "revision": revision,
        }
    finally:
        await connection.close()


def settings_for(url: URL) -> Settings:
    return Settings(database_url=url, api_tokens=("test-token-0123456789abcdef",))


async def upgrade(url: URL) -> None:
    await asyncio.to_thread(upgrade_to_head, settings_for(url))


async def downgrade(url: URL) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(settings_for(url)), "base")


async def test_migrate_refuses_a_hand_made_table_with_null_names_or_values_in_one_line(
    database: URL, tmp_path: Path
) -> None:
    await run_sql(
        database,
        NOTEBOOK_TABLE,
        NOTEBOOK_ROWS,
        # Rows 3..14: twelve without a value, the last two without a name either.
        "INSERT INTO playing_with_neon (name) SELECT 'n' || i FROM generate_series(3, 12) AS i",
        "INSERT INTO playing_with_neon (name, value) VALUES (NULL, NULL), (NULL, NULL)",
    )
    before = await table_state(database)

    result = await asyncio.to_thread(run_cli, service_environment(database), tmp_path, "migrate")

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert refusals == [
        "error: cannot adopt table playing_with_neon: 2 NULL names and 12 NULL values (ids 3, "
        "4, 5, 6, 7, 8, 9, 10, 11, 12 and 2 more), but the API promises every row a name and a "
        "value; fill them in or delete those rows, then migrate again"
    ]
    after = await table_state(database)
    assert after == before
    assert after["nullable"] == ["name", "value"] and after["revision"] is None


async def test_a_hand_made_table_without_nulls_is_adopted_and_its_columns_made_required(
    database: URL,
) -> None:
    await run_sql(database, NOTEBOOK_TABLE, NOTEBOOK_ROWS)
    rows = (await table_state(database))["rows"]

    await upgrade(database)

    adopted = await table_state(database)
    assert adopted == {"rows": rows, "nullable": [], "revision": "0003"}
    async with AsyncTestClient(app=create_app(settings_for(database))) as client:
        created = await client.post("/items", json=[{"name": "new", "value": 1}], headers=AUTH)
        assert created.status_code == 201, created.text
        assert created.json()["items"][0]["id"] == 3  # the SERIAL's own sequence goes on
    # From now on the table itself refuses what the API could not describe.
    with pytest.raises(asyncpg.NotNullViolationError):
        await run_sql(database, "INSERT INTO playing_with_neon (name) VALUES ('no value')")


# Rows 1..5 inserted with explicit ids, which never advance the id's sequence.
FIVE_ROWS_BY_ID = (
    "INSERT INTO playing_with_neon (id, name, value) SELECT i, 'row ' || i, i"
    " FROM generate_series(1, 5) AS i"
)
IDENTITY_TABLE = (
    "CREATE TABLE playing_with_neon"
    " (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text, value real)"
)


@pytest.mark.parametrize(
    ("statements", "first_new_id"),
    [
        ((NOTEBOOK_TABLE, FIVE_ROWS_BY_ID), 6),
        ((IDENTITY_TABLE, FIVE_ROWS_BY_ID), 6),
        ((NOTEBOOK_TABLE,), 1),  # empty: the sequence starts where it was, at 1
    ],
    ids=["serial", "identity", "empty"],
)
async def test_an_adopted_sequence_behind_the_rows_is_moved_past_them(
    database: URL, statements: tuple[str, ...], first_new_id: int
) -> None:
    await run_sql(database, *statements)

    await upgrade(database)

    async with AsyncTestClient(app=create_app(settings_for(database))) as client:
        created = await client.post("/items", json=[{"name": "new", "value": 1}], headers=AUTH)
    assert created.status_code == 201, created.text
    assert created.json()["items"][0]["id"] == first_new_id


async def test_an_adopted_sequence_ahead_of_the_rows_is_left_where_it_is(database: URL) -> None:
    # Rows 6..100 were deleted: their ids are not handed out again.
    await run_sql(
        database,
        NOTEBOOK_TABLE,
        "INSERT INTO playing_with_neon (name, value) SELECT 'n', i FROM generate_series(1, 100) i",
        "DELETE FROM playing_with_neon WHERE id > 5",
    )

    await upgrade(database)

    async with AsyncTestClient(app=create_app(settings_for(database))) as client:
        created = await client.post("/items", json=[{"name": "new", "value": 1}], headers=AUTH)
    assert created.json()["items"][0]["id"] == 101, created.text


async def test_the_downgrade_keeps_an_adopted_table_and_its_rows(database: URL) -> None:
    await run_sql(database, NOTEBOOK_TABLE, NOTEBOOK_ROWS)
    await upgrade(database)
    adopted = await table_state(database)

    await downgrade(database)

    kept = await table_state(database)
    assert kept == {**adopted, "revision": None}
    assert len(kept["rows"]) == 2
    await upgrade(database)  # and it can be adopted again
    assert await table_state(database) == adopted


async def test_the_downgrade_drops_a_table_the_migration_created(database: URL) -> None:
    await upgrade(database)
    created = await table_state(database)
    assert created == {"rows": [], "nullable": [], "revision": "0003"}
    await run_sql(database, NOTEBOOK_ROWS)

    await downgrade(database)

    assert await table_state(database) == {"table": None}
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        assert await connection.fetchval("SELECT to_regclass('idempotency_keys')") is None
    finally:
        await connection.close()
