"""The OpenAPI document against the service's real answers.

Every status each operation documents is produced here by a real request, against the test
database (or, for 503, a database that does not answer): the answer has the documented content
type, a body of the documented schema and, where the document gives an example, the example as
its body. And the document lists no status that no request here produces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import jsonschema_rs
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from service.idempotency import key_lock_id
from tests.conftest import AUTH, TOKEN, asyncpg_dsn, documented_answers, free_port

Client = AsyncTestClient[Any]
JSON = {"Content-Type": "application/json"}
KEY = "key-held-by-another-request"


@dataclasses.dataclass(frozen=True)
class Case:
    """A documented answer (operation and status) and a request that gets it for real."""

    method: str
    template: str
    status: int
    path: str
    content: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # What must hold while the request runs: "database down", "key in flight", "row referenced".
    arranged: str | None = None

    @property
    def name(self) -> str:
        return f"{self.method} {self.template} {self.status}"


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


WRITE = (*AUTH.items(), *JSON.items())
KEYED = (*WRITE, ("Idempotency-Key", KEY))
# The test settings allow 64 KiB per body.
TOO_LARGE = body([{"name": "n" * 70_000, "value": 1}])

CASES = [
    Case("get", "/items", 200, "/items"),
    Case("get", "/items", 400, "/items?limit=0"),
    Case("get", "/items", 503, "/items", arranged="database down"),
    Case("post", "/items", 201, "/items", body([{"name": "new", "value": 1}]), WRITE),
    Case("post", "/items", 400, "/items", b"not json", WRITE),
    Case("post", "/items", 401, "/items", body([{"name": "new", "value": 1}]), tuple(JSON.items())),
    Case(
        "post", "/items", 409, "/items", body([{"name": "new", "value": 1}]), KEYED, "key in flight"
    ),
    Case("post", "/items", 413, "/items", TOO_LARGE, WRITE),
    Case("post", "/items", 415, "/items", body([{"name": "new", "value": 1}]), tuple(AUTH.items())),
    Case("post", "/items", 422, "/items", body([{"name": "\x00", "value": 1}]), WRITE),
    Case(
        "post", "/items", 503, "/items", body([{"name": "new", "value": 1}]), WRITE, "database down"
    ),
    Case("patch", "/items", 200, "/items", body([{"id": 5, "value": 1}]), WRITE),
    Case("patch", "/items", 400, "/items", b'[{"id": 5', WRITE),
    Case("patch", "/items", 401, "/items", body([{"id": 5, "value": 1}]), tuple(JSON.items())),
    Case("patch", "/items", 404, "/items", body([{"id": 7, "value": 1}]), WRITE),
    Case("patch", "/items", 409, "/items", body([{"id": 5, "value": 1}]), KEYED, "key in flight"),
    Case("patch", "/items", 413, "/items", body([{"id": 5, "value": 1}] * 3000), WRITE),
    Case("patch", "/items", 415, "/items", body([{"id": 5, "value": 1}]), tuple(AUTH.items())),
    Case("patch", "/items", 422, "/items", body([{"id": 5, "value": 1}] * 2), WRITE),
    Case("patch", "/items", 503, "/items", body([{"id": 5, "value": 1}]), WRITE, "database down"),
    Case("get", "/items/{item_id}", 200, "/items/5"),
    Case("get", "/items/{item_id}", 404, "/items/7"),
    Case("get", "/items/{item_id}", 503, "/items/5", arranged="database down"),
    Case("delete", "/items/{item_id}", 204, "/items/5", headers=tuple(AUTH.items())),
    Case("delete", "/items/{item_id}", 401, "/items/5"),
    Case("delete", "/items/{item_id}", 404, "/items/7", headers=tuple(AUTH.items())),
    Case(
        "delete", "/items/{item_id}", 409, "/items/5", None, tuple(AUTH.items()), "row referenced"
    ),
    Case("delete", "/items/{item_id}", 503, "/items/5", None, tuple(AUTH.items()), "database down"),
    Case("get", "/healthz", 200, "/healthz"),
    Case("get", "/readyz", 200, "/readyz"),
    Case("get", "/readyz", 503, "/readyz", arranged="database down"),
]


@pytest.fixture
async def document(client: Client) -> dict[str, Any]:
    """The OpenAPI document as the service serves it."""
    answer = await client.get("/schema/openapi.json")
    assert answer.status_code == 200
    parsed: dict[str, Any] = answer.json()
    return parsed


async def test_every_documented_answer_has_a_real_request_here(document: dict[str, Any]) -> None:
    assert {(c.method, c.template, c.status) for c in CASES} == documented_answers(document)


@contextlib.asynccontextmanager
async def key_in_flight(database_url: URL) -> AsyncIterator[None]:
    """KEY's lock held by an outside transaction, as by a first request still running."""
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with holder.transaction():
            lock_id = key_lock_id(hashlib.sha256(TOKEN.encode()).digest(), KEY)
            await holder.execute("SELECT pg_advisory_xact_lock($1)", lock_id)
            yield
    finally:
        await holder.close()


@contextlib.asynccontextmanager
async def row_referenced(engine: AsyncEngine) -> AsyncIterator[None]:
    """Row 5 referred to by another table's foreign key; the table is dropped afterwards."""
    async with engine.begin() as connection:
        await connection.execute(
            text("CREATE TABLE item_notes (item_id integer REFERENCES playing_with_neon (id))")
        )
        await connection.execute(text("INSERT INTO item_notes VALUES (5)"))
    try:
        yield
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE item_notes"))


def database_down(settings: Settings) -> Settings:
    """The test settings, but for a database at a loopback port nothing listens on."""
    nowhere = URL.create(
        "postgresql+asyncpg", username="postgres", host="127.0.0.1", port=free_port()
    )
    return dataclasses.replace(settings, database_url=nowhere.set(database="postgres"))


def schema_validator(document: dict[str, Any], schema: dict[str, Any]) -> Callable[[Any], None]:
    """Validates a value against one of the document's schemas, its $refs resolved."""
    validator = jsonschema_rs.Draft202012Validator({**schema, "components": document["components"]})
    return validator.validate


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_each_documented_answer_is_what_the_service_sends(
    case: Case,
    document: dict[str, Any],
    settings: Settings,
    database_url: URL,
    engine: AsyncEngine,
    notebook_rows: None,
) -> None:
    arranged = contextlib.AsyncExitStack()
    async with arranged:
        if case.arranged == "database down":
            settings = database_down(settings)
        elif case.arranged == "key in flight":
            await arranged.enter_async_context(key_in_flight(database_url))
        elif case.arranged == "row referenced":
            await arranged.enter_async_context(row_referenced(engine))
        else:
            assert case.arranged is None, case.arranged
        async with AsyncTestClient(app=create_app(settings)) as client:
            answer = await client.request(
                case.method.upper(), case.path, content=case.content, headers=dict(case.headers)
            )
    assert answer.status_code == case.status, answer.text
    documented = document["paths"][case.template][case.method]["responses"][str(case.status)]
    content = documented.get("content")
    if content is None:  # 204: nothing follows
        assert answer.content == b""
        return
    ((media_type, shape),) = content.items()
    assert answer.headers["content-type"].split(";")[0] == media_type
    received = answer.json()
    schema_validator(document, shape["schema"])(received)
    examples = [example["value"] for example in shape.get("examples", {}).values()]
    if examples:
        assert received in examples
