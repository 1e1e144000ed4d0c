"""The benchmark's stack floor: the two benchmarked requests written the plain documented way with
the service's own stack (Litestar, SQLAlchemy's AsyncSession over asyncpg, uvicorn), nothing else.

What a request costs on this stack before anything the service adds: no middleware, logs,
metrics, admission, replicas or keyed writes; one `async_sessionmaker` session per request on the
engine's own pool (size DB_POOL_SIZE, default 10, no overflow), autocommit as the service, the
service's statements. Where the service needs less CPU per request than this, what it does
differently (bench/RESULTS.md, "What each step bought") is why; where a target needs less CPU per
request than either, one worker of this stack cannot reach it. Settings as bench/baseline.py:
DATABASE_URL, DB_POOL_SIZE, API_TOKENS, HOST, PORT.

Run: python bench/stack_floor.py (bench/run.py --only stack-floor,...)
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from baseline import (
    INT4_MAX,
    MAX_BATCH,
    UPDATE_ITEM_VALUES,
    Item,
    ItemPage,
    UpdateResult,
    ValueUpdate,
    asyncpg_dsn,
    serve,
)
from litestar import Litestar, Request, get, patch
from litestar.exceptions import HTTPException
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

# The service's statements (service/queries.py), with SQLAlchemy's named parameters.
SELECT_ITEMS_ABOVE_VALUE = text(
    "SELECT id, name, value::float8 AS value FROM playing_with_neon "
    "WHERE value > CAST(:value AS float8) AND id > :after_id ORDER BY id LIMIT :limit"
)
UPDATE_ITEM_VALUES_NAMED = text(UPDATE_ITEM_VALUES.replace("$1", ":ids").replace("$2", ":values"))


engine = create_async_engine(
    "postgresql+asyncpg://" + asyncpg_dsn(os.environ["DATABASE_URL"]).partition("://")[2],
    pool_size=int(os.environ.get("DB_POOL_SIZE", "10")),
    max_overflow=0,
    isolation_level="AUTOCOMMIT",
    connect_args={"server_settings": {"application_name": "bench-stack-floor"}},
)
Session = async_sessionmaker(engine, expire_on_commit=False)
TOKEN_DIGESTS = [
    hashlib.sha256(t.strip().encode()).digest()
    for t in os.environ.get("API_TOKENS", "").split(",")
    if t.strip()
]


@get("/items")
async def list_items(min_value: float, limit: int = 100, after_id: int = 0) -> ItemPage:
    if not math.isfinite(min_value) or not 1 <= limit <= 1000 or not 0 <= after_id <= INT4_MAX:
        raise HTTPException(status_code=400, detail="a query parameter is out of range")
    params = {"value": min_value, "after_id": after_id, "limit": limit}
    async with Session() as session:
        rows = (await session.execute(SELECT_ITEMS_ABOVE_VALUE, params)).all()
    items = [Item(row[0], row[1], row[2]) for row in rows]
    return ItemPage(items, items[-1].id if len(items) == limit else None)


@patch("/items")
async def update_values(request: Request, data: list[ValueUpdate]) -> UpdateResult:  # type: ignore[type-arg]
    scheme, _sep, token = request.headers.get("authorization", "").partition(" ")
    offered = hashlib.sha256(token.strip().encode()).digest()
    if scheme.lower() != "bearer" or not any(
        hmac.compare_digest(offered, accepted) for accepted in TOKEN_DIGESTS
    ):
        raise HTTPException(status_code=401, detail="a valid bearer token is required")
    if not 1 <= len(data) <= MAX_BATCH:
        raise HTTPException(status_code=422, detail=f"a batch holds 1 to {MAX_BATCH} entries")
    ids = [u.id for u in data]
    if len(set(ids)) != len(ids) or any(not 1 <= i <= INT4_MAX for i in ids):
        raise HTTPException(status_code=422, detail="ids must be distinct int4 values")
    params = {"ids": ids, "values": [u.value for u in data]}
    async with Session() as session:
        missing = (await session.execute(UPDATE_ITEM_VALUES_NAMED, params)).scalar_one()
        await session.commit()
    if missing:
        raise HTTPException(status_code=404, detail="some ids do not exist; nothing was changed")
    return UpdateResult(len(ids))


@asynccontextmanager
async def dispose_engine(app: Litestar) -> AsyncIterator[None]:
    yield
    await engine.dispose()


app = Litestar([list_items, update_values], lifespan=[dispose_engine])

if __name__ == "__main__":
    serve(app)
