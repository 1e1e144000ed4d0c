"""Fault 1: the database stops in the middle of a steady load and starts again.

While it is down every request that needs it gets 503 problem+json with Retry-After within the
pool timeout (no 500, no hang), /readyz is 503 and /healthz 200; once it is back, the very first
requests succeed, with the same service process.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from service.health import READINESS_MAX_AGE_SECONDS
from tests.conftest import AUTH, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import ControlledPostgres, Outcome, run_until, seed_rows, send

pytestmark = pytest.mark.slow

ROWS = 200
WORKERS = 4
POOL_TIMEOUT = 2.0
# What a 503 may take beyond the pool timeout: the connect attempt, scheduling, the test's own
# clients on two cores.
MARGIN = 1.0
UP_BEFORE, DOWN_FOR, UP_AFTER = 1.5, 4.0, 4.0


async def wait_ready(client: httpx.AsyncClient) -> None:
    """Wait (15 s at most) until /readyz says the service reaches its database."""
    for _ in range(150):
        if (await client.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the service never became ready")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_outage_is_503_then_recovers_without_restart(
    controlled_postgres: ControlledPostgres, fault_database: URL, tmp_path: Path, mode: str
) -> None:
    await seed_rows(fault_database, ROWS)
    env = service_environment(
        fault_database,
        DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        DB_POOL_SIZE="4",
        DB_MAX_OVERFLOW="2",
        SHUTDOWN_DELAY_SECONDS="0",
    )
    rng = random.Random(mode)
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=POOL_TIMEOUT + 10
        ) as client:
            await wait_ready(client)

            async def one_request(worker: int, sequence: int) -> Outcome:
                kind = sequence % 3
                if kind == 0:
                    after = rng.randint(0, ROWS)
                    return await send(client, "db", "GET", f"/items?limit=10&after_id={after}")
                if kind == 1:
                    return await send(client, "db", "GET", f"/items/{rng.randint(1, ROWS)}")
                batch = [
                    {"id": i, "value": worker * 10_000 + sequence}
                    for i in rng.sample(range(1, ROWS + 1), 5)
                ]
                return await send(client, "db", "PATCH", "/items", json=batch, headers=AUTH)

            stop = asyncio.Event()
            probes: list[Outcome] = []

            async def probe() -> None:
                while not stop.is_set():
                    probes.append(await send(client, "healthz", "GET", "/healthz"))
                    probes.append(await send(client, "readyz", "GET", "/readyz"))
                    await asyncio.sleep(0.2)

            load = asyncio.create_task(run_until(stop, WORKERS, one_request, 5_000, pause=0.01))
            prober = asyncio.create_task(probe())
            await asyncio.sleep(UP_BEFORE)
            down_at = time.monotonic()
            await asyncio.to_thread(controlled_postgres.stop, mode)
            stopped_at = time.monotonic()
            try:
                await asyncio.sleep(DOWN_FOR)
            finally:
                starting_at = time.monotonic()
                await asyncio.to_thread(controlled_postgres.start)
                up_at = time.monotonic()
            await asyncio.sleep(UP_AFTER)
            stop.set()
            outcomes = await load
            await prober
        # The same process served before, during and after: it never exited or restarted.
        assert service.process.poll() is None, "the service process died"
    log = service.log()

    def ok(o: Outcome) -> bool:
        return o.status is not None and o.status < 400

    # Nothing anywhere but success or 503: no 500, no dropped connection, no client timeout.
    assert all(o.status in (200, 503) for o in outcomes + probes if o.label != "healthz"), {
        (o.status, o.error) for o in outcomes if o.status not in (200, 503)
    }
    assert all(o.status == 200 for o in probes if o.label == "healthz")
    assert "unhandled error" not in log
    before = [o for o in outcomes if o.started + o.elapsed < down_at]
    assert before and all(ok(o) for o in before)
    during = [
        o for o in outcomes if o.started >= stopped_at and o.started + o.elapsed < starting_at
    ]
    assert len(during) >= 20, len(during)
    for o in during:
        assert o.status == 503 and o.problem_json and o.retry_after, (o.status, o.body)
        assert o.elapsed <= POOL_TIMEOUT + MARGIN, o.elapsed
    # A readiness answer may come from a check begun up to READINESS_MAX_AGE_SECONDS before the
    # stop had ended (pg_ctl stop waits for the server to go, and it answers until then).
    probes_down = [
        p
        for p in probes
        if p.started >= stopped_at + READINESS_MAX_AGE_SECONDS
        and p.started + p.elapsed < starting_at
    ]
    assert {p.status for p in probes_down if p.label == "readyz"} == {503}
    # Recovery: every request and probe that started once the database was back succeeded,
    # the first ones included (the README promises it: no stale pooled connection is used).
    # Readiness answers from a check at most READINESS_MAX_AGE_SECONDS old, which may have
    # begun just before the database was back.
    settled = up_at + READINESS_MAX_AGE_SECONDS
    after = [
        o for o in outcomes + probes if o.started >= (settled if o.label == "readyz" else up_at)
    ]
    assert after and [(o.label, o.status, o.body) for o in after if not ok(o)] == []
    # One log line per distinct failure (each cause once while it lasts), not one per request.
    failure_lines = [line for line in log.splitlines() if "database unavailable (" in line]
    distinct = {json.loads(line)["message"] for line in failure_lines}
    assert len(failure_lines) == len(distinct) <= 6, failure_lines
    first_after = min(o.started + o.elapsed for o in after if o.label == "db")
    recovery = first_after - up_at
    slowest_503 = max(o.elapsed for o in during)
    record(
        "Fault 1",
        f"Database outage: pg_ctl stop -m {mode} for {DOWN_FOR:.0f} s under {WORKERS} clients "
        f"(reads + PATCH), DB_POOL_TIMEOUT={POOL_TIMEOUT:.0f} s",
        len(outcomes) + len(probes),
        status_counts(o.status for o in outcomes + probes),
        f"while down: {len(during)} requests, all 503 problem+json with Retry-After, slowest "
        f"{slowest_503:.2f} s; /readyz 503, /healthz 200 throughout; no 500, same process; "
        f"{len(failure_lines)} log lines for {len(during)} failed requests (one per cause)",
        recovery,
    )
