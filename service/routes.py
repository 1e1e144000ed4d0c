"""The item endpoints: small handlers around the statements in `service.queries`."""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any

from litestar import Request, delete, get, patch, post
from litestar.exceptions import ValidationException
from litestar.params import JSONBody, QueryParameter
from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncSession

from service import queries
from service.auth import WRITE_SECURITY, authorize_json_write, authorize_write
from service.db import SessionPool, connection_was_lost, nothing_reached_server
from service.docs import (
    NO_SUCH_ITEM,
    READ_ERRORS,
    UNAUTHORIZED,
    UNAVAILABLE,
    WRITE_ERRORS,
    NoValidationError,
    answers,
    problem,
)
from service.errors import CONSTRAINT_CONFLICTS, ProblemException, problem_document, refusal_reason
from service.idempotency import idempotency_key, write_once
from service.replica import (
    CONSISTENCY_HEADER,
    CONSISTENCY_STATE_KEY,
    Replica,
    format_token,
    wal_position,
)
from service.responses import JSONAnswer, encode_json, json_answer
from service.schemas import (
    INT4_MAX,
    CreatedItems,
    Item,
    ItemPage,
    NewItem,
    NewItemsBody,
    PathItemId,
    UpdateResult,
    ValueUpdate,
    ValueUpdatesBody,
)

log = logging.getLogger("service.routes")


MISSING_IDS = "some ids do not exist; nothing was changed"
IDEMPOTENCY = (
    "With an `Idempotency-Key` header (1 to 255 printable ASCII characters), a retry gets the"
    " stored answer with `Idempotent-Replayed: true` and changes nothing; the same key with a"
    " different request is 422, and while the first is still in progress 409 with Retry-After."
)


@get("/items", responses={**answers(ItemPage), **READ_ERRORS})
async def list_items(
    request: Request[Any, Any, Any],
    min_value: Annotated[
        float | None, QueryParameter(description="Only rows whose value is greater than this.")
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000, description="Page size.")] = 100,
    after_id: Annotated[
        int, QueryParameter(ge=0, le=INT4_MAX, description="Keyset cursor: rows with a larger id.")
    ] = 0,
) -> JSONAnswer:
    """Rows in id order, optionally only those whose value is above `min_value`."""
    _check_given_once(request, ("min_value", "limit", "after_id"))
    params: dict[str, object] = {"after_id": after_id, "limit": limit}
    statement = queries.SELECT_ITEMS
    if min_value is not None:
        if not math.isfinite(min_value):
            raise _bad_parameter("min_value", "must be a finite number")
        params["value"] = min_value
        statement = queries.SELECT_ITEMS_ABOVE_VALUE
    items = [Item(*row) for row in await _read(request, statement, params)]
    return json_answer(
        ItemPage(items=items, next_after_id=items[-1].id if len(items) == limit else None)
    )


@get(
    "/items/{item_id:int}",
    responses={**answers(Item), 404: NO_SUCH_ITEM, 503: UNAVAILABLE},
    operation_class=NoValidationError,
)
async def get_item(request: Request[Any, Any, Any], item_id: PathItemId) -> JSONAnswer:
    """One row by id."""
    rows = (
        await _read(request, queries.SELECT_ITEM, {"id": item_id})
        if 1 <= item_id <= INT4_MAX
        else ()
    )
    if not rows:
        raise ProblemException(404, f"no item with id {item_id}")
    return json_answer(Item(*rows[0]))


@post(
    "/items",
    before_request=authorize_json_write,
    security=WRITE_SECURITY,
    responses={
        **answers(CreatedItems, 201),
        **WRITE_ERRORS,
        422: problem(
            "A row does not fit the body's schema (types, bounds, 1..MAX_BATCH rows), a name holds"
            " U+0000, a value breaks a rule of the table, or the Idempotency-Key came with another"
            " request. Nothing was changed.",
            422,
            "a name may not contain the NUL character (U+0000)",
            errors=[{"message": "NUL in name", "key": "$[0].name", "source": "body"}],
        ),
    },
    description=(
        "Inserts all rows in one statement, all or none; answers them with their new ids."
        f" {IDEMPOTENCY}"
    ),
    dto=NewItemsBody,
    return_dto=None,
)
async def create_items(
    request: Request[Any, Any, Any], data: JSONBody[list[NewItem]]
) -> JSONAnswer:
    """Insert a batch of rows."""
    _check_batch_size(len(data), request.app.state.settings.max_batch)
    _check_names(data)
    key = idempotency_key(request)
    params = {"names": [item.name for item in data], "values": [item.value for item in data]}
    if key is not None:
        response = await write_once(
            request, key, queries.INSERT_ITEMS_ONCE, params, _created_answer
        )
        return await _with_token(request, response)
    return json_answer(_created(await _write(request, queries.INSERT_ITEMS, params)), 201)


def _created(rows: Sequence[Any]) -> CreatedItems:
    # float(): a keyed write's rows come back from JSON, where a whole value such as 820.0 is
    # the integer 820; the answer is the same bytes with a key or without.
    return CreatedItems(items=[Item(id, name, float(value)) for id, name, value in sorted(rows)])


def _created_answer(rows: Sequence[Any]) -> tuple[int, bytes]:
    return 201, encode_json(_created(rows))


@patch(
    "/items",
    before_request=authorize_json_write,
    security=WRITE_SECURITY,
    responses={
        **answers(UpdateResult),
        **WRITE_ERRORS,
        404: problem(
            "Some ids do not exist (`missing_ids`); nothing was changed.",
            404,
            MISSING_IDS,
            missing_ids=[7],
        ),
        422: problem(
            "An entry does not fit the body's schema (types, bounds, 1..MAX_BATCH entries), an id"
            " is repeated, a value breaks a rule of the table, or the Idempotency-Key came with"
            " another request. Nothing was changed.",
            422,
            "each id may appear once per batch; repeated: 5",
            errors=[{"message": "duplicate id", "key": "5", "source": "body"}],
        ),
    },
    description=(
        "Applies every new value in one transaction, all or nothing: if any id is missing,"
        f" nothing changes and the answer is 404 with `missing_ids`. {IDEMPOTENCY}"
    ),
    dto=ValueUpdatesBody,
    return_dto=None,
)
async def update_values(
    request: Request[Any, Any, Any], data: JSONBody[list[ValueUpdate]]
) -> JSONAnswer:
    """Set new values on existing rows, as one batched UPDATE."""
    _check_batch_size(len(data), request.app.state.settings.max_batch)
    # No sorting here: the statement itself locks the rows in id order.
    ids = [update.id for update in data]
    _check_unique_ids(ids)
    key = idempotency_key(request)
    params = {"ids": ids, "values": [update.value for update in data]}
    if key is not None:
        answer = functools.partial(_updated_answer, updated=len(ids))
        response = await write_once(request, key, queries.UPDATE_ITEM_VALUES_ONCE, params, answer)
        return await _with_token(request, response)
    (missing,) = (await _write(request, queries.UPDATE_ITEM_VALUES, params))[0]
    if missing:
        raise ProblemException(404, MISSING_IDS, missing_ids=missing)
    return json_answer(UpdateResult(updated=len(ids)))


def _updated_answer(rows: Sequence[Any], *, updated: int) -> tuple[int, bytes]:
    (missing,) = rows[0]
    if missing:
        return 404, encode_json(problem_document(404, MISSING_IDS, missing_ids=missing))
    return 200, encode_json(UpdateResult(updated=updated))


@delete(
    "/items/{item_id:int}",
    security=WRITE_SECURITY,
    before_request=authorize_write,
    responses={
        401: UNAUTHORIZED,
        404: NO_SUCH_ITEM,
        409: problem(
            "Another table refers to this row (a foreign key); nothing was changed.",
            409,
            f"{CONSTRAINT_CONFLICTS['23503']}; nothing was changed",
        ),
        503: UNAVAILABLE,
    },
    operation_class=NoValidationError,
)
async def delete_item(request: Request[Any, Any, Any], item_id: PathItemId) -> None:
    """Delete one row by id."""
    deleted = (
        await _write(request, queries.DELETE_ITEM, {"id": item_id})
        if 1 <= item_id <= INT4_MAX
        else ()
    )
    if not deleted:
        raise ProblemException(404, f"no item with id {item_id}")


async def _read(
    request: Request[Any, Any, Any], statement: Executable, params: Mapping[str, object]
) -> Sequence[Any]:
    """The rows of one read, on the read replica when one is configured and may serve it."""
    state = request.app.state
    replica: Replica | None = state.replica
    if replica is None:
        return await _run_read(state.sessions, statement, params)
    token = request.headers.get(CONSISTENCY_HEADER)
    return await replica.read(state.sessions, token, _run_read, statement, params)


async def _run_read(
    sessions: SessionPool,
    statement: Executable,
    params: Mapping[str, object],
    wait: float | None = None,
) -> Sequence[Any]:
    """A read on a leased session, waiting at most `wait` seconds for one if given.

    A read whose connection turns out dead (the server ended idle sessions or restarted before
    the pool could notice) is sent once more on a fresh connection: it changed nothing and
    returned nothing yet.
    """
    return await _run(
        sessions, statement, params, commit=False, retry_if=connection_was_lost, wait=wait
    )


async def _write(
    request: Request[Any, Any, Any], statement: Executable, params: Mapping[str, object]
) -> Sequence[Any]:
    """The rows a write returns, committed; sent again only if it provably never left us.

    With a read replica configured, the commit's Consistency-Token is left in the request's
    state for the response's headers (service.middleware).
    """
    state = request.app.state
    token_to = request.scope["state"] if state.replica is not None else None
    return await _run(
        state.sessions,
        statement,
        params,
        commit=True,
        retry_if=nothing_reached_server,
        token_to=token_to,
    )


async def _run(
    sessions: SessionPool,
    statement: Executable,
    params: Mapping[str, object],
    *,
    commit: bool,
    retry_if: Callable[[BaseException], bool],
    token_to: dict[str, Any] | None = None,
    wait: float | None = None,
) -> Sequence[Any]:
    for attempt in (1, 2):
        try:
            async with sessions.lease(wait) as session:
                rows = (await session.execute(statement, params)).all()
                if commit:
                    await session.commit()
                    if token_to is not None:
                        await _keep_token(session, token_to)
                return rows
        except Exception as exc:
            if attempt == 2 or not retry_if(exc):
                raise
            log.info("a pooled connection was found dead; the statement is sent again")
    raise AssertionError("unreachable")


async def _with_token(request: Request[Any, Any, Any], response: JSONAnswer) -> JSONAnswer:
    """A keyed write's answer, applied or replayed, with a Consistency-Token when a replica is
    configured: the primary's WAL position now is at or past the commit that answer records."""
    if request.app.state.replica is not None:
        with _without_token_on_failure():
            async with request.app.state.sessions.lease() as session:
                await _keep_token(session, request.scope["state"])
    return response


async def _keep_token(session: AsyncSession, state: dict[str, Any]) -> None:
    # One more round trip, paid only with a replica configured.
    with _without_token_on_failure():
        state[CONSISTENCY_STATE_KEY] = format_token(await wal_position(session))


@contextlib.contextmanager
def _without_token_on_failure() -> Iterator[None]:
    """The write is committed by now: if its position cannot be read (no connection free, the
    database gone silent), it is answered without a token rather than as a failure."""
    try:
        yield
    except Exception as exc:
        reason = refusal_reason(exc)
        log.warning("a write's WAL position could not be read (%s); no Consistency-Token", reason)


def _check_batch_size(size: int, max_batch: int) -> None:
    if not 1 <= size <= max_batch:
        raise ProblemException(
            422,
            f"a batch holds 1 to {max_batch} entries; this one holds {size}",
            errors=[{"message": "batch size out of range", "key": "$", "source": "body"}],
        )


def _check_unique_ids(ids: list[int]) -> None:
    if len(set(ids)) == len(ids):
        return
    duplicates = sorted(i for i, n in collections.Counter(ids).items() if n > 1)
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
    raw: bytes = request.scope["query_string"]
    if b"%" not in raw:  # no key can be disguised by percent-encoding: compare them raw
        raw_keys = [part.partition(b"=")[0] for part in raw.split(b"&") if part]
        if len(raw_keys) == len(set(raw_keys)):
            return
    given = [key for key, _ in request.query_params.multi_items()]
    if len(given) == len(set(given)):
        return
    for name in names:
        if given.count(name) > 1:
            raise _bad_parameter(name, "must be given at most once")


def _bad_parameter(name: str, problem: str) -> ValidationException:
    return ValidationException(
        detail=f"invalid query parameter {name}",
        extra=[{"message": problem, "key": name, "source": "query"}],
    )
