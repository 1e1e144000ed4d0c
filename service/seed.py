"""Rows the service starts with on a new embedded database: the notebook's own."""

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
# Rows inserted with explicit ids leave the identity sequence behind; move it past them.
SYNC_ID_SEQUENCE = text(
    "SELECT setval(pg_get_serial_sequence('playing_with_neon', 'id'), "
    "(SELECT COALESCE(max(id), 0) + 1 FROM playing_with_neon), false)"
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
