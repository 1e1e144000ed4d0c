"""Fault 10: a pod frozen in the middle of a keyed write does not hold its key for ever.

Process A takes an Idempotency-Key, its UPDATE waits on a row lock, and A is frozen (SIGSTOP)
before it can finish its transaction: to PostgreSQL its session is alive and idle in a
transaction, holding the key's advisory lock. A second process retrying that key must get an
answer within DB_IDLE_IN_TRANSACTION_TIMEOUT_MS (and a margin), not 409 for ever: the server
ends the frozen session, which rolls its transaction back, and the retry applies the write.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import fetch_values, seed_rows

pytestmark = pytest.mark.slow

IDLE_IN_TRANSACTION_TIMEOUT_MS = 1000
# The retry's answer may come this much later than the timeout: the retries' own pace.
MARGIN_SECONDS = 2.0


async def test_a_frozen_pod_releases_its_key(fault_database: URL, tmp_path: Path) -> None:
    await seed_rows(fault_database, 5)
    env = service_environment(
        fault_database,
        DB_IDLE_IN_TRANSACTION_TIMEOUT_MS=str(IDLE_IN_TRANSACTION_TIMEOUT_MS),
        SHUTDOWN_DELAY_SECONDS="0",
    )
    headers = {**AUTH, "Idempotency-Key": "frozen-pod"}
    body = [{"id": 1, "value": 42.0}]
    locker = await asyncpg.connect(asyncpg_dsn(fault_database))
    statuses: list[int] = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with run_service(env, tmp_path / "a") as frozen, run_service(env, tmp_path / "b") as healthy:
        async with (
            httpx.AsyncClient(base_url=frozen.base_url, timeout=30) as client_a,
            httpx.AsyncClient(base_url=healthy.base_url, timeout=30) as client_b,
        ):
            lock = locker.transaction()
            await lock.start()
            await locker.execute("SELECT 1 FROM playing_with_neon WHERE id = 1 FOR UPDATE")
            first = asyncio.create_task(client_a.patch("/items", json=body, headers=headers))
            await asyncio.sleep(0.5)  # A holds the key and waits on the row
            os.kill(frozen.process.pid, signal.SIGSTOP)
            try:
                await lock.rollback()  # A's UPDATE completes; A cannot commit
                started = time.monotonic()
                while time.monotonic() - started < 10:
                    retry = await client_b.patch("/items", json=body, headers=headers)
                    statuses.append(retry.status_code)
                    if retry.status_code != 409:
                        break
                    await asyncio.sleep(0.2)
                answered_after = time.monotonic() - started
            finally:
                os.kill(frozen.process.pid, signal.SIGCONT)
            first_status = (await first).status_code
    await locker.close()
    bound = IDLE_IN_TRANSACTION_TIMEOUT_MS / 1000 + MARGIN_SECONDS
    assert statuses[-1] == 200, statuses
    assert answered_after < bound, (answered_after, bound)
    assert (await fetch_values(fault_database))[1] == 42.0
    record(
        "Fault 10",
        "A pod frozen (SIGSTOP) in the middle of a keyed PATCH, its key's lock held; a second "
        f"pod retries the key every 0.2 s, DB_IDLE_IN_TRANSACTION_TIMEOUT_MS="
        f"{IDLE_IN_TRANSACTION_TIMEOUT_MS}",
        len(statuses) + 1,
        status_counts([*statuses, first_status]),
        f"the retry was answered 200 after {answered_after:.2f} s (bound {bound:.1f} s), the "
        f"write applied once; the frozen pod, resumed, answered {first_status}",
    )
