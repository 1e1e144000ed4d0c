"""Connection lifetimes have one owner: after a burst the service holds DB_POOL_SIZE connections.

A burst that needs the overflow slots (PATCHes queued behind a row lock the test holds) opens
DB_POOL_SIZE + DB_MAX_OVERFLOW connections; once it is over, the overflow connections are
closed, and the light traffic that follows runs on the regular slots' connections without
opening a new one.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record
from tests.faults.support import seed_rows

pytestmark = pytest.mark.slow

POOL_SIZE = 2
MAX_OVERFLOW = 5
# The default; the database is this test's own, so only the service's sessions carry it.
APPLICATION_NAME = "playing-with-neon-service"
SERVICE_BACKENDS = (
    "SELECT pid, backend_start FROM pg_stat_activity "
    "WHERE datname = current_database() AND application_name = $1 ORDER BY pid"
)


async def service_backends(admin: asyncpg.Connection) -> list[tuple[int, object]]:
    """(pid, backend_start) of every session the service has open now."""
    return [tuple(row) for row in await admin.fetch(SERVICE_BACKENDS, APPLICATION_NAME)]


async def wait_for_backends(admin: asyncpg.Connection, count: int) -> list[tuple[int, object]]:
    """The service's sessions once there are `count` of them (5 s at most), else as they are."""
    for _ in range(50):
        backends = await service_backends(admin)
        if len(backends) == count:
            return backends
        await asyncio.sleep(0.1)
    return backends


async def test_overflow_connections_close_after_a_burst(
    fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, 10)
    env = service_environment(
        fault_database,
        DB_POOL_SIZE=str(POOL_SIZE),
        DB_MAX_OVERFLOW=str(MAX_OVERFLOW),
        SHUTDOWN_DELAY_SECONDS="0",
    )
    # pg_stat_activity is read outside any transaction: within one it is a snapshot.
    admin = await asyncpg.connect(asyncpg_dsn(fault_database))
    locker = await asyncpg.connect(asyncpg_dsn(fault_database))
    try:
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                lock = locker.transaction()
                await lock.start()
                await locker.execute("SELECT id FROM playing_with_neon WHERE id = 1 FOR UPDATE")
                burst = [
                    asyncio.create_task(
                        client.patch("/items", json=[{"id": 1, "value": n}], headers=AUTH)
                    )
                    for n in range(POOL_SIZE + MAX_OVERFLOW)
                ]
                during = await wait_for_backends(admin, POOL_SIZE + MAX_OVERFLOW)
                await lock.rollback()
                statuses = sorted(r.status_code for r in await asyncio.gather(*burst))
                assert statuses == [200] * (POOL_SIZE + MAX_OVERFLOW), statuses
                assert len(during) == POOL_SIZE + MAX_OVERFLOW, during

                after_burst = await wait_for_backends(admin, POOL_SIZE)
                assert len(after_burst) == POOL_SIZE, after_burst
                for _ in range(20):  # light traffic, one request at a time
                    assert (await client.get("/items?limit=5")).status_code == 200
                after_light = await service_backends(admin)
                # The same sessions served it: no connection was opened or closed.
                assert after_light == after_burst, (after_burst, after_light)
                metrics = (await client.get("/metrics")).text
    finally:
        await locker.close()
        await admin.close()
    assert f"db_pool_size {float(POOL_SIZE)}" in metrics or f"db_pool_size {POOL_SIZE}" in metrics
    record(
        "Pool",
        f"A burst of {POOL_SIZE + MAX_OVERFLOW} PATCHes queued behind a row lock, "
        f"DB_POOL_SIZE={POOL_SIZE}, DB_MAX_OVERFLOW={MAX_OVERFLOW}, then 20 reads one at a time",
        POOL_SIZE + MAX_OVERFLOW + 20,
        {"200": POOL_SIZE + MAX_OVERFLOW + 20},
        f"{len(during)} server sessions during the burst, {len(after_burst)} after it; the 20 "
        "reads ran on those same sessions (no connection opened or closed)",
    )
