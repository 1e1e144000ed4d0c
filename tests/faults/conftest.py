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
from tests.faults.support import PGBOUNCER, ControlledPostgres, PgBouncer


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


@pytest.fixture
def pgbouncer(controlled_postgres: ControlledPostgres) -> Iterator[PgBouncer]:
    """Debian's PgBouncer in transaction mode in front of the controlled server."""
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    bouncer = PgBouncer.start(controlled_postgres)
    try:
        yield bouncer
    finally:
        bouncer.stop()


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
