"""Alembic environment: runs migrations over the service's own async engine settings."""

from __future__ import annotations

import asyncio
import dataclasses

from alembic import context
from sqlalchemy.engine import Connection

from service.config import Settings, load_settings
from service.db import create_engine


def run_migrations(connection: Connection) -> None:
    """Apply the migrations over one connection, all in one transaction."""
    context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(settings: Settings) -> None:
    """Connect like the service does, but with no statement timeout: DDL may take a while."""
    engine = create_engine(dataclasses.replace(settings, db_statement_timeout_ms=0))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (--sql) migrations are not supported; run `python -m service migrate`"
    )

asyncio.run(run_async_migrations(context.config.attributes.get("settings") or load_settings()))
