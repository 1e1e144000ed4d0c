"""Overlapping batches from many clients at once: no deadlock, no 5xx, consistent final values."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from tests.conftest import AUTH, concurrent_client, table_snapshot

ROWS = 60
BATCHES = 50
BATCH_SIZE = 20


async def test_fifty_concurrent_overlapping_batches(
    settings: Settings, engine: AsyncEngine
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE playing_with_neon"))
        await connection.execute(
            text("INSERT INTO playing_with_neon (id, name, value) VALUES (:id, 'row', 0)"),
            [{"id": i} for i in range(1, ROWS + 1)],
        )
    rng = random.Random(7)
    # Batch b writes the value b + 1 to each of its rows, in a random order.
    batches = [
        [
            {"id": row_id, "value": float(b + 1)}
            for row_id in rng.sample(range(1, ROWS + 1), BATCH_SIZE)
        ]
        for b in range(BATCHES)
    ]

    async with concurrent_client(settings) as client:

        async def send(batch: list[dict[str, Any]]) -> int:
            response = await client.patch("/items", json=batch, headers=AUTH, timeout=30)
            return response.status_code

        sending = asyncio.gather(*(send(b) for b in batches))
        statuses = await asyncio.wait_for(sending, timeout=60)
    assert statuses == [200] * BATCHES

    final = {row[0]: row[2] for row in await table_snapshot(engine)}
    for row_id in range(1, ROWS + 1):
        writers = {
            float(b + 1) for b, batch in enumerate(batches) for e in batch if e["id"] == row_id
        }
        expected = writers or {0.0}
        assert final[row_id] in expected, (row_id, final[row_id], writers)
