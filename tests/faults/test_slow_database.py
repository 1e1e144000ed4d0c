"""Fault 4: a row lock held by an outside transaction makes the database slow for one row.

With DB_STATEMENT_TIMEOUT_MS small, a PATCH of that row answers 503 promptly and changes
nothing. With the statement timeout long, a burst larger than the pool fills it with waiting
PATCHes; the rest get 503 with Retry-After after DB_POOL_TIMEOUT, not an unbounded queue; when the
lock goes, the service serves again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import fetch_values, seed_rows, send

pytestmark = pytest.mark.slow

ROWS = 10
LOCKED_ID = 7


@asynccontextmanager
async def row_locked(database: URL, row_id: int) -> AsyncIterator[None]:
    """An outside transaction holding `FOR UPDATE` on one row until the block ends."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute("SELECT 1 FROM playing_with_neon WHERE id = $1 FOR UPDATE", row_id)
        yield
    finally:
        await transaction.rollback()
        await connection.close()


async def test_statement_timeout_answers_503_promptly_and_changes_nothing(
    fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, ROWS)
    env = service_environment(
        fault_database, DB_STATEMENT_TIMEOUT_MS="300", SHUTDOWN_DELAY_SECONDS="0"
    )
    # Rows below the locked one are locked first (id order), so a rollback must release them.
    batch = [{"id": 2, "value": 222.0}, {"id": LOCKED_ID, "value": 777.0}]
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            async with row_locked(fault_database, LOCKED_ID):
                outcomes = [
                    await send(client, "PATCH", "PATCH", "/items", json=batch, headers=AUTH),
                    await send(client, "DELETE", "DELETE", f"/items/{LOCKED_ID}", headers=AUTH),
                ]
                # Other rows are not held up meanwhile.
                free = await send(
                    client, "PATCH", "PATCH", "/items", json=[{"id": 1, "value": 1.0}], headers=AUTH
                )
            assert await fetch_values(fault_database) == {
                i: (1.0 if i == 1 else 0.0) for i in range(1, ROWS + 1)
            }
            recovered = await send(client, "PATCH", "PATCH", "/items", json=batch, headers=AUTH)
    for outcome in outcomes:
        # The server cancelled the statement (not the client giving up): nothing was changed.
        assert outcome.status == 503, outcome.body
        assert "nothing was changed" in outcome.body, outcome.body
        assert outcome.problem_json and outcome.retry_after
        assert outcome.elapsed < 0.3 + 2.0, outcome.elapsed  # not held until the lock goes
    assert free.status == 200 and free.elapsed < 2.0  # 200: not cut by the 0.3 s timeout
    assert recovered.status == 200
    values = await fetch_values(fault_database)
    assert values[2] == 222.0 and values[LOCKED_ID] == 777.0
    record(
        "Fault 4",
        f"Slow database: row {LOCKED_ID} locked by an outside transaction, "
        "DB_STATEMENT_TIMEOUT_MS=300; PATCH and DELETE of it",
        len(outcomes) + 2,
        status_counts(o.status for o in [*outcomes, free, recovered]),
        f"503 with Retry-After in at most {max(o.elapsed for o in outcomes):.2f} s, nothing "
        "changed; other rows served meanwhile; the same PATCH succeeds once the lock is gone",
    )


POOL_SIZE, MAX_OVERFLOW, POOL_TIMEOUT = 2, 1, 1.5
BURST = 16
HOLD = 4.0


async def test_burst_past_the_pool_gets_503_after_the_pool_timeout(
    fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, ROWS)
    env = service_environment(
        fault_database,
        DB_POOL_SIZE=str(POOL_SIZE),
        DB_MAX_OVERFLOW=str(MAX_OVERFLOW),
        DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        DB_STATEMENT_TIMEOUT_MS="20000",
        SHUTDOWN_DELAY_SECONDS="0",
    )
    capacity = POOL_SIZE + MAX_OVERFLOW
    with run_service(env, tmp_path) as service:
        limits = httpx.Limits(max_connections=BURST + 4)
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=30, limits=limits
        ) as client:
            assert (await client.get("/readyz")).status_code == 200
            async with row_locked(fault_database, LOCKED_ID):
                # The first `capacity` requests take every connection and wait on the lock.
                blockers = [
                    asyncio.create_task(
                        send(
                            client,
                            "blocked",
                            "PATCH",
                            "/items",
                            json=[{"id": LOCKED_ID, "value": float(n)}],
                            headers=AUTH,
                        )
                    )
                    for n in range(capacity)
                ]
                await asyncio.sleep(0.5)
                burst_started = time.monotonic()
                burst = await asyncio.gather(
                    *(
                        send(client, "read", "GET", "/items?limit=5")
                        if n % 4 == 0
                        else send(
                            client,
                            "write",
                            "PATCH",
                            "/items",
                            json=[{"id": 1 + n % 5, "value": 1.0}],
                            headers=AUTH,
                        )
                        for n in range(BURST)
                    )
                )
                burst_elapsed = time.monotonic() - burst_started
                await asyncio.sleep(max(0.0, HOLD - burst_elapsed))
            released_at = time.monotonic()
            blocked = await asyncio.gather(*blockers)
            recovered = [
                await send(client, "read", "GET", "/items?limit=5"),
                await send(
                    client, "write", "PATCH", "/items", json=[{"id": 1, "value": 5.0}], headers=AUTH
                ),
            ]
            ready = await send(client, "readyz", "GET", "/readyz")
    # Requests that got a connection waited for the lock and then succeeded.
    assert all(o.status == 200 for o in blocked), [(o.status, o.body) for o in blocked]
    assert all(o.started + o.elapsed >= released_at - 0.1 for o in blocked)
    # Everyone else was refused after about the pool timeout, not queued until the lock went.
    for o in burst:
        assert o.status == 503, (o.status, o.body)
        assert o.problem_json and o.retry_after
        # Refused after the pool timeout, well before the lock goes (HOLD after the burst).
        assert POOL_TIMEOUT - 0.1 <= o.elapsed <= POOL_TIMEOUT + 1.5 < HOLD, o.elapsed
    assert all(o.status == 200 for o in recovered) and ready.status == 200
    record(
        "Fault 4",
        f"Slow database, pool exhausted: {capacity} PATCHes wait on a held row lock "
        f"(pool {POOL_SIZE}+{MAX_OVERFLOW}), then a burst of {BURST} reads and writes, "
        f"DB_POOL_TIMEOUT={POOL_TIMEOUT} s",
        len(blocked) + len(burst) + len(recovered) + 1,
        status_counts(o.status for o in [*blocked, *burst, *recovered, ready]),
        f"burst: all 503 with Retry-After after {min(o.elapsed for o in burst):.2f} to "
        f"{max(o.elapsed for o in burst):.2f} s; the waiting {capacity} succeeded when the lock "
        "went; reads, writes and /readyz fine right after",
    )
