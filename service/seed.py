"""Rows a database starts with: the notebook's own on a new embedded database, and demo rows."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

NOTEBOOK_ROWS = (
    {"id": 5, "name": "Notebook_row_5", "value": 11.0},
    {"id": 6, "name": "Notebook_row_6", "value": 15.99},
    {"id": 12, "name": "TAlha Bhai", "value": 4265.3},
    {"id": 19, "name": "Updated_VSCODE", "value": 78.79},
    {"id": 21, "name": "Updated_VSCODE2", "value": 23.53},
    {"id": 22, "name": "Vs_code_atttemp2", "value": 324.432},
)

INSERT_WITH_ID = text(
    "INSERT INTO playing_with_neon (id, name, value) VALUES (:id, :name, CAST(:value AS float8))"
)
# Rows inserted with explicit ids leave the id sequence behind; move it past them, never back
# (ids of deleted rows are not handed out again). nextval gives the value the sequence would hand
# out next, and setval(..., false) makes the larger of it and max(id) + 1 the next one again, so
# nothing is used up. An empty table starts at the sequence's own next value (1 when it is new),
# and a table whose id has no sequence of its own is left alone (setval of NULL does nothing).
SYNC_ID_SEQUENCE = text(
    "SELECT setval(sequence, GREATEST(nextval(sequence), "
    "(SELECT COALESCE(max(id), 0) + 1 FROM playing_with_neon)), false) "
    "FROM pg_get_serial_sequence('playing_with_neon', 'id') AS sequence"
)
COUNT_ROWS = text("SELECT count(*) FROM playing_with_neon")


async def seed_notebook_rows(engine: AsyncEngine) -> bool:
    """Insert the notebook's rows into an empty table; returns whether it did."""
    async with engine.begin() as connection:
        if (await connection.execute(COUNT_ROWS)).scalar_one():
            return False
        await connection.execute(INSERT_WITH_ID, list(NOTEBOOK_ROWS))
        await connection.execute(SYNC_ID_SEQUENCE)
    return True


# Demo rows for load tests and demos: row i (1-based) is `demo-000001`-style with a value in
# [0, 1000) spread by a prime stride, so thresholds select a predictable share of the table.
# Ids are given explicitly, so ids 1..N exist whatever the identity sequence had reached.
INSERT_DEMO_ROWS = text(
    "INSERT INTO playing_with_neon (id, name, value) "
    "SELECT i, 'demo-' || lpad(i::text, greatest(6, length(i::text)), '0'), "
    "CAST((i::int8 * 7919) % 100000 AS float8) / 100 "
    "FROM generate_series(CAST(:first AS int4), CAST(:last AS int4)) AS i"
)
TABLE_EXISTS = text("SELECT to_regclass('playing_with_neon') IS NOT NULL")
# RESTART IDENTITY so the rows that follow a forced seed get ids N+1, N+2, … again.
TRUNCATE_ROWS = text("TRUNCATE playing_with_neon RESTART IDENTITY")
# Rows per INSERT: one statement per chunk keeps each one short and the server's memory flat.
DEMO_CHUNK_ROWS = 50_000
MAX_DEMO_ROWS = 10_000_000


class SeedRefused(RuntimeError):
    """The table cannot be seeded as asked; the message says why in one line."""


def demo_row(i: int) -> dict[str, object]:
    """The demo row with id `i`, exactly as INSERT_DEMO_ROWS writes it."""
    return {"id": i, "name": f"demo-{i:06d}", "value": (i * 7919) % 100000 / 100}


async def seed_demo_rows(
    engine: AsyncEngine, rows: int, *, force: bool, chunk_rows: int = DEMO_CHUNK_ROWS
) -> int:
    """Insert demo rows 1..`rows` in one transaction; returns how many rows `force` removed.

    Refuses (SeedRefused) a table that already has rows unless `force`, which empties it first.
    """
    if not 1 <= rows <= MAX_DEMO_ROWS:
        raise SeedRefused(f"--rows must be between 1 and {MAX_DEMO_ROWS}; got {rows}")
    async with engine.begin() as connection:
        if not (await connection.execute(TABLE_EXISTS)).scalar_one():
            raise SeedRefused(
                "the table playing_with_neon does not exist: run `python -m service migrate` first"
            )
        found = int((await connection.execute(COUNT_ROWS)).scalar_one())
        if found and not force:
            raise SeedRefused(
                f"the table playing_with_neon already holds {found} rows; "
                "seed only an empty table, or pass --force to delete them first"
            )
        if force:
            await connection.execute(TRUNCATE_ROWS)
        for first in range(1, rows + 1, chunk_rows):
            last = min(first + chunk_rows - 1, rows)
            await connection.execute(INSERT_DEMO_ROWS, {"first": first, "last": last})
        await connection.execute(SYNC_ID_SEQUENCE)
    return found
