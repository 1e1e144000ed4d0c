"""Fixtures for the fault tests: a PostgreSQL (and a PgBouncer) the tests stop and start."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.engine import URL

from service.config import Settings
from service.migrate import upgrade_to_head
from tests.conftest import fresh_database
from tests.faults.report import RECORDS, markdown
from tests.faults.support import (
    LEGACY_PGBOUNCER,
    PREPARED_STATEMENTS_SINCE,
    ControlledPostgres,
    PgBouncer,
    modern_pgbouncer,
    pgbouncer_version,
)


@pytest.fixture(scope="session")
def controlled_postgres() -> Iterator[ControlledPostgres]:
    """A PostgreSQL of this test session's own, on a free loopback port, that tests may stop."""
    server = ControlledPostgres.create()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
async def fault_database(controlled_postgres: ControlledPostgres) -> AsyncIterator[URL]:
    """A new migrated database on the controlled server; the server runs again afterwards."""
    if not controlled_postgres.is_running():
        controlled_postgres.start()
    async with fresh_database(controlled_postgres.url(), prefix="faults") as url:
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url, auth_disabled=True))
        try:
            yield url
        finally:
            # A test that stopped the server and failed before starting it again.
            if not controlled_postgres.is_running():
                controlled_postgres.start()


def _running_pgbouncer(postgres: ControlledPostgres, binary: str) -> Iterator[PgBouncer]:
    bouncer = PgBouncer.start(postgres, binary)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pgbouncer(controlled_postgres: ControlledPostgres) -> Iterator[PgBouncer]:
    """PgBouncer >= 1.21 in transaction mode, tracking prepared statements, as Neon's poolers."""
    binary = modern_pgbouncer()
    if binary is None:
        pytest.skip(
            "no PgBouncer >= 1.21: run `bash tests/build-pgbouncer.sh` (builds it into a cache "
            "the tests look in) or set PGBOUNCER_MODERN to a pgbouncer binary"
        )
    version = pgbouncer_version(binary)
    if version < PREPARED_STATEMENTS_SINCE:
        pytest.fail(f"{binary} is PgBouncer {version}, not >= 1.21")
    yield from _running_pgbouncer(controlled_postgres, binary)


@pytest.fixture
def legacy_pgbouncer(controlled_postgres: ControlledPostgres) -> Iterator[PgBouncer]:
    """Debian bookworm's PgBouncer 1.18 in transaction mode: prepared statements not tracked."""
    if not os.access(LEGACY_PGBOUNCER, os.X_OK):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    if pgbouncer_version(LEGACY_PGBOUNCER) >= PREPARED_STATEMENTS_SINCE:
        pytest.skip(f"the system's pgbouncer is >= 1.21, not the legacy one ({LEGACY_PGBOUNCER})")
    yield from _running_pgbouncer(controlled_postgres, LEGACY_PGBOUNCER)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the reliability table of this run; write it beside RELIABILITY_REPORT as Markdown."""
    if not RECORDS:
        return
    table = markdown(RECORDS)
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(table)
    target = os.environ.get("RELIABILITY_REPORT")
    if target:
        with open(os.path.splitext(target)[0] + ".md", "w") as out:
            out.write(table + "\n")
