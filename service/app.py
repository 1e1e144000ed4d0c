"""The application factory: routes, the engine's lifespan, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.admission import Admission
from service.auth import token_digests
from service.config import (
    Settings,
    check_writes_are_protected,
    describe_database,
    load_settings,
    read_replica_settings,
)
from service.db import (
    DatabaseUnavailable,
    LeasedSession,
    SessionPool,
    create_engine,
    create_probe_engine,
    lease_deadline_seconds,
    pooler_keeps_prepared_statements,
)
from service.docs import openapi_config
from service.errors import (
    FailureLog,
    handle_database_error,
    handle_http_exception,
    handle_internal_error,
)
from service.health import Readiness, get_liveness, get_readiness
from service.idempotency import expire_keys_forever
from service.logs import AccessLog
from service.metrics import Metrics, get_metrics
from service.middleware import ObserveRequests
from service.replica import Replica
from service.routes import create_items, delete_item, get_item, list_items, update_values
from service.shutdown import drain_on_sigterm
from service.timing import time_statements

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from service.tracing import Tracing

log = logging.getLogger("service.app")


class ServiceApp(Litestar):
    """Litestar with `ObserveRequests` as the one ASGI layer around everything it serves."""

    def __init__(self, *, observe: Callable[[ASGIApp], ASGIApp], **options: Any) -> None:
        super().__init__(**options)
        self.observed = observe(super().__call__)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.observed(scope, receive, send)


# Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def create_served_app() -> Litestar:
    """The app as uvicorn serves it: settings from the environment, the heap frozen at start.

    Tests build many apps in one process, so freezing (which keeps objects for good) is only
    for the process that serves one app for its whole life.
    """
    return create_app(freeze_after_start=True)


def session_pool(
    settings: Settings,
    metrics: Metrics,
    session_class: type[LeasedSession] = LeasedSession,
    admission: Admission | None = None,
) -> SessionPool:
    """Long-lived sessions on a new engine for `settings`' database (the primary's or the
    replica's), with the configured pool size, waits, recycling and deadline.

    Behind a transaction-mode pooler a statement must be prepared and run inside one transaction
    (the pooler may switch server connections between transactions), so autocommit is for direct
    connections only. Every write is one statement, so each is all or nothing either way.
    """
    return SessionPool(
        create_engine(settings, autocommit=not settings.prepares_per_transaction),
        size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        timeout=settings.db_pool_timeout,
        recycle_seconds=settings.db_pool_recycle,
        idle_seconds=settings.db_pool_idle_timeout,
        deadline_seconds=lease_deadline_seconds(settings),
        transactional=settings.prepares_per_transaction,
        observe_wait=admission.observe_wait if admission else metrics.pool_wait.observe,
        observe_hold=admission.observe_hold if admission else lambda seconds: None,
        session_class=session_class,
    )


def create_admission(settings: Settings, metrics: Metrics) -> Admission:
    """Admission by the primary pool's queue delay, with the configured target and limits."""
    return Admission(
        target=settings.admission_target_ms / 1000,
        interval=settings.admission_interval_ms / 1000,
        max_in_flight=settings.in_flight_limit,
        refusal_delay=settings.admission_refusal_delay_ms / 1000,
        record_wait=metrics.pool_wait.observe,
    )


async def start_replica(
    settings: Settings, metrics: Metrics, session_class: type[LeasedSession] = LeasedSession
) -> Replica | None:
    """The read replica's pool and health check, or None when DATABASE_READ_URL is unset.

    Its first check runs before the app serves, so reads go to a healthy replica from the start.
    """
    replica_settings = read_replica_settings(settings)
    if replica_settings is None:
        return None
    sessions = session_pool(replica_settings, metrics, session_class)
    engine = sessions.engine
    replica = Replica(
        sessions,
        replica_probe=create_probe_engine(replica_settings),
        primary_probe=create_probe_engine(settings),
        max_lag_seconds=settings.read_max_lag_ms / 1000,
        consistency_wait_seconds=settings.read_consistency_wait_ms / 1000,
        behind_pooler=settings.behind_pooler,
    )
    log.info("reads go to the replica %s", describe_database(engine.url))
    await replica.check()
    replica.start()
    return replica


async def settle_pooler_mode(settings: Settings) -> Settings:
    """The settings to build the engines with: DB_POOLER=transaction only if the pooler really
    keeps prepared statements, else (one warning line) transaction-unprepared, which is slower
    but correct, rather than "prepared statement … does not exist" errors under load."""
    if settings.pooler != "transaction" or settings.database_url is None:
        return settings
    where = describe_database(settings.database_url)
    kept = await pooler_keeps_prepared_statements(settings)
    if kept is None:
        log.warning(
            "could not ask %s whether it keeps prepared statements: trusting DB_POOLER", where
        )
    elif not kept:
        log.warning(
            "DB_POOLER=transaction, but %s does not keep prepared statements across transactions "
            "(a PgBouncer older than 1.21, max_prepared_statements = 0, or no pooler at all): "
            "serving as DB_POOLER=transaction-unprepared, 4 round trips per read instead of 1; "
            "upgrade the pooler, or set DB_POOLER=none for a direct connection",
            where,
        )
        return dataclasses.replace(settings, db_pooler="transaction-unprepared")
    return settings


def start_tracing_if_configured(settings: Settings) -> Tracing | None:
    """The app's tracing when the environment configures it (`Settings.tracing`), else None;
    only then is the OpenTelemetry SDK imported."""
    if not settings.tracing:
        return None
    from service.tracing import start_tracing

    return start_tracing()


def create_app(settings: Settings | None = None, *, freeze_after_start: bool = False) -> Litestar:
    """Build the app; with no settings, read them from the environment and `.env`."""
    settings = settings if settings is not None else load_settings()
    check_writes_are_protected(settings)
    state = State(
        {
            "settings": settings,
            "token_digests": token_digests(settings.api_tokens),
            "draining": False,
            "replica": None,
        }
    )
    metrics = Metrics(state)
    state.metrics = metrics
    tracing = start_tracing_if_configured(settings)
    admission = state.admission = create_admission(settings, metrics)

    @asynccontextmanager
    async def engine_lifespan(app: Litestar) -> AsyncIterator[None]:
        settings = app.state.settings = await settle_pooler_mode(app.state.settings)
        # With tracing, the request sessions make the statements' spans (the probes' and the
        # migrations' engines stay out of it).
        session_class = tracing.session_class if tracing is not None else LeasedSession
        # Every write, and every read without a replica, waits in this pool's queue: admission
        # follows its delay (a replica's reads fall back to it when the replica is busy).
        sessions = session_pool(settings, metrics, session_class, admission)
        admission.queue = sessions
        engine = sessions.engine
        app.state.replica = await start_replica(settings, metrics, session_class)
        if settings.server_timing:
            time_statements(engine)
            if app.state.replica is not None:
                time_statements(app.state.replica.sessions.engine)
        if tracing is not None:
            log.info("tracing: %s", tracing.describe())
        app.state.engine = engine
        app.state.sessions = sessions
        app.state.readiness = Readiness(create_probe_engine(settings))
        app.state.database_failures = FailureLog(describe_database(engine.url))
        log.info("using database %s", describe_database(engine.url))
        host = engine.url.host or ""
        if "-pooler" in host and not settings.behind_pooler:
            log.warning(
                "%s looks like a transaction-mode pooler but DB_POOLER=none: set "
                "DB_POOLER=transaction, or expect a refused statement_timeout",
                host,
            )
        if settings.db_channel_binding == "require":
            log.warning(
                "channel_binding=require is not enforced: asyncpg cannot bind channels; "
                "use sslmode=verify-full to be sure of the server"
            )
        if settings.auth_disabled:
            log.warning("AUTH_DISABLED: writes are open to anyone who can reach this service")
        stop_watching = drain_on_sigterm(app.state, settings.shutdown_delay_seconds)
        expiry = asyncio.create_task(
            expire_keys_forever(sessions, settings.idempotency_ttl_seconds)
        )
        if freeze_after_start:
            # Everything built so far (routes, OpenAPI models, SQLAlchemy's registries) lives as
            # long as the process: move it out of the collector's sight, and collect the young
            # generation less often, so a collection does not walk it again and again.
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            stop_watching()
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry
            if app.state.replica is not None:
                await app.state.replica.stop()
            await sessions.close()
            await engine.dispose()
            await app.state.readiness.close()
            if tracing is not None:
                await tracing.close()

    return ServiceApp(
        route_handlers=[
            list_items,
            get_item,
            create_items,
            update_values,
            delete_item,
            get_liveness,
            get_readiness,
            get_metrics,
        ],
        lifespan=[engine_lifespan],
        state=state,
        observe=partial(
            ObserveRequests,
            state=state,
            metrics=metrics,
            access_log=AccessLog(settings.access_log, settings.log_format, settings.log_level),
            admission=admission,
            tracing=tracing,
            server_timing=settings.server_timing,
        ),
        exception_handlers={
            HTTPException: handle_http_exception,
            DBAPIError: handle_database_error,
            PoolTimeoutError: handle_database_error,
            # Only the driver's socket errors, as db.py names them: any other OSError is a bug.
            DatabaseUnavailable: handle_database_error,
            Exception: handle_internal_error,
        },
        request_max_body_size=settings.max_body_bytes,
        # Logging is configured once by the command line (service.logs), not per app.
        logging_config=None,
        openapi_config=openapi_config(),
    )
