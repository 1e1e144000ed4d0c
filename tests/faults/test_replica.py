"""Fault 9: reads on a streaming read replica (DATABASE_READ_URL), and its failures.

A primary and a streaming replica of it (pg_basebackup -R), both real servers of this module's
own. Reads go to the replica; a read with a write's Consistency-Token sees that write even while
the replica's replay is paused, and also behind a round-robin balancer over two replicas, one of
them paused; a replica pool kept busy by reads waiting for replay sends the others to the
primary within the consistency wait; the replica stopped under load costs no read an error; the
primary stopped leaves token-less reads answered by the replica and writes 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import URL

from service.config import Settings
from service.migrate import upgrade_to_head
from service.replica import CHECK_INTERVAL_SECONDS
from tests.conftest import AUTH, asyncpg_dsn, fresh_database, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import (
    LEGACY_PGBOUNCER,
    ControlledPostgres,
    Outcome,
    PgBouncer,
    TcpBalancer,
    modern_pgbouncer,
    primary_with_replica,
    run_until,
    seed_rows,
    send,
)

pytestmark = pytest.mark.slow

ROWS = 100
WORKERS = 4
POOL_TIMEOUT = 2.0
CATCH_UP_SECONDS = 15.0
# The service's sessions whose last statement was one of its reads.
READ_POOL_SESSIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
    "'playing-with-neon-service' AND query LIKE 'SELECT id, name%'"
)


@dataclasses.dataclass
class Replicated:
    """A migrated database on the primary, and the same database on its streaming replica."""

    primary: ControlledPostgres
    replica: ControlledPostgres
    url: URL
    replica_url: URL


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[ControlledPostgres, ControlledPostgres]]:
    """A primary and its streaming replica, for this module alone (its tests stop both)."""
    with primary_with_replica() as servers:
        yield servers


@pytest.fixture(scope="module")
def second_replica(
    servers: tuple[ControlledPostgres, ControlledPostgres],
) -> Iterator[ControlledPostgres]:
    """Another streaming replica of the same primary, for the tests of a balanced reader."""
    replica = servers[0].create_replica()
    try:
        yield replica
    finally:
        replica.destroy()


@pytest.fixture
async def replicated(
    servers: tuple[ControlledPostgres, ControlledPostgres],
) -> AsyncIterator[Replicated]:
    """A fresh migrated database with ROWS rows, replayed on the replica; both servers run again
    afterwards and the replica replays."""
    primary, replica = servers
    for server in servers:
        if not server.is_running():
            server.start()
    async with fresh_database(primary.url(), prefix="replica") as url:
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url, auth_disabled=True))
        await seed_rows(url, ROWS)
        setup = Replicated(primary, replica, url, replica.url(url.database or ""))
        await caught_up(setup)
        try:
            yield setup
        finally:
            for server in servers:
                if not server.is_running():
                    server.start()
            await on_replica(setup, "SELECT pg_wal_replay_resume()")


async def on_replica(setup: Replicated, sql: str, replica: URL | None = None) -> Any:
    """One statement on the replica (or on `replica`), through a connection of the test's own."""
    connection = await asyncpg.connect(asyncpg_dsn(replica or setup.replica_url))
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


async def caught_up(setup: Replicated, replica: URL | None = None) -> None:
    """Wait until the replica (or `replica`) has replayed everything the primary has written."""
    primary = await asyncpg.connect(asyncpg_dsn(setup.url))
    try:
        position = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
    finally:
        await primary.close()
    deadline = time.monotonic() + CATCH_UP_SECONDS
    while time.monotonic() < deadline:
        try:
            replayed = f"SELECT pg_last_wal_replay_lsn() >= '{position}'::pg_lsn"
            if await on_replica(setup, replayed, replica):
                return
        except (OSError, asyncpg.PostgresError):
            pass  # the database itself may not be replayed yet, or the replica is starting
        await asyncio.sleep(0.05)
    raise AssertionError(f"the replica did not replay {position} within {CATCH_UP_SECONDS} s")


def environment(setup: Replicated, read_url: URL | None = None, **overrides: str) -> dict[str, str]:
    defaults = {
        "DATABASE_READ_URL": (read_url or setup.replica_url).render_as_string(hide_password=False),
        "DB_POOL_TIMEOUT": str(POOL_TIMEOUT),
        "DB_POOL_SIZE": "4",
        "DB_READ_POOL_SIZE": "4",
        "SHUTDOWN_DELAY_SECONDS": "0",
    }
    return service_environment(setup.url, **{**defaults, **overrides})


async def reads_by_target(client: httpx.AsyncClient) -> dict[str, float]:
    """The service's db_reads_total counters, by target."""
    text = (await client.get("/metrics")).text
    found = re.findall(r'^db_reads_total\{target="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {target: float(value) for target, value in found}


async def value_of(client: httpx.AsyncClient, item_id: int, token: str | None = None) -> float:
    headers = {"Consistency-Token": token} if token is not None else {}
    response = await client.get(f"/items/{item_id}", headers=headers)
    assert response.status_code == 200, response.text
    return float(response.json()["value"])


async def test_reads_are_served_by_the_replica(replicated: Replicated, tmp_path: Path) -> None:
    with run_service(environment(replicated), tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            for item_id in range(1, 21):
                assert await value_of(client, item_id) == 0.0
            page = await client.get("/items?limit=5")
            assert [item["id"] for item in page.json()["items"]] == [1, 2, 3, 4, 5]
            reads = await reads_by_target(client)
            metrics = (await client.get("/metrics")).text
            write = await client.patch("/items", json=[{"id": 1, "value": 1.5}], headers=AUTH)
            malformed = await client.get("/items/1", headers={"Consistency-Token": "0/16B3"})
            on_replica_count = await on_replica(replicated, READ_POOL_SESSIONS)
            primary = await asyncpg.connect(asyncpg_dsn(replicated.url))
            try:
                on_primary_count = await primary.fetchval(READ_POOL_SESSIONS)
            finally:
                await primary.close()
    assert reads == {"replica": 21, "primary": 0, "fallback": 0}
    assert "db_replica_max_lag_seconds 5.0" in metrics  # READ_MAX_LAG_MS's default
    assert "db_replica_healthy 1.0" in metrics
    assert write.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{16}", write.headers["consistency-token"])
    assert malformed.status_code == 400
    assert malformed.headers["content-type"].startswith("application/problem+json")
    # The replica's own view: the service's read pool ran the reads there, not on the primary.
    assert on_replica_count >= 1
    assert on_primary_count == 0
    record(
        "Fault 9",
        "Read replica configured (DATABASE_READ_URL, a streaming replica): 21 reads, a write, "
        "a malformed Consistency-Token",
        23,
        {200: 22, 400: 1},
        "every read served by the replica (its pg_stat_activity shows the read pool's SELECTs, "
        "the primary's none); the write answered a Consistency-Token; the malformed token 400",
    )


async def test_a_token_read_sees_the_write_while_replay_is_paused(
    replicated: Replicated, tmp_path: Path
) -> None:
    # The paused replica falls behind; a generous lag limit keeps it serving token-less reads.
    env = environment(replicated, READ_MAX_LAG_MS="60000", READ_CONSISTENCY_WAIT_MS="200")
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            await on_replica(replicated, "SELECT pg_wal_replay_pause()")
            write = await client.patch("/items", json=[{"id": 7, "value": 42.0}], headers=AUTH)
            assert write.status_code == 200, write.text
            token = write.headers["consistency-token"]
            before = await reads_by_target(client)
            started = time.monotonic()
            with_token = await value_of(client, 7, token)
            waited = time.monotonic() - started
            without_token = await value_of(client, 7)
            paused = await reads_by_target(client)
            await on_replica(replicated, "SELECT pg_wal_replay_resume()")
            await caught_up(replicated)
            after_resume = await value_of(client, 7, token)
            resumed = await reads_by_target(client)
            # A keyed write carries a token too, applied and replayed, and its token works alike.
            keyed_headers = {**AUTH, "Idempotency-Key": "replica-test-key"}
            await on_replica(replicated, "SELECT pg_wal_replay_pause()")
            keyed = [
                await client.patch("/items", json=[{"id": 8, "value": 43.0}], headers=keyed_headers)
                for _ in range(2)
            ]
            keyed_read = await value_of(client, 8, keyed[1].headers["consistency-token"])
            await on_replica(replicated, "SELECT pg_wal_replay_resume()")
    assert with_token == 42.0, "a read with the write's token saw an older value"
    assert waited >= 0.2, waited  # it waited for the replica before asking the primary
    assert without_token == 0.0, "a token-less read should be served by the paused replica"
    assert paused["primary"] - before["primary"] == 1
    assert paused["replica"] - before["replica"] == 1
    assert after_resume == 42.0
    assert resumed["replica"] - paused["replica"] == 1, "served by the replica once it replayed"
    assert resumed["primary"] == paused["primary"]
    assert [k.status_code for k in keyed] == [200, 200]
    assert keyed[1].headers["idempotent-replayed"] == "true"
    assert all(re.fullmatch(r"[0-9a-f]{16}", k.headers["consistency-token"]) for k in keyed)
    assert keyed_read == 43.0, "a read with a keyed write's token saw an older value"
    record(
        "Fault 9",
        "Replica replay paused (pg_wal_replay_pause), then a PATCH; reads with and without its "
        "Consistency-Token; replay resumed",
        4,
        {200: 4},
        f"the token read saw the new value from the primary after {waited * 1000:.0f} ms "
        "(READ_CONSISTENCY_WAIT_MS=200); the token-less read the old value from the replica; "
        "after the resume the token read was served by the replica",
    )


BALANCED_ROUNDS = 160
BALANCED_CLIENTS = 8


# Through PgBouncer, the old mode on Debian's 1.18 and the fast one (DB_POOLER=transaction) on a
# PgBouncer >= 1.21, which the primary's URL goes through too: the mode is the same for both.
POOLERS = {
    "haproxy": None,
    "pgbouncer-unprepared-over-haproxy": "transaction-unprepared",
    "pgbouncer-fast-over-haproxy": "transaction",
}


@pytest.mark.parametrize("pooler", list(POOLERS.values()), ids=list(POOLERS))
async def test_token_reads_see_their_write_behind_a_balanced_reader(
    replicated: Replicated, second_replica: ControlledPostgres, tmp_path: Path, pooler: str | None
) -> None:
    # An RDS reader endpoint, a CloudNativePG -ro Service: each connection to the read URL may
    # reach either replica, and one of them has stopped replaying.
    binary = modern_pgbouncer() if pooler == "transaction" else LEGACY_PGBOUNCER
    if pooler and (binary is None or not os.access(binary, os.X_OK)):
        pytest.skip(f"no PgBouncer for DB_POOLER={pooler} (see tests/build-pgbouncer.sh)")
    paused = second_replica.url(replicated.url.database or "")
    await caught_up(replicated, paused)
    balancer = TcpBalancer.start([replicated.replica.port, second_replica.port])
    bouncers = []
    if pooler and binary:
        bouncers.append(PgBouncer.start(replicated.replica, binary, upstream_port=balancer.port))
    if pooler == "transaction" and binary:
        bouncers.append(PgBouncer.start(replicated.primary, binary))
    stale: list[tuple[int, float, float]] = []
    try:
        read_url = replicated.replica_url.set(port=(bouncers[0] if bouncers else balancer).port)
        env = environment(
            replicated,
            read_url,
            READ_MAX_LAG_MS="60000",
            READ_CONSISTENCY_WAIT_MS="100",
            **({"DB_POOLER": pooler} if pooler else {}),
        )
        if pooler == "transaction":
            env["DATABASE_URL"] = replicated.url.set(port=bouncers[1].port).render_as_string(
                hide_password=False
            )
        await on_replica(replicated, "SELECT pg_wal_replay_pause()", paused)
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:

                async def writes_then_reads(item_id: int) -> None:
                    for round_ in range(1, BALANCED_ROUNDS // BALANCED_CLIENTS + 1):
                        value = float(round_)
                        batch = [{"id": item_id, "value": value}]
                        write = await client.patch("/items", json=batch, headers=AUTH)
                        assert write.status_code == 200, write.text
                        seen = await value_of(client, item_id, write.headers["consistency-token"])
                        if seen != value:
                            stale.append((item_id, value, seen))

                await asyncio.gather(
                    *(writes_then_reads(n) for n in range(1, BALANCED_CLIENTS + 1))
                )
                reads = await reads_by_target(client)
    finally:
        await on_replica(replicated, "SELECT pg_wal_replay_resume()", paused)
        for bouncer in bouncers:
            bouncer.stop()
        balancer.stop()
    assert not stale, (
        f"{len(stale)} of {BALANCED_ROUNDS} reads with their write's token saw an older value "
        f"(item, written, seen): {stale[:5]}"
    )
    # Both replicas were reached: the paused one's reads waited, then went to the primary.
    # A replica check slower than its 1 s on a loaded machine sends a read to the primary as a
    # fallback: still the primary, still its write.
    assert reads["replica"] > 0 and reads["primary"] + reads.get("fallback", 0) > 0, reads
    assert sum(reads.values()) == BALANCED_ROUNDS, reads
    via = f"PgBouncer (DB_POOLER={pooler}) over HAProxy" if pooler else "HAProxy"
    record(
        "Fault 9",
        f"Two streaming replicas behind {via} round robin as DATABASE_READ_URL, replay paused on "
        f"one; {BALANCED_CLIENTS} clients each PATCH then GET with the write's Consistency-Token",
        2 * BALANCED_ROUNDS,
        {200: 2 * BALANCED_ROUNDS},
        f"{BALANCED_ROUNDS} of {BALANCED_ROUNDS} token reads saw their write: "
        f"{reads['replica']:.0f} served by a replica that had replayed it, "
        f"{reads['primary']:.0f} by the primary after READ_CONSISTENCY_WAIT_MS=100"
        + (
            f", {reads['fallback']:.0f} by the primary as a fallback"
            if reads.get("fallback")
            else ""
        ),
    )


async def test_a_busy_replica_pool_sends_reads_to_the_primary_within_the_wait(
    replicated: Replicated, tmp_path: Path
) -> None:
    # One replica connection, held by token reads that wait for a paused replay: a read without
    # a token must not queue for DB_POOL_TIMEOUT (5 s here) before the primary answers it.
    wait = 0.5
    env = environment(
        replicated,
        DB_READ_POOL_SIZE="1",
        DB_POOL_TIMEOUT="5",
        READ_MAX_LAG_MS="60000",
        READ_CONSISTENCY_WAIT_MS=str(int(wait * 1000)),
    )
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            await on_replica(replicated, "SELECT pg_wal_replay_pause()")
            write = await client.patch("/items", json=[{"id": 9, "value": 9.5}], headers=AUTH)
            token = write.headers["consistency-token"]
            stop = asyncio.Event()

            async def token_read(worker: int, sequence: int) -> Outcome:
                headers = {"Consistency-Token": token}
                return await send(client, "token", "GET", "/items/9", headers=headers)

            holders = asyncio.create_task(run_until(stop, 12, token_read, 1000))
            await asyncio.sleep(2 * wait)  # the slot is taken and reads queue for it
            plain = await send(client, "plain", "GET", "/items/9")
            stop.set()
            held = await holders
            await on_replica(replicated, "SELECT pg_wal_replay_resume()")
    # Waiting for a replica connection counts against the wait: then the primary answers. (The
    # connection may also come free in time, and the replica answer it with the old value.)
    assert plain.status == 200, plain.body
    assert plain.elapsed <= wait + 1.0, f"answered after {plain.elapsed:.2f} s"
    assert held and all(o.status == 200 and json.loads(o.body)["value"] == 9.5 for o in held)
    slowest = max(o.elapsed for o in held)
    assert slowest <= wait + 1.0, f"a token read took {slowest:.2f} s"
    served_by = "primary" if json.loads(plain.body)["value"] == 9.5 else "replica"
    record(
        "Fault 9",
        "Replica pool of 1 held by 12 clients' token reads waiting for a paused replay "
        "(READ_CONSISTENCY_WAIT_MS=500, DB_POOL_TIMEOUT=5), then a read without a token",
        len(held) + 1,
        status_counts([*(o.status for o in held), plain.status]),
        f"the token-less read answered by the {served_by} after {plain.elapsed * 1000:.0f} ms; "
        f"the slowest of {len(held)} token reads {slowest * 1000:.0f} ms, each saw the write",
    )


async def test_replica_stopped_under_load_costs_no_read(
    replicated: Replicated, tmp_path: Path
) -> None:
    with run_service(environment(replicated), tmp_path) as service:
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=POOL_TIMEOUT + 10
        ) as client:

            async def one_request(worker: int, sequence: int) -> Outcome:
                item_id = (worker * 31 + sequence) % ROWS + 1
                if sequence % 2:
                    return await send(client, "read", "GET", f"/items/{item_id}")
                return await send(client, "read", "GET", f"/items?limit=10&after_id={item_id}")

            stop = asyncio.Event()
            load = asyncio.create_task(run_until(stop, WORKERS, one_request, 20_000, pause=0.005))
            await asyncio.sleep(1.5)
            stopping_at = time.monotonic()
            await asyncio.to_thread(replicated.replica.stop, "fast")
            stopped_at = time.monotonic()
            await asyncio.sleep(1.5)
            ready_while_down = (await client.get("/readyz")).status_code
            fallback_while_down = await reads_by_target(client)
            await asyncio.sleep(1.5)
            starting_at = time.monotonic()
            await asyncio.to_thread(replicated.replica.start)
            up_at = time.monotonic()
            back_at = None
            replica_reads = (await reads_by_target(client))["replica"]
            while time.monotonic() - up_at < 15:
                await asyncio.sleep(0.05)
                now = (await reads_by_target(client))["replica"]
                if now > replica_reads:
                    back_at = time.monotonic()
                    break
            await asyncio.sleep(0.5)
            stop.set()
            outcomes = await load
            final = await reads_by_target(client)
        assert service.process.poll() is None
    errors = [(o.status, o.error, o.body) for o in outcomes if o.status != 200]
    assert errors == [], errors[:5]
    assert ready_while_down == 200, "replica trouble must not make the service unready"
    assert fallback_while_down["fallback"] > 0
    assert back_at is not None, "reads never returned to the replica"
    during = [
        o for o in outcomes if o.started >= stopped_at and o.started + o.elapsed < starting_at
    ]
    assert len(during) >= 20, len(during)
    around = [o for o in outcomes if stopping_at - 1 <= o.started <= starting_at]
    slowest = max(o.elapsed for o in around)
    record(
        "Fault 9",
        f"Read replica stopped (pg_ctl stop -m fast) for 3 s under {WORKERS} reading clients, "
        "then started again",
        len(outcomes),
        status_counts(o.status for o in outcomes),
        f"0 read errors: {final['fallback']:.0f} reads served by the primary as a fallback "
        f"({len(during)} while the replica was down), slowest read around the stop "
        f"{slowest * 1000:.0f} ms; /readyz 200 throughout; reads back on the replica "
        f"{back_at - up_at:.2f} s after it was up",
        back_at - up_at,
    )


async def test_primary_stopped_reads_from_replica_writes_503(
    replicated: Replicated, tmp_path: Path
) -> None:
    with run_service(environment(replicated), tmp_path) as service:
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=POOL_TIMEOUT + 10
        ) as client:
            assert await value_of(client, 3) == 0.0
            await asyncio.to_thread(replicated.primary.stop, "fast")
            outcomes: list[Outcome] = []
            deadline = time.monotonic() + 2.0
            sequence = 0
            while time.monotonic() < deadline:
                sequence += 1
                outcomes.append(await send(client, "read", "GET", f"/items/{sequence % ROWS + 1}"))
                outcomes.append(await send(client, "read", "GET", "/items?limit=3"))
                batch = [{"id": sequence % ROWS + 1, "value": 2.0}]
                outcomes.append(
                    await send(client, "write", "PATCH", "/items", json=batch, headers=AUTH)
                )
            ready_while_down = (await client.get("/readyz")).status_code
            await asyncio.to_thread(replicated.primary.start)
            up_at = time.monotonic()
            first_write = None
            while time.monotonic() - up_at < 10:
                response = await client.patch(
                    "/items", json=[{"id": 1, "value": 3.0}], headers=AUTH
                )
                if response.status_code == 200:
                    first_write = time.monotonic() - up_at
                    break
                await asyncio.sleep(0.05)
    reads = [o for o in outcomes if o.label == "read"]
    writes = [o for o in outcomes if o.label == "write"]
    assert reads and all(o.status == 200 for o in reads), {(o.status, o.body) for o in reads}
    assert writes and all(o.status == 503 and o.retry_after for o in writes), {
        (o.status, o.body) for o in writes
    }
    assert ready_while_down == 503
    assert first_write is not None and first_write <= 2.0, first_write
    record(
        "Fault 9",
        "Primary stopped (pg_ctl stop -m fast) for 2 s with the replica up: token-less reads "
        "and PATCHes, then the primary started again",
        len(outcomes) + 1,
        status_counts([*(o.status for o in outcomes), 200]),
        f"{len(reads)} reads all 200 from the replica; {len(writes)} writes all 503 with "
        f"Retry-After; /readyz 503 (it follows the primary); the first write after the restart "
        f"succeeded {first_write:.2f} s after the primary was up",
        first_write,
    )


def replica_log_lines(log: str) -> list[str]:
    """The messages the service's replica logger wrote (JSON log lines)."""
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [r["message"] for r in records if r.get("logger") == "service.replica"]


async def driver_message(url: URL, sql: str) -> str:
    """What the driver itself says when `sql` fails on `url` (connecting included)."""
    try:
        connection = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            await connection.fetchval(sql)
        finally:
            await connection.close()
    except (OSError, asyncpg.PostgresError) as exc:
        return str(exc)
    raise AssertionError(f"{sql} did not fail on {url.database}")


async def test_a_failed_replica_read_is_logged_without_the_drivers_message(
    replicated: Replicated, tmp_path: Path
) -> None:
    # A "replica" that answers its health check but has no table: every read there fails.
    async with fresh_database(replicated.primary.url(), prefix="unmigrated") as empty:
        env = {
            **environment(replicated),
            "DATABASE_READ_URL": empty.render_as_string(hide_password=False),
        }
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
                deadline = time.monotonic() + 10
                while (await reads_by_target(client))["fallback"] == 0:
                    assert time.monotonic() < deadline, "no read ever tried the replica"
                    assert await value_of(client, 5) == 0.0  # served by the primary
                    await asyncio.sleep(0.1)
        said = await driver_message(empty, "SELECT id FROM playing_with_neon WHERE id = 5")
    lines = [line for line in replica_log_lines(service.log()) if "a read failed" in line]
    assert lines, service.log()
    assert said not in lines[0]
    assert "[SQL" not in lines[0] and "parameters" not in lines[0], lines[0]
    assert "the table does not exist" in lines[0], lines[0]


async def test_a_stopped_replica_is_logged_without_the_drivers_message(
    replicated: Replicated, tmp_path: Path
) -> None:
    with run_service(environment(replicated), tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
            deadline = time.monotonic() + 10
            while (await reads_by_target(client))["replica"] == 0:
                assert time.monotonic() < deadline, "the replica never became healthy"
                await value_of(client, 5)
                await asyncio.sleep(0.1)
            await asyncio.to_thread(replicated.replica.stop, "fast")
            # No reads meanwhile: the background check is the one to find the replica gone.
            await asyncio.sleep(3 * CHECK_INTERVAL_SECONDS)
    said = await driver_message(replicated.replica_url, "SELECT 1")
    lines = [line for line in replica_log_lines(service.log()) if "goes" in line or "go to" in line]
    down = [line for line in lines if "primary" in line]
    assert down, service.log()
    assert said not in down[0] and str(replicated.replica_url.port) not in down[0], down[0]
    # Named as service.errors names a refusal, not as the driver's exception.
    assert not re.search(r"\w+Error\(|\[SQL", down[0]), down[0]
    assert "connection refused (" in down[0] or "lost mid-statement" in down[0], down[0]
