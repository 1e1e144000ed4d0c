"""Fault 7: the database drops the service's connections, as managed PostgreSQL does every day
(idle sessions reaped, restarts, failovers, compute suspended).

While the service is idle: its backends are terminated, or the server restarts; every request
afterwards succeeds, reads and writes. With requests in flight: the server restarts under a
load of batches; requests may fail with 503, none may hang, none may half-apply. A connection
that dies mid-request (a reset): the read is sent again on a fresh connection and succeeds; the
write is not (it might have reached the server) and is a 503 that changed nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from tests.conftest import AUTH, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import (
    ControlledPostgres,
    Outcome,
    TcpProxy,
    fetch_values,
    seed_rows,
    send,
)

pytestmark = pytest.mark.slow

ROWS = 120
POOL_SIZE = 4
POOL_TIMEOUT = 2.0
# What a request may take at most while the server restarts: a pool wait, a connect attempt and
# two busy cores.
BOUND_S = POOL_TIMEOUT + 3.0


async def terminate_service_backends(database: URL) -> int:
    """End every session of the service on `database`, as an idle-connection reaper does."""
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        ended: int = await connection.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    return ended


async def warm(client: httpx.AsyncClient) -> None:
    """Every pooled connection opened and used once."""
    for _ in range(3):
        answers = await asyncio.gather(
            *(client.get("/items?limit=5") for _ in range(POOL_SIZE)),
            client.get("/readyz"),
        )
        assert [a.status_code for a in answers] == [200] * (POOL_SIZE + 1)


async def mixed_requests(client: httpx.AsyncClient, rounds: int) -> list[Outcome]:
    """Reads, batches and inserts, four at a time, as in production."""
    outcomes: list[Outcome] = []
    for n in range(rounds):
        batch = [{"id": i, "value": float(n)} for i in range(1 + n % 10, ROWS, 10)]
        outcomes += await asyncio.gather(
            send(client, "list", "GET", f"/items?limit=20&after_id={n}"),
            send(client, "one", "GET", f"/items/{1 + n % ROWS}"),
            send(client, "patch", "PATCH", "/items", json=batch, headers=AUTH),
            send(client, "post", "POST", "/items", json=[{"name": f"n{n}", "value": 1}],
                 headers=AUTH),
        )  # fmt: skip
    return outcomes


@pytest.mark.parametrize("drop", ["terminate backends", "restart server"])
async def test_connections_dropped_while_idle_cost_no_request_an_error(
    controlled_postgres: ControlledPostgres, fault_database: URL, tmp_path: Path, drop: str
) -> None:
    await seed_rows(fault_database, ROWS)
    env = service_environment(
        fault_database,
        DB_POOL_SIZE=str(POOL_SIZE),
        DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        SHUTDOWN_DELAY_SECONDS="0",
    )
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            await warm(client)
            if drop == "terminate backends":
                assert await terminate_service_backends(fault_database) >= POOL_SIZE
            else:
                controlled_postgres.stop("fast")
                controlled_postgres.start()
            await asyncio.sleep(0.5)  # idle, as when the next request comes minutes later
            started = time.monotonic()
            outcomes = await mixed_requests(client, rounds=15)
            slowest = max(o.elapsed for o in outcomes)
            took = time.monotonic() - started
        log = service.log()
    failed = [o for o in outcomes if o.status not in (200, 201)]
    assert not failed, failed[:3]
    assert "Traceback" not in log
    record(
        "Fault 7",
        f"Stale connections: the service's backends dropped while it is idle ({drop}), then "
        "reads, PATCHes and POSTs, 4 at a time",
        len(outcomes),
        status_counts(o.status for o in outcomes),
        f"every request succeeded (slowest {slowest:.2f} s; {len(outcomes)} in {took:.1f} s); "
        "closed connections are replaced before a request gets them",
    )


async def test_a_restart_under_load_fails_fast_and_half_applies_nothing(
    controlled_postgres: ControlledPostgres, fault_database: URL, tmp_path: Path
) -> None:
    clients, rows_each = 6, ROWS // 6
    await seed_rows(fault_database, ROWS, value=-1.0)
    env = service_environment(
        fault_database,
        DB_POOL_SIZE=str(POOL_SIZE),
        DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
        SHUTDOWN_DELAY_SECONDS="0",
    )
    acknowledged = [-1] * clients
    attempted = [-1] * clients
    outcomes: list[Outcome] = []
    restart_done = asyncio.Event()
    after_restart: list[Outcome] = []

    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            await warm(client)

            async def writer(number: int) -> None:
                # Each client owns its rows and writes its sequence number into all of them.
                ids = range(1 + number * rows_each, 1 + (number + 1) * rows_each)
                for sequence in range(10_000):
                    if restart_done.is_set() and len(after_restart) >= 3 * clients:
                        return
                    attempted[number] = sequence
                    batch = [{"id": i, "value": float(sequence)} for i in ids]
                    outcome = await send(client, "patch", "PATCH", "/items", json=batch,
                                         headers=AUTH)  # fmt: skip
                    (after_restart if restart_done.is_set() else outcomes).append(outcome)
                    if outcome.status == 200:
                        acknowledged[number] = sequence
                    await asyncio.sleep(0.01)

            async def restart() -> None:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(controlled_postgres.stop, "immediate")
                await asyncio.sleep(0.5)
                await asyncio.to_thread(controlled_postgres.start)
                await asyncio.sleep(1.0)  # the pool notices; then every request must succeed
                restart_done.set()

            await asyncio.wait_for(
                asyncio.gather(restart(), *(writer(n) for n in range(clients))), timeout=60
            )
        log = service.log()

    everything = outcomes + after_restart
    assert all(o.status is not None for o in everything), "a request got no answer"
    slowest = max(o.elapsed for o in everything)
    assert slowest < BOUND_S, slowest
    assert {o.status for o in outcomes} <= {200, 503}, status_counts(o.status for o in outcomes)
    for outcome in everything:
        if outcome.status == 503:
            assert outcome.problem_json and outcome.retry_after == "1", outcome
            assert json.loads(outcome.body)["detail"], outcome
    assert [o.status for o in after_restart] == [200] * len(after_restart)
    values = await fetch_values(fault_database)
    for number in range(clients):
        held = {values[i] for i in range(1 + number * rows_each, 1 + (number + 1) * rows_each)}
        assert len(held) == 1, f"client {number}'s batch is half-applied: {sorted(held)}"
        (value,) = held
        assert acknowledged[number] <= value <= attempted[number], (number, value)
    assert "Traceback" not in log
    failed = sum(o.status == 503 for o in outcomes)
    record(
        "Fault 7",
        f"Restart under load: pg_ctl stop -m immediate and start while {clients} clients send "
        f"{rows_each}-row batches",
        len(everything),
        status_counts(o.status for o in everything),
        f"{failed} requests in the restart got 503 + Retry-After (slowest answer {slowest:.2f} s); "
        f"no batch half-applied, every acknowledged one kept; all {len(after_restart)} requests "
        "after the restart succeeded",
    )


async def test_a_connection_reset_mid_request_retries_reads_not_writes(
    fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, 10)
    proxy = TcpProxy(fault_database.port or 5432)
    async with proxy.running():
        env = service_environment(
            fault_database.set(port=proxy.port),
            DB_POOL_SIZE="1",
            DB_POOL_TIMEOUT=str(POOL_TIMEOUT),
            SHUTDOWN_DELAY_SECONDS="0",
        )
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                reads: list[Outcome] = []
                for path in ("/items?limit=5", "/items/3"):
                    assert (await client.get("/items?limit=1")).status_code == 200
                    proxy.cut_open_connections()
                    reads.append(await send(client, "read", "GET", path))
                assert (await client.get("/items?limit=1")).status_code == 200
                proxy.cut_open_connections()
                before = await fetch_values(fault_database)
                write = await send(client, "patch", "PATCH", "/items",
                                   json=[{"id": 3, "value": 33.0}], headers=AUTH)  # fmt: skip
                after = await fetch_values(fault_database)
                again = await send(client, "patch", "PATCH", "/items",
                                   json=[{"id": 3, "value": 33.0}], headers=AUTH)  # fmt: skip
            log = service.log()
    assert [r.status for r in reads] == [200, 200], reads
    assert json.loads(reads[1].body)["id"] == 3
    assert write.status == 503 and write.problem_json and write.retry_after == "1", write
    assert after == before, "the cut write changed the table"
    assert again.status == 200
    assert log.count("sent again") == 2, log
    assert "Traceback" not in log
    record(
        "Fault 7",
        "Connection reset mid-request: a proxy closes the pooled connection when the next "
        "statement arrives (reads, then a PATCH)",
        len(reads) + 2,
        status_counts([r.status for r in reads] + [write.status, again.status]),
        "the reads were sent again on a fresh connection (200); the PATCH, which may have "
        "reached the server, got 503 and changed nothing; resent, it succeeded",
    )
