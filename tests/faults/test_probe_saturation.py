"""Fault 8: readiness under a saturated pool, and under a flood of probes. Every pooled connection
is held by requests that wait on a row lock; /readyz must stay 200 while the database answers (a
probe queued behind the requests would take every pod out of the Service at once), and turn 503
when it does not. And 200 callers asking /readyz as fast as they can must neither slow the
kubelet's own probes nor reach the database more than once per readiness interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from service.health import READINESS_MAX_AGE_SECONDS
from tests.conftest import AUTH, PROJECT_ROOT, asyncpg_dsn, run_service, service_environment
from tests.faults.kubelet import PERIOD_SECONDS as KUBELET_PERIOD_SECONDS
from tests.faults.kubelet import TIMEOUT_SECONDS as KUBELET_TIMEOUT_SECONDS
from tests.faults.report import record, status_counts
from tests.faults.support import ControlledPostgres, Outcome, backends_gone, seed_rows, send

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


FLOOD_CALLERS = 200
FLOOD_SECONDS = 4.0
KUBELET_BOUND_SECONDS = 1.0
# While the database stops and starts, a check can wait for it until its own 1 s timeout, and
# under the flood the loop adds its own turns before and after (CI once measured 1.33 s): the bound
# is the kubelet's timeout, past which the probe would count as failed whatever it said.
KUBELET_BOUND_IN_OUTAGE_SECONDS = KUBELET_TIMEOUT_SECONDS
# Transactions that are not readiness checks: the service's start (its wait for the database,
# the expiry of idempotency keys) and this test's own stats reads.
OTHER_TRANSACTIONS = 25

TRANSACTIONS = (
    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
)


async def transactions_ended(database: URL) -> int:
    """Transactions the database has counted so far (a session's are counted when it ends)."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        return int(await connection.fetchval(TRANSACTIONS))
    finally:
        await connection.close()


async def flood_readiness(
    base_url: str, callers: int, stop: asyncio.Event, statuses: Counter[int]
) -> None:
    """`callers` keep-alive connections asking /readyz back to back until `stop`; each answer's
    status is counted in `statuses`.

    Raw HTTP/1.1 rather than httpx, so that the flood costs this process little and the server,
    not the client, is what is saturated.
    """
    host, port = base_url.removeprefix("http://").split(":")
    request = f"GET /readyz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()

    async def caller() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not stop.is_set():
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    int(line.partition(":")[2])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                statuses[int(lines[0].split()[1])] += 1
        finally:
            writer.close()

    await asyncio.gather(*(caller() for _ in range(callers)))


@contextlib.asynccontextmanager
async def flooded(base_url: str) -> AsyncIterator[tuple[Counter[int], list[Outcome]]]:
    """While the block runs, FLOOD_CALLERS flood /readyz and a kubelet (tests.faults.kubelet, a
    process of its own) probes it; yields the flood's status counts and the kubelet's probes,
    complete once the block has ended."""
    statuses: Counter[int] = Counter()
    kubelet: list[Outcome] = []
    prober = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.faults.kubelet",
        f"{base_url}/readyz",
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert prober.stdout is not None
    # The block starts once the kubelet probes: a loaded machine can take a second to start
    # the process, and a test timing the database's stop from the block's start needs probes
    # from before it.
    first = await prober.stdout.readline()
    try:
        stop = asyncio.Event()
        flood = asyncio.create_task(flood_readiness(base_url, FLOOD_CALLERS, stop, statuses))
        try:
            yield statuses, kubelet
        finally:
            stop.set()
            await flood
    finally:
        prober.terminate()
        output, _ = await prober.communicate()
        for line in (first + output).decode().splitlines():
            started, elapsed, status = json.loads(line)
            kubelet.append(Outcome("kubelet", started, elapsed, status))


async def test_a_flood_of_readiness_probes_neither_slows_the_kubelet_nor_reaches_the_database(
    fault_database: URL, tmp_path: Path
) -> None:
    env = service_environment(fault_database, SHUTDOWN_DELAY_SECONDS="0")
    before = await transactions_ended(fault_database)
    with run_service(env, tmp_path) as service:
        async with flooded(service.base_url) as (flood, kubelet):
            await asyncio.sleep(FLOOD_SECONDS)
    await backends_gone(fault_database)  # their transactions are counted once they end
    checks = await transactions_ended(fault_database) - before

    calls = sum(flood.values())
    slowest = max(p.elapsed for p in kubelet)
    seen = (
        f"flood: {dict(flood)}; kubelet: {dict(status_counts(p.status for p in kubelet))}, "
        f"slowest {slowest:.3f} s; {checks} database transactions"
    )
    assert calls >= 5 * FLOOD_CALLERS, seen
    assert len(kubelet) >= FLOOD_SECONDS / 2 / KUBELET_PERIOD_SECONDS, seen
    assert [p.status for p in kubelet] == [200] * len(kubelet), seen
    assert slowest < KUBELET_BOUND_SECONDS, seen
    assert dict(flood) == {200: calls}, seen  # the flood does not make the pod look unready
    assert checks <= FLOOD_SECONDS / READINESS_MAX_AGE_SECONDS + OTHER_TRANSACTIONS, seen
    record(
        "Fault 8",
        f"Readiness flood: {FLOOD_CALLERS} keep-alive callers asking /readyz back to back for "
        f"{FLOOD_SECONDS:g} s, and a kubelet probing every {KUBELET_PERIOD_SECONDS:g} s on a new "
        "connection",
        calls + len(kubelet),
        status_counts([p.status for p in kubelet] + list(flood.elements())),
        f"all {len(kubelet)} kubelet probes 200, slowest {slowest:.3f} s (bound "
        f"{KUBELET_BOUND_SECONDS:g} s); {calls} flood probes answered by {checks} database "
        f"transactions in all (start-up included)",
    )


async def test_under_a_flood_readiness_follows_the_database_within_its_interval(
    controlled_postgres: ControlledPostgres, fault_database: URL, tmp_path: Path
) -> None:
    env = service_environment(fault_database, SHUTDOWN_DELAY_SECONDS="0")
    with run_service(env, tmp_path) as service:
        async with flooded(service.base_url) as (flood, kubelet):
            await asyncio.sleep(1.0)
            stopping = time.monotonic()
            await asyncio.to_thread(controlled_postgres.stop, "fast")
            down = time.monotonic()
            await asyncio.sleep(1.5)
            starting = time.monotonic()
            await asyncio.to_thread(controlled_postgres.start)
            up = time.monotonic()
            await asyncio.sleep(1.5)

    # An answer is at most READINESS_MAX_AGE_SECONDS old, so once that long has passed since
    # the server stopped, no check made while it was up may answer any more.
    before = [p.status for p in kubelet if p.started + p.elapsed < stopping]
    while_down = [
        p.status
        for p in kubelet
        if p.started >= down + READINESS_MAX_AGE_SECONDS and p.started + p.elapsed < starting
    ]
    after = [p.status for p in kubelet if p.started >= up + 1.0]
    slowest = max(p.elapsed for p in kubelet)
    seen = f"before {before}, down {while_down}, after {after}; slowest {slowest:.3f} s"
    assert before and set(before) == {200}, seen
    assert while_down and set(while_down) == {503}, seen
    assert after and set(after) == {200}, seen
    assert None not in {p.status for p in kubelet}, seen  # every probe answered in time
    assert slowest < KUBELET_BOUND_IN_OUTAGE_SECONDS, seen
    record(
        "Fault 8",
        f"Readiness flood ({FLOOD_CALLERS} callers) with the database stopped (pg_ctl stop -m "
        f"fast) for 1.5 s, the kubelet probing every {KUBELET_PERIOD_SECONDS:g} s",
        sum(flood.values()) + len(kubelet),
        status_counts([p.status for p in kubelet] + list(flood.elements())),
        f"kubelet: 200 before, 503 from {READINESS_MAX_AGE_SECONDS:g} s after the stop, 200 "
        f"again within 1 s of the start; slowest probe {slowest:.3f} s (bound "
        f"{KUBELET_BOUND_IN_OUTAGE_SECONDS:g} s, the kubelet's timeout)",
    )
