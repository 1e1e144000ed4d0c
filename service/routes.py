"""The item endpoints: small handlers around the statements in `service.queries`."""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request, delete, get, patch, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from service import queries
from service.auth import WRITE_SECURITY, require_json, require_token
from service.errors import ProblemException
from service.schemas import (
    INT4_MAX,
    CreatedItems,
    Item,
    ItemPage,
    NewItem,
    Problem,
    UpdateResult,
    ValueUpdate,
)

T = TypeVar("T")

PROBLEM = ResponseSpec(
    Problem, description="Problem document", media_type="application/problem+json"
)
READ_ERRORS = {400: PROBLEM, 503: PROBLEM}
# 400 is listed explicitly: a malformed JSON body is answered as a problem document, and without
# it the OpenAPI document would show Litestar's default (application/json) 400 instead.
WRITE_ERRORS = {
    400: PROBLEM,
    401: PROBLEM,
    413: PROBLEM,
    415: PROBLEM,
    422: PROBLEM,
    503: PROBLEM,
}


@get("/items", responses=READ_ERRORS)
async def list_items(
    read_session: NamedDependency[AsyncSession],
    request: Request[Any, Any, Any],
    min_value: Annotated[
        float | None, QueryParameter(description="Only rows whose value is greater than this.")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size.")] = 100,
    after_id: Annotated[
        int, QueryParameter(ge=0, le=INT4_MAX, description="Keyset cursor: rows with a larger id.")
    ] = 0,
) -> ItemPage:
    """Rows in id order, optionally only those whose value is above `min_value`."""
    _check_given_once(request, ("min_value", "limit", "after_id"))
    params: dict[str, object] = {"after_id": after_id, "limit": limit}
    if min_value is None:
        result = await read_session.execute(queries.SELECT_ITEMS, params)
    else:
        if not math.isfinite(min_value):
            raise _bad_parameter("min_value", "must be a finite number")
        params["value"] = min_value
        result = await read_session.execute(queries.SELECT_ITEMS_ABOVE_VALUE, params)
    items = [_item(row) for row in result]
    return ItemPage(items=items, next_after_id=items[-1].id if len(items) == limit else None)


@get("/items/{item_id:int}", responses={404: PROBLEM, 503: PROBLEM})
async def get_item(read_session: NamedDependency[AsyncSession], item_id: FromPath[int]) -> Item:
    """One row by id."""
    row = None
    if 1 <= item_id <= INT4_MAX:
        row = (await read_session.execute(queries.SELECT_ITEM, {"id": item_id})).first()
    if row is None:
        raise ProblemException(404, f"no item with id {item_id}")
    return _item(row)


@post(
    "/items",
    guards=[require_token, require_json],
    security=WRITE_SECURITY,
    responses=WRITE_ERRORS,
    description="Inserts all rows in one transaction; answers them with their new ids.",
)
async def create_items(
    db_session: NamedDependency[AsyncSession],
    state: State,
    request: Request[Any, Any, Any],
    data: JSONBody[list[NewItem]],
) -> CreatedItems:
    """Insert a batch of rows."""
    data = await strict_body(request, list[NewItem])
    _check_batch_size(len(data), state.settings.max_batch)
    _check_names(data)
    params = {"names": [item.name for item in data], "values": [item.value for item in data]}
    result = await db_session.execute(queries.INSERT_ITEMS, params)
    rows = sorted(result.all())
    await db_session.commit()
    return CreatedItems(items=[_item(row) for row in rows])


@patch(
    "/items",
    guards=[require_token, require_json],
    security=WRITE_SECURITY,
    responses={**WRITE_ERRORS, 404: PROBLEM, 409: PROBLEM},
    description=(
        "Applies every new value in one transaction, all or nothing: if any id is missing,"
        " nothing changes and the answer is 404 with `missing_ids`."
    ),
)
async def update_values(
    db_session: NamedDependency[AsyncSession],
    state: State,
    request: Request[Any, Any, Any],
    data: JSONBody[list[ValueUpdate]],
) -> UpdateResult:
    """Set new values on existing rows, as one batched UPDATE."""
    data = await strict_body(request, list[ValueUpdate])
    _check_batch_size(len(data), state.settings.max_batch)
    updates = sorted(data, key=lambda update: update.id)
    _check_unique_ids(updates)
    ids = [update.id for update in updates]
    locked = (await db_session.execute(queries.LOCK_ITEMS_FOR_UPDATE, {"ids": ids})).scalars()
    missing = sorted(set(ids).difference(locked))
    if missing:
        await db_session.rollback()
        raise ProblemException(
            404, "some ids do not exist; nothing was changed", missing_ids=missing
        )
    params = [{"id": update.id, "value": update.value} for update in updates]
    await db_session.execute(queries.UPDATE_ITEM_VALUE, params)
    await db_session.commit()
    return UpdateResult(updated=len(params))


@delete(
    "/items/{item_id:int}",
    security=WRITE_SECURITY,
    guards=[require_token],
    responses={401: PROBLEM, 404: PROBLEM, 503: PROBLEM},
)
async def delete_item(db_session: NamedDependency[AsyncSession], item_id: FromPath[int]) -> None:
    """Delete one row by id."""
    deleted = None
    if 1 <= item_id <= INT4_MAX:
        result = await db_session.execute(queries.DELETE_ITEM, {"id": item_id})
        deleted = result.scalar_one_or_none()
        await db_session.commit()
    if deleted is None:
        raise ProblemException(404, f"no item with id {item_id}")


def _item(row: Row[Any, Any, Any]) -> Item:
    """An item from a row of the statements' `id, name, value` columns."""
    return Item(id=row[0], name=row[1], value=row[2])


async def strict_body(request: Request[Any, Any, Any], shape: type[T]) -> T:
    """The JSON body decoded strictly: "5" is not an id and "1.5" is not a value.

    Litestar has already parsed `data` (which also gives the OpenAPI document its request body),
    but it coerces strings to numbers; the body it read is cached, so decoding again is cheap.
    """
    try:
        return msgspec.json.decode(await request.body(), type=shape, strict=True)
    except msgspec.ValidationError as exc:
        raise ProblemException(
            422,
            f"the request body is invalid: {exc}",
            errors=[{"message": str(exc), "source": "body"}],
        ) from None


def _check_batch_size(size: int, max_batch: int) -> None:
    if not 1 <= size <= max_batch:
        raise ProblemException(
            422,
            f"a batch holds 1 to {max_batch} entries; this one holds {size}",
            errors=[{"message": "batch size out of range", "key": "$", "source": "body"}],
        )


def _check_unique_ids(updates: list[ValueUpdate]) -> None:
    duplicates = sorted({a.id for a, b in itertools.pairwise(updates) if a.id == b.id})
    if duplicates:
        raise ProblemException(
            422,
            f"each id may appear once per batch; repeated: {', '.join(map(str, duplicates))}",
            errors=[
                {"message": "duplicate id", "key": str(i), "source": "body"} for i in duplicates
            ],
        )


def _check_names(items: list[NewItem]) -> None:
    # PostgreSQL text cannot hold U+0000; refuse it here rather than fail in the database.
    bad = [i for i, item in enumerate(items) if "\x00" in item.name]
    if bad:
        raise ProblemException(
            422,
            "a name may not contain the NUL character (U+0000)",
            errors=[
                {"message": "NUL in name", "key": f"$[{i}].name", "source": "body"} for i in bad
            ],
        )


def _check_given_once(request: Request[Any, Any, Any], names: tuple[str, ...]) -> None:
    # Litestar silently keeps one of `?limit=1&limit=1000`; which one a proxy or cache in front
    # of us reads is anyone's guess, so an ambiguous query is refused instead.
    for name in names:
        if len(request.query_params.getall(name, [])) > 1:
            raise _bad_parameter(name, "must be given at most once")


def _bad_parameter(name: str, problem: str) -> ValidationException:
    return ValidationException(
        detail=f"invalid query parameter {name}",
        extra=[{"message": problem, "key": name, "source": "query"}],
    )
