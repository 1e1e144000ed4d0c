"""The session pool: leases, waits, fairness, and what a request can and cannot leave behind."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import Settings
from service.db import (
    DatabaseTimeout,
    DatabaseUnavailable,
    PoolTimeout,
    SessionPool,
    connection_was_lost,
    create_engine,
    nothing_reached_server,
)
from tests.conftest import asyncpg_dsn, free_port

BACKEND_PID = text("SELECT pg_backend_pid()")


def make_pool(engine: AsyncEngine, **options: object) -> SessionPool:
    defaults: dict[str, object] = {
        "size": 2,
        "max_overflow": 0,
        "timeout": 1.0,
        "recycle_seconds": 1800,
        "transactional": False,
    }
    return SessionPool(engine, **{**defaults, **options})  # type: ignore[arg-type]


@pytest.fixture
async def autocommit_engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine as the service builds it for a direct connection."""
    engine = create_engine(Settings(database_url=database_url), autocommit=True)
    yield engine
    await engine.dispose()


@pytest.fixture
async def transactional_engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine as the service builds it behind a transaction-mode pooler."""
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


async def backend_pid(pool: SessionPool) -> int:
    async with pool.lease() as session:
        return int((await session.execute(BACKEND_PID)).scalar_one())


async def test_a_lease_keeps_its_connection_and_session_across_requests(
    autocommit_engine: AsyncEngine,
) -> None:
    pool = make_pool(autocommit_engine, size=1)
    async with pool.lease() as first:
        pid = (await first.execute(BACKEND_PID)).scalar_one()
    async with pool.lease() as second:
        assert second is first
        assert (await second.execute(BACKEND_PID)).scalar_one() == pid
    assert pool.connections == 1 and pool.checked_out == 0
    await pool.close()


async def test_a_full_pool_times_out_with_pool_timeout(autocommit_engine: AsyncEngine) -> None:
    pool = make_pool(autocommit_engine, size=1, timeout=0.3)
    async with pool.lease():
        started = time.monotonic()
        with pytest.raises(PoolTimeout):
            async with pool.lease():
                pass
        # It waited the pool timeout, and was not held far past it (a loose bound: two busy cores).
        assert 0.25 < time.monotonic() - started < 0.3 + 2.0
    async with pool.lease() as session:  # the timed-out waiter took nothing with it
        await session.execute(text("SELECT 1"))
    assert pool.checked_out == 0
    await pool.close()


async def test_a_lease_may_wait_less_than_the_pool_timeout(
    autocommit_engine: AsyncEngine,
) -> None:
    pool = make_pool(autocommit_engine, size=1, timeout=5)

    async def patient_lease() -> None:
        async with pool.lease() as session:
            await session.execute(text("SELECT 1"))

    async with pool.lease():
        # Behind a waiter of the pool's own timeout, the shorter one still gives up in time.
        patient = asyncio.create_task(patient_lease())
        await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match=r"within 0\.2 s"):
            async with pool.lease(timeout=0.2):
                pass
        assert 0.15 < time.monotonic() - started < 0.2 + 2.0
        assert not patient.done()
    await patient  # the patient waiter is still served once the session is free
    assert pool.checked_out == 0
    await pool.close()


async def test_waiters_are_served_first_come_first_served(
    autocommit_engine: AsyncEngine,
) -> None:
    pool = make_pool(autocommit_engine, size=1, timeout=5)
    served: list[int] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with pool.lease():
            await release.wait()

    async def waiter(number: int) -> None:
        async with pool.lease() as session:
            served.append(number)
            await session.execute(text("SELECT 1"))

    hold = asyncio.create_task(holder())
    await asyncio.sleep(0.05)
    waiters = []
    for number in range(8):
        waiters.append(asyncio.create_task(waiter(number)))
        await asyncio.sleep(0.01)  # arrive in a known order
    release.set()
    # Newcomers arriving while the line drains must queue behind it, not barge in.
    late = [asyncio.create_task(waiter(100 + n)) for n in range(4)]
    await asyncio.gather(hold, *waiters, *late)
    assert served[:8] == list(range(8))
    assert sorted(served[8:]) == [100, 101, 102, 103]
    await pool.close()


async def test_a_failed_request_leaves_nothing_behind(
    transactional_engine: AsyncEngine, engine: AsyncEngine, notebook_rows: None
) -> None:
    pool = make_pool(transactional_engine, size=1, transactional=True)
    with pytest.raises(RuntimeError):
        async with pool.lease() as session:
            await session.execute(text("UPDATE playing_with_neon SET value = -1 WHERE id = 5"))
            raise RuntimeError("the handler failed after writing")
    async with pool.lease() as session:
        assert not session.in_transaction()
        value = (
            await session.execute(text("SELECT value FROM playing_with_neon WHERE id = 5"))
        ).scalar_one()
        assert value == 11.0
    # A read behind a pooler runs in a transaction, which the lease ends.
    assert not session.in_transaction()
    async with engine.connect() as connection:  # and nothing holds a lock on the row
        await connection.execute(text("SET lock_timeout = '1s'"))
        await connection.execute(
            text("SELECT id FROM playing_with_neon WHERE id = 5 FOR UPDATE NOWAIT")
        )
    await pool.close()


async def test_a_failed_statement_in_autocommit_mode_leaves_the_session_usable(
    autocommit_engine: AsyncEngine,
) -> None:
    pool = make_pool(autocommit_engine, size=1)
    pid = await backend_pid(pool)
    with pytest.raises(Exception, match="division by zero"):
        async with pool.lease() as session:
            await session.execute(text("SELECT 1 / 0"))
    assert await backend_pid(pool) == pid  # rolled back, not thrown away
    await pool.close()


async def test_a_connection_the_server_closed_is_replaced_before_it_is_leased(
    autocommit_engine: AsyncEngine, server_url: URL
) -> None:
    pool = make_pool(autocommit_engine, size=1)
    pid = await backend_pid(pool)
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    await asyncio.sleep(0.2)  # the server's goodbye reaches the idle connection's socket
    assert await backend_pid(pool) != pid  # no error reached the request
    await pool.close()


async def test_a_write_is_known_unsent_only_when_the_driver_refused_a_closed_connection(
    autocommit_engine: AsyncEngine, server_url: URL
) -> None:
    """What the routes' retry rules rest on, seen on real connections the server ends."""
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    pool = make_pool(autocommit_engine, size=1)
    try:
        # Closed before the statement: the driver refuses it without sending a byte.
        async with pool.lease() as session:
            pid = (await session.execute(BACKEND_PID)).scalar_one()
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.2)
            with pytest.raises(Exception) as refused:
                await session.execute(text("SELECT 1"))
        assert connection_was_lost(refused.value) and nothing_reached_server(refused.value)
        # Lost in the middle of a statement: it reached the server, which may have applied it.
        async with pool.lease() as session:
            pid = (await session.execute(BACKEND_PID)).scalar_one()
            sleeping = asyncio.ensure_future(session.execute(text("SELECT pg_sleep(5)")))
            await asyncio.sleep(0.3)
            await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(Exception) as lost:
                await sleeping
        assert connection_was_lost(lost.value) and not nothing_reached_server(lost.value)
        # Any other failure is neither.
        async with pool.lease() as session:
            with pytest.raises(Exception) as bad:
                await session.execute(text("SELECT 1 / 0"))
        assert not connection_was_lost(bad.value) and not nothing_reached_server(bad.value)
    finally:
        await admin.close()
        await pool.close()


async def test_connections_are_recycled(database_url: URL) -> None:
    settings = Settings(database_url=database_url, db_pool_recycle=1)
    engine = create_engine(settings, autocommit=True)
    pool = make_pool(engine, size=1, recycle_seconds=settings.db_pool_recycle)
    pid = await backend_pid(pool)
    assert await backend_pid(pool) == pid
    await asyncio.sleep(1.2)
    assert await backend_pid(pool) != pid  # a new server session, without an error
    await pool.close()
    await engine.dispose()


async def test_overflow_slots_give_their_connection_back(autocommit_engine: AsyncEngine) -> None:
    pool = make_pool(autocommit_engine, size=1, max_overflow=1)

    async def use(entered: asyncio.Event, leave: asyncio.Event) -> None:
        async with pool.lease() as session:
            await session.execute(text("SELECT 1"))
            entered.set()
            await leave.wait()

    leave = asyncio.Event()
    entered = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(use(e, leave)) for e in entered]
    await asyncio.gather(*(e.wait() for e in entered))
    assert pool.checked_out == 2 and pool.connections == 2
    leave.set()
    await asyncio.gather(*tasks)
    assert pool.connections == 1  # the overflow connection went back
    await pool.close()


async def test_a_connection_idle_too_long_is_replaced_before_it_is_leased(
    autocommit_engine: AsyncEngine,
) -> None:
    pool = make_pool(autocommit_engine, size=1, idle_seconds=0.4)
    pid = await backend_pid(pool)
    for _ in range(4):  # kept busy: never idle for 0.4 s, so never replaced
        await asyncio.sleep(0.15)
        assert await backend_pid(pool) == pid
    await asyncio.sleep(0.6)
    assert await backend_pid(pool) != pid  # a fresh server session, before the server drops it
    await pool.close()


async def test_a_refused_connection_is_named_database_unavailable(settings: Settings) -> None:
    nobody = make_url(f"postgresql+asyncpg://postgres:pw@127.0.0.1:{free_port()}/nothing")
    engine = create_engine(dataclasses.replace(settings, database_url=nobody))
    pool = make_pool(engine)
    try:
        with pytest.raises(DatabaseUnavailable) as raised:
            async with pool.lease():
                pass
        assert isinstance(raised.value.__cause__, ConnectionRefusedError)
        assert "pw" not in str(raised.value)
        assert pool.checked_out == 0
    finally:
        await pool.close()
        await engine.dispose()


async def test_a_statement_the_driver_gives_up_on_is_named_database_timeout(
    database_url: URL,
) -> None:
    # Behind a pooler the client enforces the statement timeout: asyncpg raises a bare
    # TimeoutError, which the engine's hook names as the database's.
    settings = Settings(database_url=database_url, db_pgbouncer=True, db_statement_timeout_ms=200)
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DatabaseTimeout) as raised:
                await connection.execute(text("SELECT pg_sleep(5)"))
        assert type(raised.value.__cause__) is TimeoutError
    finally:
        await engine.dispose()


async def test_close_ends_every_waiter_and_every_leased_connection(
    autocommit_engine: AsyncEngine, database_url: URL
) -> None:
    pool = make_pool(autocommit_engine, size=1, timeout=30)
    held, leave = asyncio.Event(), asyncio.Event()

    async def hold() -> int:
        async with pool.lease() as session:
            pid = int((await session.execute(BACKEND_PID)).scalar_one())
            held.set()
            await leave.wait()
            return pid

    holder = asyncio.create_task(hold())
    await held.wait()
    waiter = asyncio.create_task(backend_pid(pool))
    await asyncio.sleep(0.05)  # queued behind the holder
    started = time.monotonic()
    await pool.close()
    with pytest.raises(PoolTimeout):  # at once, not after the 30 s wait
        await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - started < 1
    with pytest.raises(PoolTimeout):
        await backend_pid(pool)  # nothing is leased after close
    leave.set()
    pid = await holder
    assert pool.connections == 0  # the slot given back after close closed its connection
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for _ in range(50):
            if not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
            ):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"backend {pid} is still open after the pool was closed")
    finally:
        await admin.close()
