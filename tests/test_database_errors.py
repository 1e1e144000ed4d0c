"""Database errors as the README promises them: 409 for a conflict, 422 for a value the table
refuses, 500 for a statement of ours the driver or the server rejects, 503 for a database that is
not as configured, and statements left unbounded when DB_STATEMENT_TIMEOUT_MS=0."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import pytest
from litestar import Request, get
from litestar.params import FromPath
from litestar.testing import AsyncTestClient
from sqlalchemy import Executable, bindparam, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service import queries, routes
from service.app import create_app
from service.config import Settings, describe_database
from tests.conftest import (
    AUTH,
    LOCK_ROW,
    concurrent_client,
    fresh_database,
    row_locked,
    table_snapshot,
)

WAITING_FOR_A_LOCK = text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE application_name = :name AND wait_event_type = 'Lock'"
)


async def wait_for_a_lock_wait(engine: AsyncEngine, settings: Settings) -> None:
    """Return once one of the service's statements waits for a row lock (5 s at most)."""
    for _ in range(100):
        async with engine.connect() as connection:
            name = {"name": settings.db_application_name}
            if (await connection.execute(WAITING_FOR_A_LOCK, name)).scalar_one():
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the service's statement never waited for the lock")


async def test_a_deadlock_is_409_with_retry_after_and_changes_nothing(
    settings: Settings, engine: AsyncEngine, notebook_rows: None
) -> None:
    before = await table_snapshot(engine)
    batch = [{"id": 5, "value": 1.0}, {"id": 6, "value": 2.0}]
    async with concurrent_client(settings) as client:
        async with row_locked(engine, 6) as outside:
            # The outside transaction checks for a deadlock only after 30 s, the service's
            # statement after PostgreSQL's default 1 s: the service's statement is the victim.
            await outside.execute(text("SET LOCAL deadlock_timeout = '30s'"))
            patch = asyncio.create_task(client.patch("/items", json=batch, headers=AUTH))
            await wait_for_a_lock_wait(engine, settings)  # it holds row 5 and waits for 6
            await outside.execute(LOCK_ROW, {"id": 5})  # returns once the deadlock is broken
            response = await patch
        assert response.status_code == 409, response.text
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/problem+json"
        assert "busy in another transaction" in response.json()["detail"]
        assert await table_snapshot(engine) == before
        # Retrying, as Retry-After says, succeeds once the other transaction is gone.
        retried = await client.patch("/items", json=batch, headers=AUTH)
        assert (retried.status_code, retried.json()) == (200, {"updated": 2})
    values = {row[0]: row[2] for row in await table_snapshot(engine)}
    assert (values[5], values[6]) == (1.0, 2.0)


def refusal_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("service") and r.levelno >= logging.ERROR
    ]


async def test_a_missing_table_is_503_with_one_error_line(
    settings: Settings, server_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    async with fresh_database(server_url, prefix="service_unmigrated") as url:
        app = create_app(dataclasses.replace(settings, database_url=url))
        async with AsyncTestClient(app=app) as client:
            caplog.clear()
            response = await client.get("/items")
            records = refusal_records(caplog)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    where = describe_database(url)
    expected = (
        f"the database refuses the service's configuration ({where}): "
        "the table does not exist (run `python -m service migrate`)"
    )
    assert [(r.getMessage(), r.exc_info) for r in records] == [(expected, None)]


async def test_a_missing_database_is_503_with_one_error_line(
    settings: Settings, server_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    url = server_url.set(database="service_no_such_database")
    async with AsyncTestClient(
        app=create_app(dataclasses.replace(settings, database_url=url))
    ) as client:
        caplog.clear()
        response = await client.get("/items")
        records = refusal_records(caplog)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert len(records) == 1 and records[0].exc_info is None, records
    assert (
        records[0].getMessage().endswith("service_no_such_database): the database does not exist")
    )


@pytest.mark.parametrize(("timeout_ms", "status"), [(0, 200), (500, 503)])
async def test_statement_timeout_zero_lets_a_long_statement_finish(
    settings: Settings, engine: AsyncEngine, notebook_rows: None, timeout_ms: int, status: int
) -> None:
    # The row is held 1.5 s: past 500 ms and past the client's 1 s margin, so any bound on the
    # statement (the server's, the client's or the lease's) cuts it; 0 must leave it none.
    held = 1.5
    settings = dataclasses.replace(settings, db_statement_timeout_ms=timeout_ms)
    async with concurrent_client(settings) as client:
        async with row_locked(engine, 5):
            started = time.monotonic()
            patch = asyncio.create_task(
                client.patch("/items", json=[{"id": 5, "value": 7.0}], headers=AUTH)
            )
            await asyncio.sleep(held)
        response = await patch
        elapsed = time.monotonic() - started
    assert response.status_code == status, response.text
    value = {row[0]: row[2] for row in await table_snapshot(engine)}[5]
    if timeout_ms == 0:
        assert elapsed >= held and value == 7.0
    else:
        assert "nothing was changed" in response.json()["detail"] and value == 11.0


# (case, statements that set the table up, statements that undo them, request, status, detail,
# the constraint the log names: a conflict is the operator's to know of, a refused value is not).
# Each provokes the constraint for real; the set-up is undone even if the test fails, so later
# tests find the table as the migrations left it.
CONSTRAINT_CASES: list[
    tuple[str, list[str], list[str], tuple[str, str, Any], int, str, tuple[str, str] | None]
] = [
    (
        "unique key: the id sequence set back behind existing rows",
        ["SELECT setval(pg_get_serial_sequence('playing_with_neon', 'id'), 5, false)"],
        [],
        ("POST", "/items", [{"name": "new", "value": 1.0}]),
        409,
        "conflicts with a row that already exists",
        (
            "playing_with_neon_pkey",
            "a row with that key exists (for the id's key: the id sequence is behind the rows)",
        ),
    ),
    (
        "foreign key: another table refers to the row",
        [
            "CREATE TABLE item_notes (item_id integer REFERENCES playing_with_neon (id))",
            "INSERT INTO item_notes VALUES (5)",
        ],
        ["DROP TABLE item_notes"],
        ("DELETE", "/items/5", None),
        409,
        "another table refers to",
        ("item_notes_item_id_fkey", "the server refused the request (SQLSTATE 23503)"),
    ),
    (
        "check constraint: the table's own rule on value",
        [
            "ALTER TABLE playing_with_neon ADD CONSTRAINT value_not_negative CHECK (value >= 0)",
        ],
        ["ALTER TABLE playing_with_neon DROP CONSTRAINT value_not_negative"],
        ("PATCH", "/items", [{"id": 5, "value": -1.0}]),
        422,
        "a rule of the table",
        None,
    ),
]


@pytest.mark.parametrize(
    ("arrange", "undo", "request_", "status", "detail", "logged"),
    [case[1:] for case in CONSTRAINT_CASES],
    ids=[case[0] for case in CONSTRAINT_CASES],
)
async def test_a_constraint_the_write_breaks_is_a_4xx_and_changes_nothing(
    settings: Settings,
    database_url: URL,
    engine: AsyncEngine,
    notebook_rows: None,
    caplog: pytest.LogCaptureFixture,
    arrange: list[str],
    undo: list[str],
    request_: tuple[str, str, Any],
    status: int,
    detail: str,
    logged: tuple[str, str] | None,
) -> None:
    async with engine.begin() as connection:
        for statement in arrange:
            await connection.execute(text(statement))
    try:
        before = await table_snapshot(engine)
        method, path, body = request_
        async with AsyncTestClient(app=create_app(settings)) as client:
            with caplog.at_level(logging.INFO):
                response = await client.request(method, path, json=body, headers=AUTH)
        assert await table_snapshot(engine) == before
    finally:
        async with engine.begin() as connection:
            for statement in undo:
                await connection.execute(text(statement))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"]
    assert "retry-after" not in response.headers  # the same request would fail the same way
    assert not any(record.exc_info for record in caplog.records)  # not a bug of ours
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.errors"]
    constraint, reason = logged or ("", "")
    expected = (
        f"a write broke the constraint {constraint} ({describe_database(database_url)}): {reason}"
    )
    assert warnings == ([expected] if logged else [])


# Statements no handler of ours sends; each stands for a bug of ours that one could send. The
# route below runs them through the handlers' own helpers, on the app's pool.
BUGS: dict[str, tuple[Executable, dict[str, Any], bool]] = {
    # The driver cannot encode the parameter and sends nothing: asyncpg raises its DataError, as
    # if the server had answered SQLSTATE 22000.
    "a parameter the driver cannot encode": (queries.SELECT_ITEM, {"id": "five"}, False),
    # A data exception (class 22) the server raises for our own arithmetic, not for a value.
    "a data exception of our own statement": (
        text("SELECT 1 / CAST(:zero AS int4)"),
        {"zero": 0},
        False,
    ),
    # More parameters than the wire protocol carries (an IN list of ours that grew): asyncpg
    # refuses to send it with a plain InterfaceError on a connection that stays open.
    "more parameters than the protocol allows": (
        text("SELECT id FROM playing_with_neon WHERE id IN :ids").bindparams(
            bindparam("ids", expanding=True)
        ),
        {"ids": list(range(40_000))},
        False,
    ),
    # An integrity error no client input can cause: an INSERT of ours missing a column.
    "a NOT NULL column our statement leaves out": (
        text("INSERT INTO playing_with_neon (name) VALUES (:name) RETURNING id"),
        {"name": "no value"},
        True,
    ),
}


@get("/test-only/bug/{name:str}")
async def run_a_buggy_statement(request: Request[Any, Any, Any], name: FromPath[str]) -> None:
    """Run one of BUGS as `routes` runs its reads and writes (retries included)."""
    statement, params, writes = BUGS[name]
    run = routes._write if writes else routes._read
    rows: Sequence[Any] = await run(request, statement, params)
    raise AssertionError(f"the buggy statement succeeded: {rows}")


@pytest.mark.parametrize("bug", list(BUGS))
async def test_a_statement_of_ours_the_database_rejects_is_a_500_with_its_traceback(
    settings: Settings, notebook_rows: None, caplog: pytest.LogCaptureFixture, bug: str
) -> None:
    app = create_app(settings)
    app.register(run_a_buggy_statement)
    async with AsyncTestClient(app=app) as client:
        with caplog.at_level(logging.INFO):
            response = await client.get(f"/test-only/bug/{bug}")
        after = await client.get("/items/5")  # the session the bug failed on serves again
    assert response.status_code == 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == "an internal error occurred"
    assert "retry-after" not in response.headers
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert [(r.name, r.levelno) for r in tracebacks] == [("service.errors", logging.ERROR)]
    assert not any("unavailable" in record.getMessage() for record in caplog.records)
    assert after.status_code == 200
