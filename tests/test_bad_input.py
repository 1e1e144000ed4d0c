"""Hand-written bad input, family by family: each gets its documented 4xx and changes nothing.

tests/test_routes.py already covers the PATCH body families (truncated, NaN, 1e400, wrong types,
ids 0/-1/2^31/2^63, duplicates, MAX_BATCH + 1) and bad single query values; this corpus adds
the rest: the same families on POST, bodies no JSON decoder should accept (bad UTF-8, lone
surrogates, deep nesting), path ids past 2^63, repeated and empty query parameters, SQL in
parameters, long and exotic names, and, on a real process, a chunked body over MAX_BODY_BYTES.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import (
    AUTH,
    documented_answers,
    run_service,
    service_environment,
    table_snapshot,
)
from tests.faults.report import record

Client = AsyncTestClient[Any]
PROBLEM_JSON = "application/problem+json"
JSON = "application/json"


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def row(name: Any = "ok", value: Any = 1) -> dict[str, Any]:
    return {"name": name, "value": value}


# (family, method, path, body, content type, status); the test settings allow 100 rows per batch
# and 64 KiB per body.
CASES: list[tuple[str, str, str, bytes | None, str | None, int]] = [
    # Not JSON at all, or JSON no strict decoder accepts.
    ("unreadable", "POST", "/items", b"not json", JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": 1}', JSON, 400),
    ("unreadable", "POST", "/items", b" ", JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": 1}] x', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": 1}][]', JSON, 400),
    ("unreadable", "POST", "/items", b"\xef\xbb\xbf" + body([row()]), JSON, 400),
    ("unreadable", "POST", "/items", b"[{'name': 'a', 'value': 1}]", JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": 1,}]', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": 0x10}]', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": .5}]', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "a", "value": 01}]', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "\xff\xfe", "value": 1}]', JSON, 400),
    ("unreadable", "PATCH", "/items", b'[{"id": 5, "value": 1, "\xc3": 1}]', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "\\ud800", "value": 1}]', JSON, 400),
    ("unreadable", "POST", "/items", b'[{"name": "\\udc00x", "value": 1}]', JSON, 400),
    # Well-formed but 20,000 deep: refused at the first level that is not the body's shape.
    ("types", "POST", "/items", b"[" * 20_000 + b"]" * 20_000, JSON, 422),
    ("types", "PATCH", "/items", b"[" * 20_000 + b"]" * 20_000, JSON, 422),
    # NaN, Infinity and numbers past float8, on POST.
    ("numbers", "POST", "/items", b'[{"name": "a", "value": NaN}]', JSON, 400),
    ("numbers", "POST", "/items", b'[{"name": "a", "value": Infinity}]', JSON, 400),
    ("numbers", "POST", "/items", b'[{"name": "a", "value": -Infinity}]', JSON, 400),
    ("numbers", "POST", "/items", b'[{"name": "a", "value": 1.8e308}]', JSON, 422),
    ("numbers", "POST", "/items", b'[{"name": "a", "value": -1e400}]', JSON, 422),
    ("numbers", "POST", "/items", b'[{"name": "a", "value": ' + b"9" * 400 + b"}]", JSON, 422),
    ("numbers", "POST", "/items", body([row(value="NaN")]), JSON, 422),
    ("numbers", "POST", "/items", body([row(value="Infinity")]), JSON, 422),
    # Wrong types and shapes.
    ("types", "POST", "/items", b"null", JSON, 422),
    ("types", "POST", "/items", b'"items"', JSON, 422),
    ("types", "POST", "/items", b"5", JSON, 422),
    ("types", "POST", "/items", b"{}", JSON, 422),
    ("types", "POST", "/items", body([[row()]]), JSON, 422),
    ("types", "POST", "/items", body([row(name=5)]), JSON, 422),
    ("types", "POST", "/items", body([row(name=None)]), JSON, 422),
    ("types", "POST", "/items", body([row(name=["a"])]), JSON, 422),
    ("types", "POST", "/items", body([row(value=True)]), JSON, 422),
    ("types", "POST", "/items", body([row(value={"x": 1})]), JSON, 422),
    ("types", "POST", "/items", body([row(value=None)]), JSON, 422),
    ("types", "POST", "/items", body([{"name": "a"}]), JSON, 422),
    ("types", "POST", "/items", body([{"na\x00me": "a", "value": 1}]), JSON, 422),
    ("types", "PATCH", "/items", body([{"id": 5.0, "value": 1}]), JSON, 422),
    ("types", "PATCH", "/items", body([{"id": 1e3, "value": 1}]), JSON, 422),
    ("types", "PATCH", "/items", body([{"id": True, "value": 1}]), JSON, 422),
    ("types", "PATCH", "/items", body([{"id": None, "value": 1}]), JSON, 422),
    ("types", "PATCH", "/items", body([{"id": 5, "value": True}]), JSON, 422),
    # Ids out of every range, in the body and in the path.
    ("ids", "PATCH", "/items", body([{"id": 2**64, "value": 1}]), JSON, 422),
    ("ids", "PATCH", "/items", body([{"id": -(2**63) - 1, "value": 1}]), JSON, 422),
    ("ids", "PATCH", "/items", body([{"id": 5, "value": 1}, {"id": 2**63, "value": 1}]), JSON, 422),
    ("ids", "DELETE", "/items/-1", None, None, 404),
    ("ids", "DELETE", f"/items/{2**63}", None, None, 404),
    ("ids", "DELETE", f"/items/{2**64}", None, None, 404),
    ("ids", "GET", f"/items/{2**64}", None, None, 404),
    ("ids", "GET", f"/items/-{2**63 + 1}", None, None, 404),
    ("ids", "DELETE", "/items/1e3", None, None, 404),
    ("ids", "DELETE", "/items/5.0", None, None, 404),
    ("ids", "GET", "/items/abc", None, None, 404),
    # Batch sizes on POST (PATCH's are in test_routes).
    ("batch size", "POST", "/items", body([row(f"n{i}") for i in range(101)]), JSON, 422),
    ("batch size", "PATCH", "/items", body([{"id": 5, "value": 1}] * 101), JSON, 422),
    # Bodies over MAX_BODY_BYTES (64 KiB here).
    ("too large", "PATCH", "/items", body([{"id": 5, "value": 1}] * 3000), JSON, 413),
    ("too large", "POST", "/items", body([row("n" * 70_000)]), JSON, 413),
    ("too large", "POST", "/items", b" " * 70_000 + body([row()]), JSON, 413),
    # Not JSON by its Content-Type, on POST (PATCH's are in test_routes).
    ("content type", "POST", "/items", body([row()]), None, 415),
    ("content type", "POST", "/items", body([row()]), "text/plain", 415),
    ("content type", "POST", "/items", body([row()]), "application/xml", 415),
    ("content type", "POST", "/items", body([row()]), "application/jsonx", 415),
    ("content type", "POST", "/items", body([row()]), "multipart/form-data; boundary=x", 415),
    ("content type", "PATCH", "/items", body([{"id": 5, "value": 1}]), "", 415),
    # Names PostgreSQL cannot hold, or longer than 1000 characters.
    ("names", "POST", "/items", body([row("\x00")]), JSON, 422),
    ("names", "POST", "/items", body([row("ok"), row("tail\x00")]), JSON, 422),
    ("names", "POST", "/items", body([row("🚀" * 1001)]), JSON, 422),
    ("names", "POST", "/items", body([row("x" * 60_000)]), JSON, 422),
    # Query parameters: repeated, present without a value, or carrying SQL.
    ("query", "GET", "/items?limit=1&limit=2", None, None, 400),
    ("query", "GET", "/items?after_id=0&after_id=5", None, None, 400),
    ("query", "GET", "/items?min_value=1&min_value=2", None, None, 400),
    ("query", "GET", "/items?limit=", None, None, 400),
    ("query", "GET", "/items?after_id=", None, None, 400),
    ("query", "GET", "/items?min_value=", None, None, 400),
    ("query", "GET", "/items?min_value=%00", None, None, 400),
    ("query", "GET", f"/items?limit={2**63}", None, None, 400),
    ("query", "GET", f"/items?after_id={2**63}", None, None, 400),
    ("SQL", "GET", "/items?min_value=1%20OR%201%3D1", None, None, 400),
    ("SQL", "GET", "/items?after_id=0%3B%20DROP%20TABLE%20playing_with_neon", None, None, 400),
    ("SQL", "GET", "/items?limit=1--", None, None, 400),
    ("SQL", "GET", "/items/1%20OR%201%3D1", None, None, 404),
    ("SQL", "DELETE", "/items/5%3B%20DROP%20TABLE%20playing_with_neon", None, None, 404),
]

FAMILY_TITLES = {
    "unreadable": "Corpus: non-JSON, truncated, bad UTF-8, lone surrogates, 20,000-deep nesting",
    "numbers": "Corpus: NaN, ±Infinity, numbers past float8, numbers as strings (POST)",
    "types": "Corpus: wrong JSON types and shapes, NUL in a key, non-integer ids",
    "ids": "Corpus: ids 2^63, 2^64, -2^63-1 in body and path, non-numeric path ids",
    "batch size": "Corpus: MAX_BATCH + 1 entries (POST, PATCH)",
    "too large": "Corpus: bodies over MAX_BODY_BYTES",
    "content type": "Corpus: missing or non-JSON Content-Type (POST)",
    "names": "Corpus: NUL in a name, names over 1000 characters",
    "query": "Corpus: query parameters repeated, empty, NUL, 2^63",
    "SQL": "Corpus: SQL injection in query parameters and path",
}


@pytest.mark.parametrize(
    ("family", "method", "path", "content", "content_type", "status"),
    CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)],
)
async def test_bad_input_gets_its_4xx_and_changes_nothing(
    client: Client,
    engine: AsyncEngine,
    family: str,
    method: str,
    path: str,
    content: bytes | None,
    content_type: str | None,
    status: int,
) -> None:
    before = await table_snapshot(engine)
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await client.request(method, path, content=content, headers=headers)
    record(
        "Bad input",
        FAMILY_TITLES[family],
        1,
        {response.status_code: 1},
        "documented 4xx as problem+json; table unchanged",
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["status"] == status
    assert await table_snapshot(engine) == before
    # An answer the OpenAPI document does not list for the operation would surprise a client.
    document = (await client.get("/schema/openapi.json")).json()
    template = "/items/{item_id}" if path.startswith("/items/") else path.partition("?")[0]
    assert (method.lower(), template, status) in documented_answers(document)


# Stored and read back exactly as sent: exotic but valid text, and SQL that is only text.
VERBATIM_NAMES = [
    "🚀" * 1000,  # 1000 characters, 4000 bytes: the limit counts characters
    "\u202eevil\u202c",  # right-to-left override
    "👩\u200d👩\u200d👧",  # zero-width joiners
    "e\u0301\u0301\u0301",  # stacked combining accents
    "\U0010ffff\ufffe\uffff",  # the last code point and two noncharacters
    "\\x00 \\u0000 %00",  # a NUL only in spelling
    "Robert'); DROP TABLE playing_with_neon;--",
    "1; DELETE FROM playing_with_neon WHERE true",
    ":name $1 %s %(value)s ?",  # placeholder syntax of several drivers
    "' OR '1'='1",
]


async def test_exotic_and_sql_names_are_stored_verbatim(client: Client) -> None:
    response = await client.post(
        "/items", json=[{"name": n, "value": 1} for n in VERBATIM_NAMES], headers=AUTH
    )
    assert response.status_code == 201, response.text
    created = response.json()["items"]
    statuses = [201]
    for item, name in zip(created, VERBATIM_NAMES, strict=True):
        assert item["name"] == name
        fetched = await client.get(f"/items/{item['id']}")
        statuses.append(fetched.status_code)
        assert fetched.json()["name"] == name
    assert (await client.get("/items")).status_code == 200  # the table is still there
    record(
        "Bad input",
        "Corpus: unicode edge cases and SQL injection strings as names",
        len(VERBATIM_NAMES),
        {201: 1, 200: len(VERBATIM_NAMES)},
        "stored and returned verbatim; never executed",
    )


@pytest.mark.slow
async def test_chunked_body_over_the_limit_is_413_on_a_real_server(
    database_url: URL, engine: AsyncEngine, notebook_rows: None, tmp_path: Path
) -> None:
    """Without Content-Length the limit must hold while the body streams in, not after."""
    before = await table_snapshot(engine)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"["
        for _ in range(2000):  # about 56 KB against a 4 KiB limit
            yield b'{"name": "chunk", "value": 1}, '
        yield b'{"name": "chunk", "value": 1}]'

    env = service_environment(database_url, MAX_BODY_BYTES="4096", SHUTDOWN_DELAY_SECONDS="0")
    with run_service(env, tmp_path) as service:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as http:
            response = await http.post(
                "/items", content=chunks(), headers={**AUTH, "Content-Type": JSON}
            )
    assert response.request.headers["transfer-encoding"] == "chunked"
    record(
        "Bad input",
        "Chunked body over MAX_BODY_BYTES, no Content-Length (real uvicorn)",
        1,
        {response.status_code: 1},
        "413 problem+json while streaming; table unchanged",
    )
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert await table_snapshot(engine) == before
