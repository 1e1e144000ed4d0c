"""The item endpoints through Litestar's test client, against the real test database."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import AUTH, table_snapshot

Client = AsyncTestClient[Any]
PROBLEM_JSON = "application/problem+json"


def ids(body: dict[str, Any]) -> list[int]:
    return [item["id"] for item in body["items"]]


async def test_list_above_threshold_is_the_notebook_query(client: Client) -> None:
    response = await client.get("/items", params={"min_value": 23})
    assert response.status_code == 200
    body = response.json()
    assert ids(body) == [12, 19, 21, 22]
    assert body["items"][0] == {"id": 12, "name": "TAlha Bhai", "value": 4265.3}
    assert body["next_after_id"] is None


async def test_list_without_threshold_returns_every_row_in_id_order(client: Client) -> None:
    body = (await client.get("/items")).json()
    assert ids(body) == [5, 6, 12, 19, 21, 22]


async def test_keyset_paging_walks_every_row_once(client: Client) -> None:
    seen: list[int] = []
    after_id = 0
    pages = 0
    while True:
        response = await client.get("/items", params={"limit": 2, "after_id": after_id})
        body = response.json()
        seen += ids(body)
        pages += 1
        if body["next_after_id"] is None:
            break
        assert body["next_after_id"] == ids(body)[-1]
        after_id = body["next_after_id"]
    assert seen == [5, 6, 12, 19, 21, 22]
    assert pages == 4  # three full pages, then an empty one says there is no more


async def test_threshold_and_paging_combine(client: Client) -> None:
    body = (await client.get("/items", params={"min_value": 23, "limit": 2})).json()
    assert ids(body) == [12, 19]
    assert body["next_after_id"] == 19
    body = (await client.get("/items", params={"min_value": 23, "after_id": 19})).json()
    assert ids(body) == [21, 22]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("min_value=abc", "min_value"),
        ("min_value=nan", "min_value"),
        ("min_value=inf", "min_value"),
        ("min_value=1e999", "min_value"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after_id=-1", "after_id"),
        ("after_id=2147483648", "after_id"),
        ("after_id=x", "after_id"),
    ],
)
async def test_bad_query_parameter_is_400_naming_it(
    client: Client, query: str, parameter: str
) -> None:
    response = await client.get(f"/items?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == 400
    assert parameter in body["detail"]


async def test_get_one_item(client: Client) -> None:
    response = await client.get("/items/19")
    assert response.status_code == 200
    assert response.json() == {"id": 19, "name": "Updated_VSCODE", "value": 78.79}


@pytest.mark.parametrize("item_id", ["7", "0", "-1", "2147483648", "9223372036854775808"])
async def test_get_missing_item_is_404(client: Client, item_id: str) -> None:
    response = await client.get(f"/items/{item_id}")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["status"] == 404


async def test_post_inserts_batch_with_fresh_ids(client: Client, engine: AsyncEngine) -> None:
    rows = [{"name": "first", "value": 1.5}, {"name": "second", "value": -2}]
    response = await client.post("/items", json=rows, headers=AUTH)
    assert response.status_code == 201
    items = response.json()["items"]
    assert [(i["name"], i["value"]) for i in items] == [("first", 1.5), ("second", -2.0)]
    assert items[0]["id"] > 22 and items[1]["id"] == items[0]["id"] + 1
    stored = await table_snapshot(engine)
    assert (items[0]["id"], "first", 1.5) in stored
    assert (items[1]["id"], "second", -2.0) in stored


async def test_post_stores_unicode_and_sql_verbatim(client: Client) -> None:
    names = ["Zoë 🚀 Ωmega", "'; DROP TABLE playing_with_neon; --", "x" * 1000]
    response = await client.post(
        "/items", json=[{"name": n, "value": 1} for n in names], headers=AUTH
    )
    assert response.status_code == 201
    new_ids = ids(response.json())
    for new_id, name in zip(new_ids, names, strict=True):
        assert (await client.get(f"/items/{new_id}")).json()["name"] == name


async def test_patch_applies_the_notebook_batch(client: Client, engine: AsyncEngine) -> None:
    batch = [{"id": 6, "value": 15.99}, {"id": 5, "value": 11.0}, {"id": 22, "value": 1}]
    response = await client.patch("/items", json=batch, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"updated": 3}
    stored = {row[0]: row[2] for row in await table_snapshot(engine)}
    assert stored[5] == 11.0 and stored[6] == 15.99 and stored[22] == 1.0


async def test_patch_with_a_missing_id_changes_nothing(client: Client, engine: AsyncEngine) -> None:
    before = await table_snapshot(engine)
    batch = [{"id": 5, "value": 1000}, {"id": 7, "value": 1}, {"id": 99, "value": 2}]
    response = await client.patch("/items", json=batch, headers=AUTH)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert response.json()["missing_ids"] == [7, 99]
    assert await table_snapshot(engine) == before


@pytest.mark.parametrize(
    ("batch", "named"),
    [
        ([], "0"),
        ([{"id": 5, "value": 1}, {"id": 5, "value": 2}], "5"),
        ([{"id": 0, "value": 1}], "$[0].id"),
        ([{"id": -1, "value": 1}], "$[0].id"),
        ([{"id": 5, "value": 1}, {"id": 2**31, "value": 1}], "$[1].id"),
        ([{"id": 2**63, "value": 1}], "$[0].id"),
        ([{"id": 5, "value": "eleven"}], "$[0].value"),
        ([{"id": 5, "value": None}], "$[0].value"),
        ([{"id": "5", "value": 1}], "$[0].id"),
        ([{"id": 5}], "value"),
        ([{"id": 5, "value": 1, "name": "extra"}], "name"),
        ({"id": 5, "value": 1}, "array"),
    ],
)
async def test_bad_patch_batch_is_422_naming_the_entry(
    client: Client, engine: AsyncEngine, batch: Any, named: str
) -> None:
    before = await table_snapshot(engine)
    response = await client.patch("/items", json=batch, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert named in body["detail"] or named in str(body.get("errors"))
    assert await table_snapshot(engine) == before


async def test_patch_over_max_batch_is_422(client: Client, engine: AsyncEngine) -> None:
    before = await table_snapshot(engine)
    batch = [{"id": i, "value": 1} for i in range(1, 102)]  # the test settings allow 100
    response = await client.patch("/items", json=batch, headers=AUTH)
    assert response.status_code == 422
    assert "101" in response.json()["detail"]
    assert await table_snapshot(engine) == before


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [{"name": "", "value": 1}],
        [{"name": "a\x00b", "value": 1}],
        [{"name": "x" * 1001, "value": 1}],
        [{"name": "ok", "value": "1"}],
        [{"value": 1}],
        [{"name": "ok", "value": 1, "id": 5}],
    ],
)
async def test_bad_post_batch_is_422(client: Client, engine: AsyncEngine, rows: Any) -> None:
    before = await table_snapshot(engine)
    response = await client.post("/items", json=rows, headers=AUTH)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert await table_snapshot(engine) == before


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b'[{"id": 5, "value": 1}', "application/json", 400),
        (b"not json", "application/json", 400),
        (b'[{"id": 5, "value": NaN}]', "application/json", 400),
        (b'[{"id": 5, "value": Infinity}]', "application/json", 400),
        # Well-formed JSON, but past float8: the value is refused, not the syntax.
        (b'[{"id": 5, "value": 1e400}]', "application/json", 422),
        (b'[{"id": 5, "value": -1e400}]', "application/json", 422),
        (b'[{"id": 5, "value": 1}]', "text/plain", 415),
        (b'[{"id": 5, "value": 1}]', "application/x-www-form-urlencoded", 415),
    ],
)
async def test_unreadable_body_is_refused(
    client: Client, engine: AsyncEngine, body: bytes, content_type: str, status: int
) -> None:
    before = await table_snapshot(engine)
    response = await client.patch(
        "/items", content=body, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert await table_snapshot(engine) == before


async def test_body_over_the_limit_is_413(client: Client, engine: AsyncEngine) -> None:
    before = await table_snapshot(engine)
    rows = [{"name": "n" * 900, "value": 1} for _ in range(80)]  # ~73 KB, limit is 64 KiB
    response = await client.post("/items", json=rows, headers=AUTH)
    assert response.status_code == 413
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    assert await table_snapshot(engine) == before


async def test_delete_removes_the_row(client: Client, engine: AsyncEngine) -> None:
    response = await client.delete("/items/21", headers=AUTH)
    assert response.status_code == 204
    assert 21 not in [row[0] for row in await table_snapshot(engine)]
    assert (await client.delete("/items/21", headers=AUTH)).status_code == 404


@pytest.mark.parametrize("item_id", ["7", "0", "2147483648"])
async def test_delete_missing_is_404(client: Client, item_id: str) -> None:
    response = await client.delete(f"/items/{item_id}", headers=AUTH)
    assert response.status_code == 404


async def test_unknown_route_and_method_are_problem_documents(client: Client) -> None:
    response = await client.get("/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    response = await client.put("/items", json=[], headers=AUTH)
    assert response.status_code == 405
    assert response.headers["content-type"].startswith(PROBLEM_JSON)


async def test_openapi_documents_every_operation(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths["/items"]) == {"get", "post", "patch"}
    assert set(paths["/items/{item_id}"]) == {"get", "delete"}
    assert {"/healthz", "/readyz"} <= set(paths)
    components = schema["components"]["schemas"]
    for name in ("Item", "ItemPage", "NewItem", "ValueUpdate", "UpdateResult", "Problem"):
        assert name in components
    patch = paths["/items"]["patch"]
    assert "requestBody" in patch
    assert patch["security"] == [{"BearerToken": []}]
    assert "security" not in paths["/items"]["get"]
    assert schema["components"]["securitySchemes"]["BearerToken"]["scheme"] == "bearer"
    assert {"200", "401", "404", "422"} <= set(patch["responses"])


async def test_openapi_names_the_shape_of_every_success_answer(client: Client) -> None:
    # The item handlers return encoded answers (service.responses), so their success schemas
    # come from each route's `responses`, not from a return annotation: check they are there.
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    expected = {
        ("/items", "get", "200"): "ItemPage",
        ("/items", "post", "201"): "CreatedItems",
        ("/items", "patch", "200"): "UpdateResult",
        ("/items/{item_id}", "get", "200"): "Item",
    }
    for (path, method, status), shape in expected.items():
        success = {code for code in paths[path][method]["responses"] if code.startswith("2")}
        assert success == {status}, (path, method)
        content = paths[path][method]["responses"][status]["content"]
        assert content == {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}
        }, (path, method)


async def test_answers_carry_their_length_and_type(client: Client) -> None:
    response = await client.get("/items", params={"limit": 3})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["x-content-type-options"] == "nosniff"
