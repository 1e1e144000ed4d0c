"""A committed write is answered as the write it was, never 503, with or without its token.

With a read replica configured, a write's answer carries a Consistency-Token that takes one more
statement (or, for a keyed write, one more lease) after the commit. When that step fails (the
network goes silent under it until the lease deadline, or no connection becomes free for it),
the write has committed already: a 503 would make a client resend an unkeyed POST and insert
its rows twice. The answer is the write's, without a token.
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
from tests.faults.support import TcpProxy, fetch_values, seed_rows

pytestmark = pytest.mark.slow

STATEMENT_TIMEOUT_MS = 1000
TOKEN_HEADER = "consistency-token"


async def test_a_write_committed_before_the_deadline_is_answered_as_applied(
    fault_database: URL, tmp_path: Path
) -> None:
    """The network goes silent as the token is asked for, after a write that waited on a lock
    for most of the statement timeout: the lease deadline fires during the token's statement.
    (The replica's health check, which asks the primary the same, goes silent too.)"""
    await seed_rows(fault_database, 5)
    proxy = TcpProxy(fault_database.port or 5432)
    locker = await asyncpg.connect(asyncpg_dsn(fault_database))
    async with proxy.running():
        env = service_environment(
            fault_database.set(port=proxy.port),
            DATABASE_READ_URL=fault_database.render_as_string(hide_password=False),
            DB_STATEMENT_TIMEOUT_MS=str(STATEMENT_TIMEOUT_MS),
            DB_POOL_SIZE="1",
            SHUTDOWN_DELAY_SECONDS="0",
        )
        try:
            with run_service(env, tmp_path) as service:
                async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                    lock = locker.transaction()
                    await lock.start()
                    await locker.execute("SELECT 1 FROM playing_with_neon WHERE id = 1 FOR UPDATE")
                    proxy.silent_from = b"pg_current_wal_lsn"
                    patch = asyncio.create_task(
                        client.patch("/items", json=[{"id": 1, "value": 7.5}], headers=AUTH)
                    )
                    await asyncio.sleep(0.6)  # most of the statement timeout
                    await lock.rollback()
                    answer = await patch
                    proxy.silent_from = None
                    after = await client.get("/items/1")
            log = service.log()  # once the service has ended: every line is written
        finally:
            await locker.close()
    assert answer.status_code == 200, (answer.status_code, answer.text, log[-2000:])
    assert answer.json() == {"updated": 1}
    assert TOKEN_HEADER not in answer.headers
    assert (await fetch_values(fault_database))[1] == 7.5
    assert after.status_code == 200 and after.json()["value"] == 7.5
    assert "no Consistency-Token" in log
    record(
        "Committed writes",
        "A PATCH that waited on a row lock for 0.6 s commits; the network goes silent as its "
        f"Consistency-Token is read, until the lease deadline (DB_STATEMENT_TIMEOUT_MS="
        f"{STATEMENT_TIMEOUT_MS} + 1 s)",
        2,
        {"200": 2},
        "answered 200 {updated: 1} without a token (the write had committed), not 503; the "
        "value is in the table",
    )


async def test_a_keyed_write_is_answered_when_no_connection_is_free_for_its_token(
    fault_database: URL, tmp_path: Path
) -> None:
    """One pooled connection: as the keyed write commits, a PATCH waiting for the connection
    takes it and blocks on a lock, so the keyed write's token lease times out."""
    await seed_rows(fault_database, 5)
    env = service_environment(
        fault_database,
        DATABASE_READ_URL=fault_database.render_as_string(hide_password=False),
        DB_POOL_SIZE="1",
        DB_POOL_TIMEOUT="0.5",
        SHUTDOWN_DELAY_SECONDS="0",
    )
    lockers = [await asyncpg.connect(asyncpg_dsn(fault_database)) for _ in (1, 2)]
    try:
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                locks = [locker.transaction() for locker in lockers]
                for row_id, (locker, lock) in enumerate(zip(lockers, locks, strict=True), 1):
                    await lock.start()
                    await locker.execute(
                        "SELECT 1 FROM playing_with_neon WHERE id = $1 FOR UPDATE", row_id
                    )
                keyed_headers = {**AUTH, "Idempotency-Key": "committed-keyed-write"}
                keyed = asyncio.create_task(
                    client.patch("/items", json=[{"id": 1, "value": 3.25}], headers=keyed_headers)
                )
                await asyncio.sleep(0.15)  # the keyed write holds the connection, waiting on row 1
                blocker = asyncio.create_task(
                    client.patch("/items", json=[{"id": 2, "value": 1.0}], headers=AUTH)
                )
                await asyncio.sleep(0.15)  # the blocker waits for the connection
                # The keyed write commits and hands the connection to the blocker, which waits
                # on row 2 for longer than the pool timeout: the token's lease finds none free.
                await locks[0].rollback()
                answer = await keyed
                await locks[1].rollback()
                blocked = await blocker
                replay = await client.patch(
                    "/items", json=[{"id": 1, "value": 3.25}], headers=keyed_headers
                )
            log = service.log()
    finally:
        for locker in lockers:
            await locker.close()
    assert answer.status_code == 200, (answer.status_code, answer.text, log[-2000:])
    assert answer.json() == {"updated": 1}
    assert TOKEN_HEADER not in answer.headers
    assert blocked.status_code == 200, blocked.text
    assert replay.status_code == 200 and replay.headers.get("idempotent-replayed") == "true"
    assert (await fetch_values(fault_database))[1] == 3.25
    record(
        "Committed writes",
        "A keyed PATCH commits while the only pooled connection goes to a PATCH that then waits "
        "on a lock for longer than DB_POOL_TIMEOUT=0.5 s, so no connection is free for the "
        "Consistency-Token",
        3,
        {"200": 3},
        "answered 200 {updated: 1} without a token, not 503; its replay 200 with "
        "Idempotent-Replayed",
    )
