"""Fault 8: readiness under a saturated pool. Every pooled connection is held by requests that
wait on a row lock; /readyz must stay 200 while the database answers (a probe queued behind the
requests would take every pod out of the Service at once), and turn 503 when it does not.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import ControlledPostgres, Outcome, seed_rows, send

pytestmark = pytest.mark.slow

POOL_SIZE = 2
POOL_TIMEOUT = 3.0
PROBES = 10


async def test_readiness_does_not_queue_behind_a_saturated_pool(
    controlled_postgres: ControlledPostgres, fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, 10)
    env = service_environment(
        fault_database,
        DB_POOL_SIZE=str(POOL_SIZE),
        DB_MAX_OVERFLOW="0",
        DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        SHUTDOWN_DELAY_SECONDS="0",
    )
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            locker = await asyncpg.connect(asyncpg_dsn(fault_database))
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("SELECT id FROM playing_with_neon WHERE id = 7 FOR UPDATE")
            held = [
                asyncio.ensure_future(
                    send(
                        client,
                        "held",
                        "PATCH",
                        "/items",
                        json=[{"id": 7, "value": float(n)}],
                        headers=AUTH,
                    )
                )
                for n in range(POOL_SIZE)
            ]
            await asyncio.sleep(
                0.5
            )  # both PATCHes now wait on the lock, each on a pooled connection
            # Proof that no connection is free: a read waits for one until the pool timeout.
            busy_read = asyncio.ensure_future(send(client, "busy", "GET", "/items/3"))
            while_saturated: list[Outcome] = []
            for _ in range(PROBES):
                while_saturated.append(await send(client, "readyz", "GET", "/readyz"))
                await asyncio.sleep(0.05)
            busy = await busy_read
            still_waiting = not any(task.done() for task in held)
            await transaction.rollback()
            await locker.close()
            released = await asyncio.gather(*held)

            controlled_postgres.stop("fast")
            down_started = time.monotonic()
            while_down = [await send(client, "readyz", "GET", "/readyz") for _ in range(3)]
            down_took = time.monotonic() - down_started
            controlled_postgres.start()
            after: list[Outcome] = []
            for _ in range(50):
                after.append(await send(client, "readyz", "GET", "/readyz"))
                if after[-1].status == 200:
                    break
                await asyncio.sleep(0.1)

    assert still_waiting, "the PATCHes did not hold the pool for the whole probe window"
    assert busy.status == 503 and busy.elapsed >= POOL_TIMEOUT - 0.5, busy
    assert [p.status for p in while_saturated] == [200] * PROBES, while_saturated
    slowest_probe = max(p.elapsed for p in while_saturated)
    assert slowest_probe < 1.0, slowest_probe
    assert [r.status for r in released] == [200] * POOL_SIZE, released
    assert [p.status for p in while_down] == [503] * 3, while_down
    assert after[-1].status == 200, after
    record(
        "Fault 8",
        f"Readiness with the pool saturated: both of {POOL_SIZE} pooled connections held by "
        f"PATCHes waiting on a row lock, a read timing out for want of a connection; then the "
        f"database stopped",
        PROBES + len(while_down) + len(after) + 1 + POOL_SIZE,
        status_counts(
            [p.status for p in while_saturated + while_down + after + released] + [busy.status]
        ),
        f"/readyz 200 all {PROBES} times while the pool was full (slowest {slowest_probe:.3f} s; "
        f"the read got 503 after {busy.elapsed:.1f} s); 503 while the database was down "
        f"(3 probes in {down_took:.2f} s), 200 again once it was back",
    )
