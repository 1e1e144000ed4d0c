"""The engine and sessions: one async engine per process, built from the settings."""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

from litestar.datastructures import State
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool

from service.config import Settings

log = logging.getLogger("service.db")


def ssl_connect_arg(
    sslmode: str | None, sslrootcert: str | None
) -> ssl.SSLContext | str | bool | None:
    """Translate libpq's sslmode/sslrootcert into asyncpg's `ssl` argument.

    asyncpg understands the mode names itself but looks for the CA bundle only in
    ~/.postgresql/root.crt, so when a root certificate is named (or verification is asked for) we
    build the context here. `sslrootcert=system`, as in libpq 16, means the system's CA store,
    which is also the default for verify-ca/verify-full because containers have no root.crt.
    """
    if sslmode is None:
        return None
    if sslmode == "disable":
        return False
    verify = sslmode in ("verify-ca", "verify-full") or (
        sslmode == "require" and sslrootcert is not None
    )
    if not verify:
        return sslmode
    if sslrootcert is None or sslrootcert == "system":
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=sslrootcert)
    context.check_hostname = sslmode == "verify-full"
    return context


def engine_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `create_async_engine`, kept apart so tests can read them."""
    connect_args: dict[str, Any] = {
        # asyncpg waits 60 s by default; a dead host must not hold a request past a pool wait.
        "timeout": settings.db_pool_timeout,
        "server_settings": {"application_name": settings.db_application_name},
    }
    ssl_arg = ssl_connect_arg(settings.db_sslmode, settings.db_sslrootcert)
    if ssl_arg is not None:
        connect_args["ssl"] = ssl_arg
    timeout_ms = settings.db_statement_timeout_ms
    if settings.db_pgbouncer:
        # A transaction-mode pooler hands each transaction to any server connection, so a
        # statement prepared on one is unknown (or, by name, already taken) on another: prepare
        # under a fresh name every time and cache nothing. Poolers also reject unknown startup
        # parameters, so the statement timeout is enforced by the client, which cancels the query.
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
        connect_args["prepared_statement_name_func"] = lambda: f"__asyncpg_{uuid4()}__"
        if timeout_ms:
            connect_args["command_timeout"] = timeout_ms / 1000
    elif timeout_ms:
        connect_args["server_settings"]["statement_timeout"] = str(timeout_ms)
    return {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout,
        "pool_recycle": settings.db_pool_recycle,
        # No pre-ping: it costs a round trip per request. A connection found dead raises a
        # disconnect error, which invalidates the whole pool, so recovery after an outage is fast.
        "pool_pre_ping": False,
        "connect_args": connect_args,
    }


class TimedQueuePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio queue pool, timing each checkout for `db_pool_wait_seconds`.

    The wait (for a free connection, or to open a new one) happens inside the pool, at a
    statement's first need of a connection; no event marks its start, so it is timed here.
    """

    observe_wait: Callable[[float], None] = staticmethod(lambda seconds: None)

    def _do_get(self) -> ConnectionPoolEntry:
        started = time.perf_counter()
        try:
            return super()._do_get()
        finally:
            self.observe_wait(time.perf_counter() - started)

    def recreate(self) -> QueuePool:
        pool = super().recreate()  # engine.dispose() swaps in a new pool: keep the observer
        pool.observe_wait = self.observe_wait  # type: ignore[attr-defined]
        return pool


def create_engine(
    settings: Settings, observe_pool_wait: Callable[[float], None] | None = None
) -> AsyncEngine:
    """The process's one engine, for the configured database."""
    if settings.database_url is None:
        raise RuntimeError("the embedded database must be started before the engine is built")
    engine = create_async_engine(
        settings.database_url, poolclass=TimedQueuePool, **engine_options(settings)
    )
    if observe_pool_wait is not None:
        engine.pool.observe_wait = observe_pool_wait  # type: ignore[attr-defined]
    return engine


def session_factories(
    engine: AsyncEngine, settings: Settings
) -> tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]]:
    """Session makers for writes (a transaction each) and for reads.

    A read is one SELECT, so it runs in autocommit mode: no BEGIN and no ROLLBACK, one round
    trip instead of three. Behind a transaction-mode pooler the statement must be prepared and
    run on the same server connection, which only a transaction guarantees, so reads keep one.
    """
    writes = async_sessionmaker(engine, expire_on_commit=False)
    if settings.db_pgbouncer:
        return writes, writes
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    return writes, async_sessionmaker(autocommit, expire_on_commit=False)


async def provide_db_session(state: State) -> AsyncIterator[AsyncSession]:
    """A request's transactional session; handlers commit explicitly, anything else rolls back.

    The session takes its connection at its first statement, after the handler has validated
    the input, so a bad request gets its 4xx even while the database is away.
    """
    async with state.write_sessions() as session:
        yield session


async def provide_read_session(state: State) -> AsyncIterator[AsyncSession]:
    """A request's session for a single read statement."""
    async with state.read_sessions() as session:
        yield session
