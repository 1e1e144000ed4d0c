"""`python -m service seed`: deterministic demo rows, refused over existing rows unless forced."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db import create_engine
from service.migrate import upgrade_to_head
from service.seed import MAX_DEMO_ROWS, SeedRefused, demo_row, seed_demo_rows
from tests.conftest import fresh_database, run_cli, service_environment, table_snapshot

NEXT_ID = text("INSERT INTO playing_with_neon (name, value) VALUES ('next', 0) RETURNING id")


@pytest.fixture
async def empty_url(server_url: URL) -> AsyncIterator[URL]:
    """A migrated database of this test's own, with an empty table."""
    async with fresh_database(server_url, prefix="service_seed") as url:
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url, auth_disabled=True))
        yield url


@pytest.fixture
async def empty_engine(empty_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on that database."""
    engine = create_engine(Settings(database_url=empty_url, auth_disabled=True))
    yield engine
    await engine.dispose()


def expected_rows(rows: int) -> list[tuple[object, ...]]:
    return [tuple(demo_row(i).values()) for i in range(1, rows + 1)]


async def next_id(engine: AsyncEngine) -> int:
    async with engine.begin() as connection:
        return int((await connection.execute(NEXT_ID)).scalar_one())


async def test_seed_fills_an_empty_table_chunk_by_chunk(empty_engine: AsyncEngine) -> None:
    # 2,500 rows in chunks of 1,000: two full chunks and a partial one.
    removed = await seed_demo_rows(empty_engine, 2500, force=False, chunk_rows=1000)

    assert removed == 0
    rows = await table_snapshot(empty_engine)
    assert rows == expected_rows(2500)
    assert rows[0] == (1, "demo-000001", 79.19)
    assert all(0 <= value < 1000 for _, _, value in rows)
    assert await next_id(empty_engine) == 2501


async def test_seed_refuses_a_table_with_rows_naming_the_count(empty_engine: AsyncEngine) -> None:
    await seed_demo_rows(empty_engine, 30, force=False)
    await next_id(empty_engine)
    before = await table_snapshot(empty_engine)

    with pytest.raises(SeedRefused, match=r"already holds 31 rows.*--force"):
        await seed_demo_rows(empty_engine, 10, force=False)

    assert await table_snapshot(empty_engine) == before


async def test_force_replaces_every_row_and_restarts_ids(empty_engine: AsyncEngine) -> None:
    await seed_demo_rows(empty_engine, 40, force=False)

    removed = await seed_demo_rows(empty_engine, 10, force=True)

    assert removed == 40
    assert await table_snapshot(empty_engine) == expected_rows(10)
    assert await next_id(empty_engine) == 11


async def test_seed_before_migrating_says_to_migrate(server_url: URL) -> None:
    async with fresh_database(server_url, prefix="service_seed") as url:
        engine = create_engine(Settings(database_url=url, auth_disabled=True))
        try:
            with pytest.raises(SeedRefused, match="does not exist: run `python -m service migrate"):
                await seed_demo_rows(engine, 10, force=False)
        finally:
            await engine.dispose()


@pytest.mark.parametrize("rows", [0, -5, MAX_DEMO_ROWS + 1])
async def test_row_count_out_of_range_is_refused(empty_engine: AsyncEngine, rows: int) -> None:
    with pytest.raises(SeedRefused, match=f"--rows must be between 1 and {MAX_DEMO_ROWS}"):
        await seed_demo_rows(empty_engine, rows, force=False)


def run_seed(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(env, cwd, "seed", *args)


@pytest.mark.slow
async def test_command_seeds_refuses_then_forces(
    empty_url: URL, empty_engine: AsyncEngine, tmp_path: Path
) -> None:
    env = service_environment(empty_url)

    first = await asyncio.to_thread(run_seed, env, tmp_path, "--rows", "50")
    again = await asyncio.to_thread(run_seed, env, tmp_path, "--rows", "50")
    forced = await asyncio.to_thread(run_seed, env, tmp_path, "--rows", "20", "--force")

    assert first.returncode == 0, first.stderr
    assert "seeded 50 demo rows" in first.stderr
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (
        "error: the table playing_with_neon already holds 50 rows; "
        "seed only an empty table, or pass --force to delete them first"
    )
    assert forced.returncode == 0, forced.stderr
    assert "RESTART IDENTITY deleted 50 rows first" in forced.stderr
    assert await table_snapshot(empty_engine) == expected_rows(20)


@pytest.mark.slow
def test_command_migrates_the_embedded_database_first(
    tmp_path: Path, embedded_db_dir: Path
) -> None:
    # No DATABASE_URL and no API_TOKENS: the embedded database, created, migrated, then seeded.
    env = service_environment(None, EMBEDDED_DB_DIR=str(embedded_db_dir), API_TOKENS="")

    result = run_seed(env, tmp_path, "--rows", "10000")

    assert result.returncode == 0, result.stderr
    assert "Running upgrade" in result.stderr
    assert "seeded 10000 demo rows (ids 1..10000)" in result.stderr
