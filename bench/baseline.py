"""The benchmark's baseline: a bare ASGI app over a raw asyncpg pool, the ceiling for the service.

It answers the two benchmarked requests with the service's own statements and transaction shape
(`GET /items?min_value=&limit=&after_id=` and `PATCH /items`), and nothing else: no framework, no
ORM, no middleware, no logs or metrics. Served by the same uvicorn (uvloop, httptools, one
worker). Never imported by `service/`. Settings, from the environment: DATABASE_URL (any
`postgresql://` form, unix socket via `?host=`), DB_POOL_SIZE (default 10, as the service),
API_TOKENS (comma-separated), HOST (default 127.0.0.1), PORT (default 8001).

Run: python bench/baseline.py
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import msgspec
import uvicorn

# The service's statements (service/queries.py) as SQLAlchemy's asyncpg dialect sends them:
# the same text with $n placeholders, so PostgreSQL plans exactly the same queries.
SELECT_ITEMS_ABOVE_VALUE = (
    "SELECT id, name, value::float8 AS value FROM playing_with_neon "
    "WHERE value > CAST($1 AS float8) AND id > $2 ORDER BY id LIMIT $3"
)
# The whole batch in one statement and one round trip, all or nothing: the rows are locked in
# ascending id order first (a MATERIALIZED CTE, so no plan can reorder the locks), and the UPDATE
# runs only if every id was found; it answers the missing ids (an empty array when applied).
UPDATE_ITEM_VALUES = (
    "WITH locked AS MATERIALIZED ("
    "SELECT id FROM playing_with_neon WHERE id = ANY(CAST($1 AS int4[])) ORDER BY id FOR UPDATE"
    "), updated AS ("
    "UPDATE playing_with_neon AS item SET value = batch.value "
    "FROM unnest(CAST($1 AS int4[]), CAST($2 AS float8[])) AS batch(id, value) "
    "WHERE item.id = batch.id AND (SELECT count(*) FROM locked) = cardinality(CAST($1 AS int4[]))"
    ") SELECT ARRAY(SELECT unnest(CAST($1 AS int4[])) EXCEPT SELECT id FROM locked ORDER BY 1)"
)

INT4_MAX = 2_147_483_647
MAX_BATCH = 1000
JSON_HEADERS = [(b"content-type", b"application/json")]


class Item(msgspec.Struct):
    """One row, as the service returns it."""

    id: int
    name: str
    value: float


class ItemPage(msgspec.Struct):
    """A page of rows, as the service returns it."""

    items: list[Item]
    next_after_id: int | None


class ValueUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """One entry of a PATCH body."""

    id: int
    value: float


class UpdateResult(msgspec.Struct):
    """The PATCH answer."""

    updated: int


encode = msgspec.json.Encoder().encode
decode_updates = msgspec.json.Decoder(list[ValueUpdate], strict=True).decode


class BadRequest(Exception):
    """Answered as a plain JSON error with this status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


def asyncpg_dsn(url: str) -> str:
    """asyncpg takes `postgresql://`; the service's settings also accept `postgresql+asyncpg://`."""
    scheme, sep, rest = url.partition("://")
    return "postgresql" + sep + rest if scheme.startswith("postgres") else url


class Baseline:
    """The ASGI application: lifespan opens the pool, two routes, everything else 404."""

    def __init__(self) -> None:
        self.pool: asyncpg.Pool | None = None
        tokens = [t.strip() for t in os.environ.get("API_TOKENS", "").split(",") if t.strip()]
        self.token_digests = [hashlib.sha256(t.encode()).digest() for t in tokens]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            if scope["path"] == "/items" and scope["method"] == "GET":
                body = await self.list_items(scope["query_string"])
            elif scope["path"] == "/items" and scope["method"] == "PATCH":
                body = await self.update_values(scope, receive)
            else:
                raise BadRequest(404, "not found")
            status = 200
        except BadRequest as exc:
            status, body = exc.status, encode({"status": exc.status, "detail": str(exc)})
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                size = int(os.environ.get("DB_POOL_SIZE", "10"))
                self.pool = await asyncpg.create_pool(
                    asyncpg_dsn(os.environ["DATABASE_URL"]),
                    min_size=size,
                    max_size=size,
                    server_settings={"application_name": "bench-baseline"},
                    # asyncpg's default reset runs `SELECT pg_advisory_unlock_all(); CLOSE ALL;
                    # UNLISTEN *; RESET ALL` on every release, a second round trip per request;
                    # nothing here changes session state, so (like SQLAlchemy's pool, which only
                    # rolls back an open transaction) only an open transaction is undone.
                    reset=keep_session_state,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.pool is not None:
                    await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def list_items(self, query_string: bytes) -> bytes:
        """GET /items: one autocommit SELECT, no BEGIN or ROLLBACK."""
        query = dict(parse_qsl(query_string.decode("latin-1")))
        try:
            min_value = float(query["min_value"])
            limit = int(query.get("limit", "100"))
            after_id = int(query.get("after_id", "0"))
        except (KeyError, ValueError):
            raise BadRequest(400, "min_value, limit and after_id must be numbers") from None
        if not math.isfinite(min_value) or not 1 <= limit <= 1000 or not 0 <= after_id <= INT4_MAX:
            raise BadRequest(400, "a query parameter is out of range")
        assert self.pool is not None  # noqa: S101 (set by the lifespan before any request)
        rows = await self.pool.fetch(SELECT_ITEMS_ABOVE_VALUE, min_value, after_id, limit)
        items = [Item(row[0], row[1], row[2]) for row in rows]
        return encode(ItemPage(items, items[-1].id if len(items) == limit else None))

    async def update_values(self, scope: dict[str, Any], receive: Any) -> bytes:
        """PATCH /items: one statement locks the rows in id order and updates all or none."""
        self.check_token(scope)
        updates = sorted(self.decode_body(await read_body(receive)), key=lambda u: u.id)
        ids = [u.id for u in updates]
        if len(set(ids)) != len(ids):
            raise BadRequest(422, "each id may appear once per batch")
        assert self.pool is not None  # noqa: S101 (set by the lifespan before any request)
        # Autocommit: the one statement is its own transaction, so no BEGIN and no COMMIT.
        missing = await self.pool.fetchval(UPDATE_ITEM_VALUES, ids, [u.value for u in updates])
        if missing:
            raise BadRequest(404, "some ids do not exist; nothing was changed")
        return encode(UpdateResult(len(updates)))

    def check_token(self, scope: dict[str, Any]) -> None:
        headers = dict(scope["headers"])
        scheme, _sep, token = headers.get(b"authorization", b"").decode().partition(" ")
        offered = hashlib.sha256(token.strip().encode()).digest()
        matched = False
        for accepted in self.token_digests:
            matched |= hmac.compare_digest(offered, accepted)
        if scheme.lower() != "bearer" or not matched:
            raise BadRequest(401, "a valid bearer token is required")
        if not headers.get(b"content-type", b"").startswith(b"application/json"):
            raise BadRequest(415, "the body must be JSON")

    @staticmethod
    def decode_body(body: bytes) -> list[ValueUpdate]:
        try:
            updates = decode_updates(body)
        except msgspec.ValidationError as exc:
            raise BadRequest(422, str(exc)) from None
        except msgspec.DecodeError:
            raise BadRequest(400, "the body is not JSON") from None
        if not 1 <= len(updates) <= MAX_BATCH:
            raise BadRequest(422, f"a batch holds 1 to {MAX_BATCH} entries")
        if any(not 1 <= u.id <= INT4_MAX or not math.isfinite(u.value) for u in updates):
            raise BadRequest(422, "an id or value is out of range")
        return updates


async def keep_session_state(connection: asyncpg.Connection) -> None:
    """Pool reset hook: asyncpg has already rolled back any open transaction; nothing else."""


async def read_body(receive: Any) -> bytes:
    """The whole request body from the ASGI receive channel."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


app = Baseline()


def serve(app: Any) -> None:
    """Serve `app` as every server of the benchmark is served: one uvicorn worker (uvloop,
    httptools), no access log, on HOST:PORT."""
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8001")),
        workers=1,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
        log_level="warning",
    )


if __name__ == "__main__":
    serve(app)
