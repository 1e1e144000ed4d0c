"""Fault 5: behind PgBouncer in transaction mode (as Neon's -pooler endpoints are).

On Debian's PgBouncer 1.18, which does not track prepared statements: with DB_PGBOUNCER=true a
concurrent mixed load of reads and batches has zero errors, no "prepared statement" error ever
appears and `/readyz`, asked all along, always answers 200; the same load without the setting
fails, which shows the setting is what makes the difference. And the fixtures themselves: the
modern PgBouncer (>= 1.21) carries asyncpg's own prepared statements where 1.18 breaks them.
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

from tests.conftest import AUTH, asyncpg_dsn, run_cli, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import (
    PREPARED_STATEMENTS_SINCE,
    ControlledPostgres,
    Outcome,
    PgBouncer,
    run_until,
    seed_rows,
    send,
)

pytestmark = pytest.mark.slow

ROWS = 200
WORKERS = 16
REQUESTS_PER_WORKER = 40


async def mixed_load(base_url: str) -> list[Outcome]:
    """Reads (list, threshold, one row) and writes (PATCH and POST batches) from 16 clients."""
    limits = httpx.Limits(max_connections=WORKERS)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def one_request(worker: int, sequence: int) -> Outcome:
            rng = random.Random(worker * 7919 + sequence)
            kind = (worker + sequence) % 5
            if kind == 0:
                return await send(
                    client, "read", "GET", f"/items?limit=20&after_id={rng.randint(0, ROWS)}"
                )
            if kind == 1:
                return await send(client, "read", "GET", f"/items?min_value={rng.random()}&limit=5")
            if kind == 2:
                return await send(client, "read", "GET", f"/items/{rng.randint(1, ROWS)}")
            if kind == 3:
                batch = [
                    {"id": i, "value": rng.random()} for i in rng.sample(range(1, ROWS + 1), 10)
                ]
                return await send(client, "write", "PATCH", "/items", json=batch, headers=AUTH)
            rows = [{"name": f"pooled-{worker}-{sequence}-{i}", "value": 1.0} for i in range(5)]
            return await send(client, "write", "POST", "/items", json=rows, headers=AUTH)

        return await run_until(asyncio.Event(), WORKERS, one_request, REQUESTS_PER_WORKER)


async def readiness_during(base_url: str) -> tuple[list[Outcome], list[int | None]]:
    """The mixed load, and the statuses of `/readyz` asked every 20 ms while it runs."""
    stop = asyncio.Event()
    statuses: list[int | None] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:

        async def poll() -> None:
            while not stop.is_set():
                statuses.append((await send(client, "readyz", "GET", "/readyz")).status)
                await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        try:
            outcomes = await mixed_load(base_url)
        finally:
            stop.set()
            await poller
    return outcomes, statuses


@pytest.mark.parametrize("pgbouncer_setting", [True, False], ids=["DB_PGBOUNCER=true", "unset"])
async def test_transaction_pooler_needs_the_pgbouncer_setting(
    controlled_postgres: ControlledPostgres,
    fault_database: URL,
    legacy_pgbouncer: PgBouncer,
    tmp_path: Path,
    pgbouncer_setting: bool,
) -> None:
    await seed_rows(fault_database, ROWS)
    pooled = legacy_pgbouncer.url(controlled_postgres, fault_database.database or "")
    overrides = {"SHUTDOWN_DELAY_SECONDS": "0", "DB_POOL_SIZE": "8"}
    if pgbouncer_setting:
        overrides["DB_PGBOUNCER"] = "true"
    else:
        # PgBouncer refuses the session limits' startup parameters outright (see the next
        # test); without these the service could not even connect, and the test would not
        # reach prepared statements.
        overrides.update(
            DB_STATEMENT_TIMEOUT_MS="0",
            DB_IDLE_IN_TRANSACTION_TIMEOUT_MS="0",
            DB_TCP_KEEPALIVES_IDLE="0",
            DB_TCP_KEEPALIVES_INTERVAL="0",
            DB_TCP_KEEPALIVES_COUNT="0",
        )
    with run_service(service_environment(pooled, **overrides), tmp_path) as service:
        outcomes, readiness = await readiness_during(service.base_url)
    log = service.log()
    statuses = status_counts(o.status for o in outcomes)
    failures = sum(1 for o in outcomes if o.status not in (200, 201))
    prepared_errors = log.count("prepared statement")
    if pgbouncer_setting:
        assert failures == 0, (statuses, log[-3000:])
        assert prepared_errors == 0, log[-3000:]
        # The probe's SELECT 1 too must be prepared and run on one server connection.
        assert readiness and set(readiness) == {200}, status_counts(readiness)
        did = (
            'zero errors; no "prepared statement" in the log; '
            f"/readyz 200 all {len(readiness)} times during the load"
        )
    else:
        assert failures > 0 and prepared_errors > 0, (statuses, prepared_errors)
        did = (
            f'{failures} failed requests, "prepared statement" {prepared_errors} times in the log: '
            "the setting is what makes it work"
        )
    record(
        "Fault 5",
        f"Transaction pooler: PgBouncer {legacy_pgbouncer.version_text} "
        "(pool_mode=transaction, 4 server connections), "
        f"{WORKERS} clients of mixed reads and PATCH/POST batches, "
        f"{'DB_PGBOUNCER=true' if pgbouncer_setting else 'DB_PGBOUNCER unset'}",
        len(outcomes),
        statuses,
        did,
    )


def test_a_pooler_the_settings_do_not_name_is_refused_with_the_setting_to_change(
    controlled_postgres: ControlledPostgres,
    fault_database: URL,
    legacy_pgbouncer: PgBouncer,
    tmp_path: Path,
) -> None:
    """Pointed at a pooler with DB_POOLER unset, migrate stops at once and says which setting
    to change, instead of retrying a connection the pooler will never accept."""
    pooled = legacy_pgbouncer.url(controlled_postgres, fault_database.database or "")
    started = time.monotonic()
    result = run_cli(service_environment(pooled), tmp_path, "migrate")
    took = time.monotonic() - started
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "a connection pooler refused the startup parameter" in lines[-1], result.stderr
    assert "DB_POOLER=transaction" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    record(
        "Fault 5",
        f"DB_POOLER unset, DATABASE_URL pointing at PgBouncer {legacy_pgbouncer.version_text}: "
        "migrate",
        1,
        status_counts([f"exit {result.returncode}"]),
        f"refused in {took:.1f} s with one line: {lines[-1].partition(': ')[2]!r}",
    )


CLIENTS = 8
STATEMENTS_PER_CLIENT = 50


async def prepared_statement_errors(dsn: str) -> list[str]:
    """8 plain asyncpg connections (statement cache on, as by default), 50 statements each, in
    autocommit: every statement is a transaction of its own, so PgBouncer may run each on another
    of its server connections. The "prepared statement" errors that came back."""

    async def client(number: int) -> list[str]:
        errors = []
        connection = await asyncpg.connect(dsn)
        try:
            for sequence in range(STATEMENTS_PER_CLIENT):
                # Four statements, each prepared once per client connection and then reused.
                sql = f"SELECT $1::int + {sequence % 4}"
                try:
                    assert await connection.fetchval(sql, number) == number + sequence % 4
                except asyncpg.PostgresError as exc:
                    if "prepared statement" not in str(exc):
                        raise
                    errors.append(str(exc))
        finally:
            await connection.close()
        return errors

    per_client = await asyncio.wait_for(asyncio.gather(*(client(n) for n in range(CLIENTS))), 30)
    return [error for errors in per_client for error in errors]


@pytest.mark.parametrize("bouncer_fixture", ["pgbouncer", "legacy_pgbouncer"])
async def test_modern_pgbouncer_tracks_prepared_statements(
    controlled_postgres: ControlledPostgres, request: pytest.FixtureRequest, bouncer_fixture: str
) -> None:
    bouncer: PgBouncer = request.getfixturevalue(bouncer_fixture)
    started = time.monotonic()
    errors = await prepared_statement_errors(
        asyncpg_dsn(bouncer.url(controlled_postgres, "postgres"))
    )
    elapsed = time.monotonic() - started
    statements = CLIENTS * STATEMENTS_PER_CLIENT
    if bouncer_fixture == "pgbouncer":
        assert bouncer.version >= PREPARED_STATEMENTS_SINCE, bouncer.version
        assert errors == [], (len(errors), errors[:3], bouncer.log()[-2000:])
    else:
        assert bouncer.version < PREPARED_STATEMENTS_SINCE, bouncer.version
        # The contrast that shows the modern fixture is what carries the statements.
        assert errors, f"{statements} statements through PgBouncer {bouncer.version}, no error"
    print(f"PgBouncer {bouncer.version}: {len(errors)} of {statements} failed in {elapsed:.1f} s")


def statements_per_transaction(
    bouncer: PgBouncer, postgres: ControlledPostgres, database: str
) -> tuple[int, int]:
    """(statements, transactions) PgBouncer has counted for `database` so far."""
    (row,) = [r for r in bouncer.show(postgres, "STATS") if r["database"] == database]
    return int(row["total_query_count"]), int(row["total_xact_count"])


async def test_fast_mode_keeps_prepared_statements_through_a_modern_pooler(
    controlled_postgres: ControlledPostgres,
    fault_database: URL,
    pgbouncer: PgBouncer,
    tmp_path: Path,
) -> None:
    """DB_POOLER=transaction through PgBouncer >= 1.21: the mixed load has zero errors and every
    read and batch is one statement in a transaction of its own (autocommit, nothing around it).
    (The service could not even connect before: PgBouncer refuses a statement_timeout startup
    parameter.)"""
    await seed_rows(fault_database, ROWS)
    database = fault_database.database or ""
    pooled = pgbouncer.url(controlled_postgres, database)
    env = service_environment(
        pooled, DB_POOLER="transaction", DB_POOL_SIZE="8", SHUTDOWN_DELAY_SECONDS="0"
    )
    with run_service(env, tmp_path) as service:
        before = statements_per_transaction(pgbouncer, controlled_postgres, database)
        outcomes, readiness = await readiness_during(service.base_url)
        after = statements_per_transaction(pgbouncer, controlled_postgres, database)
    log = service.log()
    statuses = status_counts(o.status for o in outcomes)
    failures = sum(1 for o in outcomes if o.status not in (200, 201))
    assert failures == 0, (statuses, log[-3000:])
    assert "prepared statement" not in log, log[-3000:]
    assert "transaction-unprepared" not in log, log[-3000:]
    assert readiness and set(readiness) == {200}, status_counts(readiness)
    statements, transactions = after[0] - before[0], after[1] - before[1]
    # Every request and probe was one statement, so PgBouncer saw no BEGIN or COMMIT.
    assert statements == transactions >= len(outcomes), (statements, transactions, len(outcomes))
    record(
        "Fault 5",
        f"Transaction pooler that keeps prepared statements: PgBouncer {pgbouncer.version_text} "
        "(pool_mode=transaction, max_prepared_statements=200, 4 server connections), "
        f"{WORKERS} clients of mixed reads and PATCH/POST batches, DB_POOLER=transaction",
        len(outcomes),
        statuses,
        f"zero errors; {statements} statements in {transactions} transactions (1 per request, "
        f"no BEGIN/COMMIT); /readyz 200 all {len(readiness)} times",
    )


async def test_fast_mode_on_an_old_pooler_falls_back_with_one_line(
    controlled_postgres: ControlledPostgres,
    fault_database: URL,
    legacy_pgbouncer: PgBouncer,
    tmp_path: Path,
) -> None:
    """DB_POOLER=transaction through PgBouncer 1.18, which does not keep prepared statements:
    one warning line at start-up, and the service serves as transaction-unprepared, with zero
    errors, instead of failing now and then with "prepared statement … does not exist"."""
    await seed_rows(fault_database, ROWS)
    pooled = legacy_pgbouncer.url(controlled_postgres, fault_database.database or "")
    env = service_environment(
        pooled, DB_POOLER="transaction", DB_POOL_SIZE="8", SHUTDOWN_DELAY_SECONDS="0"
    )
    with run_service(env, tmp_path) as service:
        outcomes, readiness = await readiness_during(service.base_url)
    log = service.log()
    statuses = status_counts(o.status for o in outcomes)
    failures = sum(1 for o in outcomes if o.status not in (200, 201))
    warnings = [
        line for line in log.splitlines() if "serving as DB_POOLER=transaction-unprepared" in line
    ]
    assert len(warnings) == 1, log[-3000:]
    assert failures == 0, (statuses, log[-3000:])
    assert readiness and set(readiness) == {200}, status_counts(readiness)
    record(
        "Fault 5",
        f"DB_POOLER=transaction through PgBouncer {legacy_pgbouncer.version_text}, which does not "
        f"keep prepared statements; {WORKERS} clients of mixed reads and batches",
        len(outcomes),
        statuses,
        "one warning line at start-up, then served as transaction-unprepared: zero errors",
    )
