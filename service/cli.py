"""Command line: `python -m service` serves the API; `migrate` migrates; `seed` adds demo rows."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys

import asyncpg
import uvicorn
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from service.config import (
    Settings,
    SettingsError,
    check_writes_are_protected,
    describe_database,
    load_settings,
)
from service.db import create_engine
from service.embedded import EmbeddedDatabase, start_embedded_database, start_embedded_replica
from service.errors import refusal_reason, refused_for_good
from service.logs import configure_logging, logging_config
from service.migrate import upgrade_to_head
from service.queries import SELECT_NOTHING
from service.seed import seed_demo_rows, seed_notebook_rows

log = logging.getLogger("service.cli")

# What a database that cannot be used raises, from the driver, SQLAlchemy or service.db.
DATABASE_ERRORS = (OSError, DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError)

# Seconds uvicorn waits for in-flight requests after SIGTERM before closing them.
GRACEFUL_SHUTDOWN_SECONDS = 20
# Seconds an idle keep-alive connection stays open. uvicorn's 5 s equals common clients' own
# idle expiry (httpx: 5 s), so a client could reuse a connection the server was closing at that
# instant and get a reset; it must also outlast load balancers' idle timeouts (often 60 s).
KEEP_ALIVE_SECONDS = 75


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the settings, run the command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="serve the HTTP API with uvicorn (the default)"
    )
    serve_parser.add_argument(
        "--replica",
        action="store_true",
        help="with the embedded database: start a streaming replica of it and read from it",
    )
    commands.add_parser("migrate", help="apply the database migrations, then exit")
    seed_parser = commands.add_parser("seed", help="fill an empty table with demo rows, then exit")
    seed_parser.add_argument("--rows", type=int, required=True, help="how many rows (ids 1..N)")
    seed_parser.add_argument(
        "--force", action="store_true", help="delete every row first (TRUNCATE … RESTART IDENTITY)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        if args.command in (None, "serve"):
            check_writes_are_protected(settings)
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "migrate":
            return migrate(settings)
        if args.command == "seed":
            return seed(settings, args.rows, args.force)
        return serve(settings, replica=getattr(args, "replica", False))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DATABASE_ERRORS as exc:
        where = describe_database(settings.database_url) if settings.database_url else "database"
        print(f"error: cannot use {where}: {refusal_reason(exc)}", file=sys.stderr)
        return 1


def migrate(settings: Settings) -> int:
    """Apply the migrations to the configured (or embedded) database."""
    settings, _embedded = with_database(settings)
    upgrade_to_head(settings)
    log.info("migrations applied to %s", describe_database(embedded_or_configured_url(settings)))
    return 0


def seed(settings: Settings, rows: int, force: bool) -> int:
    """Fill the table with demo rows 1..rows; an embedded database is migrated first."""
    settings, embedded = with_database(settings)
    if embedded is not None:
        upgrade_to_head(settings)

    async def seed_rows() -> int:
        engine = create_engine(settings)
        try:
            return await seed_demo_rows(engine, rows, force=force)
        finally:
            await engine.dispose()

    removed = asyncio.run(seed_rows())
    if force:
        log.info("--force: TRUNCATE … RESTART IDENTITY deleted %d rows first", removed)
    where = describe_database(embedded_or_configured_url(settings))
    log.info("seeded %d demo rows (ids 1..%d) into %s", rows, rows, where)
    return 0


def serve(settings: Settings, replica: bool = False) -> int:
    """Serve the API; on the embedded database, migrate and seed it first.

    With `replica`, the embedded database gets a streaming replica, which serves the reads.
    """
    if replica and not settings.uses_embedded_database:
        raise RuntimeError("--replica is for the embedded database; set DATABASE_READ_URL instead")
    settings, embedded = with_database(settings)
    embedded_replica = None
    if embedded is not None:
        upgrade_to_head(settings)
        if embedded.created and asyncio.run(seed_embedded(settings)):
            log.info("seeded the notebook's rows into the new embedded database")
        # Worker processes read their settings from the environment: point them at this server.
        os.environ["DATABASE_URL"] = embedded.url.render_as_string(hide_password=False)
        if settings.auth_disabled and not settings.api_tokens:
            os.environ["AUTH_DISABLED"] = "true"
        if replica:
            data_dir = settings.embedded_db_dir.with_name(
                settings.embedded_db_dir.name + "-replica"
            )
            embedded_replica = start_embedded_replica(embedded, data_dir)
            os.environ["DATABASE_READ_URL"] = embedded_replica.url.render_as_string()
    else:
        check_database(settings)
    try:
        run_uvicorn(settings)
    finally:
        if embedded_replica is not None:
            embedded_replica.stop()
    return 0


def run_uvicorn(settings: Settings) -> None:
    """uvicorn serving the app factory until it is stopped."""
    # uvicorn re-raises SIGTERM after its graceful shutdown, which would end the process with
    # status -15; a finished drain is a clean exit, so the re-raised signal lands here instead.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        "service.app:create_served_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def check_database(settings: Settings) -> None:
    """Before serving: a database that refuses this configuration for good (password, missing
    database or table, TLS) stops the command with one line. One that is merely not there yet
    (refused, unreachable, starting) is logged, and the service starts anyway and answers 503
    until it is: a pod must not crash-loop while a managed database wakes up or fails over."""

    async def probe() -> None:
        engine = create_engine(settings, autocommit=True)
        try:
            async with engine.connect() as connection:
                await connection.execute(SELECT_NOTHING)
        finally:
            await engine.dispose()

    try:
        asyncio.run(probe())
    except DATABASE_ERRORS as exc:
        if refused_for_good(exc):
            raise
        where = describe_database(embedded_or_configured_url(settings))
        log.warning(
            "cannot use %s yet: %s; serving, and answering 503 until it can",
            where,
            refusal_reason(exc),
        )


def with_database(settings: Settings) -> tuple[Settings, EmbeddedDatabase | None]:
    """The settings unchanged when a database is configured, else pointed at the embedded one."""
    if not settings.uses_embedded_database:
        return settings, None
    embedded = start_embedded_database(settings.embedded_db_dir)
    auth_disabled = settings.auth_disabled
    if not settings.api_tokens and not auth_disabled:
        log.warning(
            "API_TOKENS is empty: writes are open, which is allowed only on the embedded "
            "development database"
        )
        auth_disabled = True
    settings = dataclasses.replace(settings, database_url=embedded.url, auth_disabled=auth_disabled)
    return settings, embedded


def embedded_or_configured_url(settings: Settings) -> URL:
    """The database URL once `with_database` has filled it in."""
    if settings.database_url is None:
        raise RuntimeError("no database URL")
    return settings.database_url


async def seed_embedded(settings: Settings) -> bool:
    """Put the notebook's rows into the embedded database's empty table."""
    engine = create_engine(settings)
    try:
        return await seed_notebook_rows(engine)
    finally:
        await engine.dispose()
