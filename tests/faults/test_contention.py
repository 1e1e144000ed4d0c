"""Fault 3: 32 clients send overlapping batches of 50 ids in random order for a bounded time.

No deadlock, no 5xx, and every row ends with the value of one acknowledged batch that touched it
(each batch writes a value of its own to all its rows).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import Outcome, fetch_values, run_until, seed_rows, send

pytestmark = pytest.mark.slow

CLIENTS = 32
ROWS = 100  # every batch holds half of the rows: nearly every pair of batches overlaps
BATCH = 50
DURATION = 8.0
MAX_PER_CLIENT = 400


async def deadlocks(database: URL) -> int:
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        return int(
            await connection.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await connection.close()


async def test_overlapping_batches_from_32_clients(fault_database: URL, tmp_path: Path) -> None:
    await seed_rows(fault_database, ROWS, value=-1.0)
    deadlocks_before = await deadlocks(fault_database)
    # Lock ordering is the point here: 32 clients on 10 connections, each batch waiting on the
    # others' row locks, is a standing queue that admission would cut back with 503s (its own
    # test is tests/faults/test_admission.py), so it is off.
    env = service_environment(fault_database, SHUTDOWN_DELAY_SECONDS="0", ADMISSION_TARGET_MS="0")
    written: dict[float, list[int]] = {}  # batch value -> ids, for acknowledged batches only
    with run_service(env, tmp_path) as service:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=30, limits=limits
        ) as client:

            async def one_batch(client_number: int, sequence: int) -> Outcome:
                rng = random.Random(client_number * 1_000_003 + sequence)
                ids = rng.sample(range(1, ROWS + 1), BATCH)  # random order, not sorted
                value = float(client_number * 100_000 + sequence)
                batch = [{"id": i, "value": value} for i in ids]
                outcome = await send(client, "PATCH", "PATCH", "/items", json=batch, headers=AUTH)
                if outcome.status == 200:
                    written[value] = ids
                return outcome

            stop = asyncio.Event()
            started = time.monotonic()
            load = asyncio.create_task(run_until(stop, CLIENTS, one_batch, MAX_PER_CLIENT))
            await asyncio.sleep(DURATION)
            stop.set()
            outcomes = await load
            elapsed = time.monotonic() - started
    log = service.log()

    statuses = status_counts(o.status for o in outcomes)
    assert set(statuses) == {200}, statuses  # no 5xx, no 409, no timeout
    assert "unhandled error" not in log
    assert await deadlocks(fault_database) == deadlocks_before
    final = await fetch_values(fault_database)
    touched: dict[int, set[float]] = {}
    for value, ids in written.items():
        for i in ids:
            touched.setdefault(i, set()).add(value)
    for i in range(1, ROWS + 1):
        if i in touched:
            assert final[i] in touched[i], f"row {i} holds {final[i]}, written by no batch"
        else:
            assert final[i] == -1.0
    slowest = max(o.elapsed for o in outcomes)
    record(
        "Fault 3",
        f"Contention: {CLIENTS} clients, overlapping PATCH batches of {BATCH} of {ROWS} ids in "
        f"random order, {DURATION:.0f} s",
        len(outcomes),
        statuses,
        f"{len(outcomes) / elapsed:.0f} batches/s, slowest {slowest:.2f} s; no deadlock "
        "(pg_stat_database), no 409/5xx; every row holds the value of an acknowledged batch "
        "that touched it",
    )
