"""Fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL), a migrated database, the app."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.app import create_app
from service.config import Settings, normalise_database_url
from service.db import create_engine
from service.migrate import upgrade_to_head
from service.seed import INSERT_WITH_ID, NOTEBOOK_ROWS, SYNC_ID_SEQUENCE

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
LOCK_ROW = text("SELECT id FROM playing_with_neon WHERE id = :id FOR UPDATE")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def asyncpg_dsn(url: URL) -> str:
    """A URL asyncpg.connect understands (plain postgresql://, socket dir as ?host=)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url() -> Iterator[URL]:
    """An administrative URL of a PostgreSQL server this test session may create databases on."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield normalise_database_url(configured)["database_url"]  # type: ignore[misc]
        return
    from pgserver.postgres_server import get_server

    # Outside the root user's home: pgserver runs the server as its own user, who must reach it.
    data_dir = Path(tempfile.mkdtemp(prefix="service-test-pg-"))
    server = get_server(data_dir, cleanup_mode="stop")
    try:
        yield make_url(server.get_uri()).set(drivername="postgresql+asyncpg", password=None)
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def embedded_db_dir() -> Iterator[Path]:
    """A data folder for an embedded PostgreSQL that a child process starts.

    Not under tmp_path: pgserver runs the server as its own user, and pytest closes its temp
    root to everyone else (0700) whenever any pytest session starts.
    """
    root = Path(tempfile.mkdtemp(prefix="service-embedded-"))
    try:
        yield root / "pg"
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def fresh_database(server: URL, prefix: str = "service_test") -> AsyncIterator[URL]:
    """A new, empty database on the test server, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(asyncpg_dsn(server))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield server.set(database=name)
    finally:
        admin = await asyncpg.connect(asyncpg_dsn(server))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def database_url(server_url: URL) -> AsyncIterator[URL]:
    """A migrated database for this test session."""
    async with fresh_database(server_url) as url:
        # Alembic runs its own event loop, so it gets a thread of its own.
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url, auth_disabled=True))
        yield url


@pytest.fixture
def settings(database_url: URL) -> Settings:
    """Settings for the app under test: the test database, one API token, small limits."""
    return Settings(
        database_url=database_url,
        api_tokens=(TOKEN,),
        max_batch=100,
        max_body_bytes=64 * 1024,
        db_pool_timeout=2.0,
    )


@pytest.fixture(scope="session")
async def engine(database_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine of the tests' own, to arrange rows and to read back what the app committed."""
    engine = create_engine(Settings(database_url=database_url, auth_disabled=True))
    yield engine
    await engine.dispose()


@pytest.fixture
async def notebook_rows(engine: AsyncEngine) -> None:
    """The table holds exactly the notebook's six rows, and new ids follow them."""
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE playing_with_neon"))
        await connection.execute(INSERT_WITH_ID, [dict(row) for row in NOTEBOOK_ROWS])
        await connection.execute(SYNC_ID_SEQUENCE)


@pytest.fixture
async def client(settings: Settings, notebook_rows: None) -> AsyncIterator[AsyncTestClient[Any]]:
    """The app, lifespan included, behind Litestar's async test client."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


@contextlib.asynccontextmanager
async def concurrent_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, behind an httpx client whose requests really run at once.

    Litestar's test client runs one request at a time; httpx's ASGI transport runs each request
    in its caller's task, so requests sent from several tasks overlap as on a real server.
    """
    app = create_app(settings)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@contextlib.asynccontextmanager
async def row_locked(engine: AsyncEngine, row_id: int) -> AsyncIterator[AsyncConnection]:
    """Row `row_id` locked by an outside transaction until the block ends; yields its connection."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        await connection.execute(LOCK_ROW, {"id": row_id})
        try:
            yield connection
        finally:
            await transaction.rollback()


async def table_snapshot(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    """Every row, in id order, read through the tests' own connection."""
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT id, name, value FROM playing_with_neon ORDER BY id")
        )
        return [tuple(row) for row in result]


def documented_answers(document: dict[str, Any]) -> set[tuple[str, str, int]]:
    """Every (method, path template, status) an OpenAPI document lists, methods in lower case."""
    return {
        (method, template, int(status))
        for template, operations in document["paths"].items()
        for method, operation in operations.items()
        for status in operation["responses"]
    }


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclasses.dataclass
class ServiceProcess:
    """A `python -m service` child process and where it listens."""

    process: subprocess.Popen[str]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def service_environment(database_url: URL | None, **overrides: str) -> dict[str, str]:
    """A clean environment for a service child: nothing of ours leaks in but what is named."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    if database_url is not None:
        env["DATABASE_URL"] = database_url.render_as_string(hide_password=False)
    env.update({"API_TOKENS": TOKEN, "LOG_LEVEL": "INFO"})
    env.update(overrides)
    return env


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m service ARGS` to its end (at most 60 s), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def run_service(
    env: dict[str, str], tmp_path: Path, args: tuple[str, ...] = (), wait: bool = True
) -> Iterator[ServiceProcess]:
    """Start the service as shipped on a free port; stop it (by its own PID) afterwards."""
    port = free_port()
    env = {**env, "PORT": str(port), "HOST": "127.0.0.1"}
    log_path = tmp_path / f"service-{port}.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *args],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(PROJECT_ROOT)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    service = ServiceProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        if wait:
            wait_until_serving(service)
        yield service
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_serving(service: ServiceProcess, timeout: float = 60.0) -> None:
    """Block until /healthz answers, or fail with the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            pytest.fail(f"service exited with {service.process.returncode}:\n{service.log()}")
        try:
            if httpx.get(f"{service.base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"service did not start within {timeout} s:\n{service.log()}")
