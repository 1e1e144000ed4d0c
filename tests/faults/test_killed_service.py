"""Fault 2: the service is killed with SIGKILL while batches are being applied.

Every batch writes a marker of its own to rows no other batch touches (PATCH: a value; POST: a
name), so afterwards each batch can be checked on its own: wholly there or wholly absent, and
wholly there if it had been acknowledged.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import (
    Outcome,
    backends_gone,
    fetch_values,
    kill_during_load,
    seed_rows,
    send,
)

pytestmark = pytest.mark.slow

WORKERS = 8
BATCH = 200
ROUNDS = 3
MAX_BATCHES = 500  # rows for the PATCH batches: one disjoint range of BATCH ids each


class Batches:
    """Numbered batches with a marker each: which were sent, which were acknowledged."""

    def __init__(self) -> None:
        self.numbers = itertools.count()
        self.sent: dict[int, str] = {}  # batch number -> "PATCH" or "POST"
        self.acknowledged: set[int] = set()

    async def send_one(self, client: httpx.AsyncClient) -> Outcome:
        """PATCH its own BATCH rows to its marker (even numbers) or POST BATCH named rows."""
        number = next(self.numbers)
        assert number < MAX_BATCHES
        if number % 2 == 0:
            self.sent[number] = "PATCH"
            first = number * BATCH + 1
            batch = [{"id": i, "value": marker(number)} for i in range(first, first + BATCH)]
            outcome = await send(client, "PATCH", "PATCH", "/items", json=batch, headers=AUTH)
        else:
            self.sent[number] = "POST"
            rows = [{"name": f"batch-{number}-{i}", "value": 1} for i in range(BATCH)]
            outcome = await send(client, "POST", "POST", "/items", json=rows, headers=AUTH)
        if outcome.status in (200, 201):
            self.acknowledged.add(number)
        return outcome


async def test_sigkill_mid_batch_leaves_every_batch_whole_or_absent(
    fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, MAX_BATCHES * BATCH)
    env = service_environment(fault_database, SHUTDOWN_DELAY_SECONDS="0", MAX_BATCH=str(BATCH))
    rng = random.Random(2)
    batches = Batches()
    outcomes: list[Outcome] = []
    for _ in range(ROUNDS):
        target = len(batches.acknowledged) + rng.randint(5, 40)
        outcomes += await kill_during_load(
            env,
            tmp_path,
            WORKERS,
            batches.send_one,
            lambda t=target: len(batches.acknowledged) >= t,
        )
        await backends_gone(fault_database)
    sent, acknowledged = batches.sent, batches.acknowledged
    in_flight = sorted(set(sent) - acknowledged)
    assert all(o.status in (200, 201, None) for o in outcomes), status_counts(
        o.status for o in outcomes
    )

    values = await fetch_values(fault_database)
    names = await fetch_post_counts(fault_database)
    applied_in_flight = 0
    for number, method in sent.items():
        if method == "PATCH":
            first = number * BATCH + 1
            got = {values[i] for i in range(first, first + BATCH)}
            whole = got == {marker(number)}
            assert whole or got == {0.0}, f"batch {number} half applied: {sorted(got)[:5]}"
        else:
            count = names.get(number, 0)
            whole = count == BATCH
            assert whole or count == 0, f"batch {number} half inserted: {count} rows"
        assert whole or number not in acknowledged, f"acknowledged batch {number} lost"
        applied_in_flight += whole and number in in_flight
    # No batch that was never sent left anything behind either.
    assert set(names) <= set(sent)

    # The service comes back on the same database and serves reads and writes.
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            assert (await client.get("/readyz")).status_code == 200
            patch = await client.patch("/items", json=[{"id": 1, "value": 1}], headers=AUTH)
            assert patch.status_code == 200

    record(
        "Fault 2",
        f"SIGKILL of the service, {ROUNDS} times, during {WORKERS} clients' batches of {BATCH} "
        "rows (PATCH and POST, a marker per batch)",
        len(sent),
        status_counts(o.status for o in outcomes),
        f"{len(acknowledged)} acknowledged batches all whole; {len(in_flight)} in flight at a "
        f"kill: {applied_in_flight} whole (committed, answer lost), "
        f"{len(in_flight) - applied_in_flight} absent, none partial; restarted service serves",
    )


def marker(number: int) -> float:
    return 1_000_000.0 + number


async def fetch_post_counts(database: URL) -> dict[int, int]:
    """Batch number → rows that batch's POST inserted (names batch-<number>-<i>)."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        rows = await connection.fetch(
            "SELECT split_part(name, '-', 2)::int AS batch, count(*) AS rows "
            "FROM playing_with_neon WHERE name LIKE 'batch-%' GROUP BY 1"
        )
    finally:
        await connection.close()
    return {row["batch"]: row["rows"] for row in rows}
