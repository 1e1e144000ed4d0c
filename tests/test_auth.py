"""Writes need a bearer token from API_TOKENS; reads do not."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from tests.conftest import AUTH, TOKEN, table_snapshot

Client = AsyncTestClient[Any]

WRITES = [
    ("POST", "/items", [{"name": "x", "value": 1}]),
    ("PATCH", "/items", [{"id": 5, "value": 1}]),
    ("DELETE", "/items/5", None),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}],
    ids=["none", "wrong", "no-scheme"],
)
async def test_write_without_valid_token_is_401_and_changes_nothing(
    client: Client, engine: AsyncEngine, method: str, path: str, body: Any, headers: dict[str, str]
) -> None:
    before = await table_snapshot(engine)
    response = await client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert await table_snapshot(engine) == before


async def test_reads_need_no_token(client: Client) -> None:
    assert (await client.get("/items")).status_code == 200
    assert (await client.get("/items/5")).status_code == 200


async def value_of(engine: AsyncEngine, item_id: int) -> float:
    """The row's value as committed, read through the tests' own connection."""
    return {row[0]: row[2] for row in await table_snapshot(engine)}[item_id]


async def test_any_configured_token_is_accepted(
    settings: Settings, engine: AsyncEngine, notebook_rows: None
) -> None:
    second = "second-token-abcdefghijklmnop"
    app = create_app(dataclasses.replace(settings, api_tokens=(TOKEN, second)))
    async with AsyncTestClient(app=app) as client:
        # A different value per token: each write must land, not merely be answered 200.
        for token, value in ((TOKEN, 2.0), (second, 3.0)):
            headers = {"Authorization": f"Bearer {token}"}
            response = await client.patch(
                "/items", json=[{"id": 5, "value": value}], headers=headers
            )
            assert (response.status_code, response.json()) == (200, {"updated": 1})
            assert await value_of(engine, 5) == value


async def test_auth_disabled_opens_writes(
    settings: Settings, engine: AsyncEngine, notebook_rows: None
) -> None:
    app = create_app(dataclasses.replace(settings, api_tokens=(), auth_disabled=True))
    async with AsyncTestClient(app=app) as client:
        response = await client.patch("/items", json=[{"id": 5, "value": 4.0}])
        assert (response.status_code, response.json()) == (200, {"updated": 1})
    assert await value_of(engine, 5) == 4.0


async def test_token_is_checked_before_the_body(client: Client) -> None:
    response = await client.patch(
        "/items", content=b"garbage", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 401
    response = await client.patch(
        "/items", content=b"garbage", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert response.status_code == 415
