"""Idempotency-Key on POST and PATCH, against the real test database, in both engine modes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from service.idempotency import EXPIRY_BATCH, EXPIRY_LOCK_ID, delete_expired_keys, key_lock_id
from tests.conftest import AUTH, TOKEN, asyncpg_dsn, concurrent_client, table_snapshot

Client = AsyncTestClient[Any]
OTHER_TOKEN = "other-token-0123456789abcdef"
ROWS = [{"name": "kept once", "value": 1.5}, {"name": "and this", "value": 2.5}]


def keyed(key: str, token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Idempotency-Key": key}


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


# The request engine is in autocommit mode unless DB_PGBOUNCER=true: both must hold a real
# transaction around a keyed write.
@pytest.fixture(params=[False, True], ids=["autocommit", "DB_PGBOUNCER"])
def keyed_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The test settings with a second token, a name to find the app's connections by, a mode."""
    return dataclasses.replace(
        settings,
        api_tokens=(TOKEN, OTHER_TOKEN),
        db_pgbouncer=request.param,
        db_application_name=f"idempotency-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture
async def keyed_client(
    keyed_settings: Settings, notebook_rows: None, engine: AsyncEngine
) -> AsyncIterator[Client]:
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE idempotency_keys"))
    async with AsyncTestClient(app=create_app(keyed_settings)) as client:
        yield client


async def stored_keys(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    async with engine.connect() as connection:
        result = await connection.execute(
            text(
                "SELECT token_digest, key, json_array_length(result) AS rows "
                "FROM idempotency_keys ORDER BY created_at"
            )
        )
        return [tuple(row) for row in result]


async def test_a_retried_post_gets_the_stored_answer_and_inserts_nothing(
    keyed_client: Client, engine: AsyncEngine
) -> None:
    key = new_key()
    first = await keyed_client.post("/items", json=ROWS, headers=keyed(key))
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    after_first = await table_snapshot(engine)

    retry = await keyed_client.post("/items", json=ROWS, headers=keyed(key))

    assert retry.status_code == 201
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert await table_snapshot(engine) == after_first
    # Stored once, with the write's rows, under the token's digest: never the token itself.
    stored = [(hashlib.sha256(TOKEN.encode()).digest(), key, len(ROWS))]
    assert await stored_keys(engine) == stored


async def test_a_keyed_post_answers_values_as_numbers_with_a_fraction_as_an_unkeyed_one_does(
    keyed_client: Client,
) -> None:
    # The stored rows are JSON, where a whole real like 820 loses its ".0": a client that
    # checks `value` is a float (the rehearsal's locust users do) must see 820.0 either way.
    rows = [{"name": "whole", "value": 820.0}, {"name": "half", "value": 0.5}]
    plain = await keyed_client.post("/items", json=rows, headers=AUTH)
    key = new_key()
    first = await keyed_client.post("/items", json=rows, headers=keyed(key))
    retry = await keyed_client.post("/items", json=rows, headers=keyed(key))
    for answer in (plain, first, retry):
        assert answer.status_code == 201, answer.text
        assert [item["value"] for item in answer.json()["items"]] == [820.0, 0.5]
        assert b'"value":820.0' in answer.content, answer.content


async def test_a_retried_patch_changes_nothing_even_after_other_writes(
    keyed_client: Client, engine: AsyncEngine
) -> None:
    key = new_key()
    first = await keyed_client.patch("/items", json=[{"id": 5, "value": 50}], headers=keyed(key))
    assert first.status_code == 200 and first.json() == {"updated": 1}
    later = await keyed_client.patch("/items", json=[{"id": 5, "value": 7}], headers=AUTH)
    assert later.status_code == 200

    retry = await keyed_client.patch("/items", json=[{"id": 5, "value": 50}], headers=keyed(key))

    assert (retry.status_code, retry.content) == (200, first.content)
    assert retry.headers["idempotent-replayed"] == "true"
    assert (await keyed_client.get("/items/5")).json()["value"] == 7


async def test_a_404_with_missing_ids_is_the_stored_answer_too(
    keyed_client: Client, engine: AsyncEngine
) -> None:
    key = new_key()
    batch = [{"id": 5, "value": 1}, {"id": 999, "value": 1}]
    first = await keyed_client.patch("/items", json=batch, headers=keyed(key))
    assert first.status_code == 404
    assert first.headers["content-type"].startswith("application/problem+json")
    assert first.json()["missing_ids"] == [999]

    retry = await keyed_client.patch("/items", json=batch, headers=keyed(key))

    assert (retry.status_code, retry.content) == (404, first.content)
    assert retry.headers["content-type"] == first.headers["content-type"]
    assert retry.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("POST", [{"name": "kept once", "value": 1.5}]),  # another body
        ("POST", [{"name": "and this", "value": 2.5}, {"name": "kept once", "value": 1.5}]),
        ("PATCH", [{"id": 5, "value": 1}]),  # another method and path
    ],
)
async def test_the_same_key_with_another_request_is_422_and_changes_nothing(
    keyed_client: Client, engine: AsyncEngine, method: str, body: list[dict[str, Any]]
) -> None:
    key = new_key()
    assert (await keyed_client.post("/items", json=ROWS, headers=keyed(key))).status_code == 201
    before = await table_snapshot(engine)

    response = await keyed_client.request(method, "/items", json=body, headers=keyed(key))

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "different request" in response.json()["detail"]
    assert await table_snapshot(engine) == before


@pytest.mark.parametrize(
    "key",
    [b"", b"x" * 256, "cl\xe9".encode("latin-1"), b"tab\there", "ключ".encode()],
    ids=["empty", "256 characters", "latin-1", "tab", "utf-8"],
)
async def test_a_malformed_key_is_400_and_changes_nothing(
    keyed_client: Client, engine: AsyncEngine, key: bytes
) -> None:
    before = await table_snapshot(engine)
    headers = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"idempotency-key", key)]
    response = await keyed_client.post("/items", json=ROWS, headers=headers)
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["detail"]
    assert await table_snapshot(engine) == before
    assert await stored_keys(engine) == []


async def test_a_key_given_twice_is_400(
    keyed_settings: Settings, keyed_client: Client, engine: AsyncEngine
) -> None:
    headers = [
        (b"authorization", f"Bearer {TOKEN}".encode()),
        (b"idempotency-key", b"one"),
        (b"idempotency-key", b"two"),
    ]
    # Litestar's test client would join the two into one; httpx's ASGI transport sends both.
    async with concurrent_client(keyed_settings) as client:
        response = await client.post("/items", json=ROWS, headers=headers)
    assert response.status_code == 400
    assert await stored_keys(engine) == []


async def test_keys_of_255_printable_characters_are_accepted(keyed_client: Client) -> None:
    for key in ("x" * 255, "a", "with space ~!@#$%^&*()"):
        response = await keyed_client.post("/items", json=ROWS, headers=keyed(key))
        assert response.status_code == 201, (key, response.text)


async def test_another_token_with_the_same_key_is_independent(
    keyed_client: Client, engine: AsyncEngine
) -> None:
    key = new_key()
    mine = await keyed_client.post("/items", json=ROWS, headers=keyed(key))
    theirs = await keyed_client.post("/items", json=ROWS[:1], headers=keyed(key, OTHER_TOKEN))

    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "idempotent-replayed" not in theirs.headers  # applied, not my answer
    assert len(await table_snapshot(engine)) == 6 + 3
    mine_again = await keyed_client.post("/items", json=ROWS, headers=keyed(key))
    theirs_again = await keyed_client.post("/items", json=ROWS[:1], headers=keyed(key, OTHER_TOKEN))
    assert mine_again.content == mine.content and theirs_again.content == theirs.content
    assert len(await stored_keys(engine)) == 2


async def test_a_key_in_flight_is_409_with_retry_after_at_once(
    keyed_client: Client, engine: AsyncEngine, database_url: URL
) -> None:
    key = new_key()
    lock_id = key_lock_id(hashlib.sha256(TOKEN.encode()).digest(), key)
    # An outside transaction holds the key's lock, as a first request still running would.
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock($1)", lock_id)
            response = await asyncio.wait_for(
                keyed_client.post("/items", json=ROWS, headers=keyed(key)), timeout=5
            )
            assert response.status_code == 409
            assert response.headers["retry-after"] == "1"
            assert response.headers["content-type"].startswith("application/problem+json")
    finally:
        await holder.close()
    assert len(await table_snapshot(engine)) == 6
    assert (await keyed_client.post("/items", json=ROWS, headers=keyed(key))).status_code == 201


async def test_32_concurrent_duplicates_write_once(
    keyed_settings: Settings, notebook_rows: None, engine: AsyncEngine
) -> None:
    key = new_key()
    async with concurrent_client(keyed_settings) as client:

        async def send() -> httpx.Response:
            return await client.post("/items", json=ROWS, headers=keyed(key), timeout=30)

        responses = await asyncio.wait_for(asyncio.gather(*(send() for _ in range(32))), 60)

    applied = [
        r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers
    ]
    replayed = [r for r in responses if r.headers.get("idempotent-replayed") == "true"]
    busy = [r for r in responses if r.status_code == 409]
    assert len(applied) == 1, [r.status_code for r in responses]
    assert len(applied) + len(replayed) + len(busy) == 32
    assert all(r.content == applied[0].content for r in replayed)
    assert all(r.headers["retry-after"] == "1" for r in busy)
    rows = await table_snapshot(engine)
    assert [row[1] for row in rows[6:]] == [row["name"] for row in ROWS]


async def test_an_expired_key_is_applied_again(
    keyed_settings: Settings, notebook_rows: None, engine: AsyncEngine
) -> None:
    settings = dataclasses.replace(keyed_settings, idempotency_ttl_seconds=1)
    key = new_key()
    async with AsyncTestClient(app=create_app(settings)) as client:
        first = await client.post("/items", json=ROWS, headers=keyed(key))
        await asyncio.sleep(1.2)
        again = await client.post("/items", json=ROWS, headers=keyed(key))
        await asyncio.sleep(1.2)
        other = await client.patch("/items", json=[{"id": 5, "value": 3}], headers=keyed(key))
    assert (first.status_code, again.status_code) == (201, 201)
    assert "idempotent-replayed" not in again.headers and again.content != first.content
    # Once expired, the key is free for any request.
    assert other.status_code == 200 and "idempotent-replayed" not in other.headers
    assert len(await table_snapshot(engine)) == 6 + 2 * len(ROWS)


async def insert_keys(engine: AsyncEngine, count: int, age: str) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO idempotency_keys (token_digest, key, fingerprint, status, body,"
                " created_at) SELECT '\\x00', CAST(:age AS text) || g, '\\x00', 201, '{}',"
                " now() - CAST(:age AS interval) FROM generate_series(1, :count) AS g"
            ),
            {"age": age, "count": count},
        )


async def test_expired_keys_are_deleted_in_batches_one_pod_at_a_time(
    keyed_settings: Settings, engine: AsyncEngine, database_url: URL
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE idempotency_keys"))
    await insert_keys(engine, 2 * EXPIRY_BATCH + 500, "2 days")
    await insert_keys(engine, 7, "1 hour")
    app = create_app(keyed_settings)
    async with app.lifespan():
        sessions = app.state.sessions
        # Another pod is at it: this one leaves the work to it.
        holder = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", EXPIRY_LOCK_ID)
            assert await delete_expired_keys(sessions, 86400) == 0
        finally:
            await holder.close()

        assert await delete_expired_keys(sessions, 86400) == 2 * EXPIRY_BATCH + 500
        assert await delete_expired_keys(sessions, 86400) == 0

    assert len(await stored_keys(engine)) == 7


async def test_the_service_deletes_expired_keys_by_itself(
    keyed_settings: Settings, engine: AsyncEngine
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE idempotency_keys"))
    await insert_keys(engine, 50, "1 minute")
    # With a TTL of 1 s, the service looks for expired keys every second.
    app = create_app(dataclasses.replace(keyed_settings, idempotency_ttl_seconds=1))
    async with app.lifespan():
        for _ in range(100):
            if not await stored_keys(engine):
                break
            await asyncio.sleep(0.1)
    assert await stored_keys(engine) == []


async def app_connections(engine: AsyncEngine, application_name: str) -> list[tuple[Any, ...]]:
    """(pid, state) of the app's own connections, as the server sees them."""
    async with engine.connect() as connection:
        result = await connection.execute(
            text("SELECT pid, state FROM pg_stat_activity WHERE application_name = :name"),
            {"name": application_name},
        )
        return [tuple(row) for row in result]


async def test_a_failed_keyed_write_leaves_its_pooled_connection_idle(
    keyed_settings: Settings, notebook_rows: None, engine: AsyncEngine, database_url: URL
) -> None:
    settings = dataclasses.replace(keyed_settings, db_pool_size=1, db_statement_timeout_ms=300)
    name = settings.db_application_name
    key = new_key()
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.post("/items", json=ROWS, headers=keyed(key))).status_code == 201
        ((pid, state),) = await app_connections(engine, name)
        assert state == "idle"

        # Refused inside the transaction: a different request with the key.
        mismatch = await client.post("/items", json=ROWS[:1], headers=keyed(key))
        assert mismatch.status_code == 422
        assert await app_connections(engine, name) == [(pid, "idle")]

        # Failed in the database mid-transaction: the row is locked and the statement times out.
        holder = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM playing_with_neon WHERE id = 5 FOR UPDATE")
                timed_out = await client.patch(
                    "/items", json=[{"id": 5, "value": 9}], headers=keyed(new_key())
                )
        finally:
            await holder.close()
        assert timed_out.status_code == 503
        if settings.db_pgbouncer:
            # The client enforced the timeout and, as for any request, aborted that connection.
            await backend_gone(engine, pid)
        else:
            # The server cancelled the statement; the aborted transaction was rolled back.
            assert await app_connections(engine, name) == [(pid, "idle")]

        # The next request's connection is not inside anyone's transaction.
        applied = await client.patch("/items", json=[{"id": 5, "value": 9}], headers=AUTH)
        assert applied.status_code == 200
        assert [state for _pid, state in await app_connections(engine, name)] == ["idle"]
    assert {row[0]: row[2] for row in await table_snapshot(engine)}[5] == 9.0


async def backend_gone(engine: AsyncEngine, pid: int) -> None:
    async with engine.connect() as connection:
        for _ in range(50):
            alive = await connection.execute(
                text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
            )
            if alive.first() is None:
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"backend {pid} still there")
