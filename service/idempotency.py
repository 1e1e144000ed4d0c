"""Idempotency-Key on POST and PATCH: a retried write gets the stored answer, applied once.

The key is claimed (a transaction-scoped advisory lock), the write runs, and its rows are stored
in one statement: the answer is stored with the write, or neither happened. Keys belong to the
bearer token that used them and expire after IDEMPOTENCY_TTL_SECONDS; a background task deletes
expired ones in small batches, one pod at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
from litestar import Request
from sqlalchemy import Executable

from service import queries
from service.auth import token_digest
from service.db import SessionPool, nothing_reached_server
from service.errors import PROBLEM_MEDIA_TYPE, RETRY_AFTER_SECONDS, ProblemException
from service.responses import JSON_MEDIA_TYPE, JSONAnswer

log = logging.getLogger("service.idempotency")

HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Expired keys are looked for this often (or every TTL, if that is shorter), and deleted this
# many per statement, with a pause between statements so requests keep the pool.
EXPIRY_INTERVAL_SECONDS = 60.0
EXPIRY_BATCH = 1000
EXPIRY_PAUSE_SECONDS = 0.1
# The advisory lock the expiry takes, so one pod at a time deletes (any constant will do).
EXPIRY_LOCK_ID = int.from_bytes(
    hashlib.sha256(b"idempotency_keys expiry").digest()[:8], signed=True
)

# What a write answers: status and JSON body, as they are sent and stored.
Answer = tuple[int, bytes]


def idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    """The request's Idempotency-Key, None without one; 400 unless 1..255 printable ASCII."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    valid = 1 <= len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()
    if not valid or len(request.headers.getall(HEADER)) > 1:
        raise ProblemException(
            400,
            f"the Idempotency-Key header must be given once, as 1 to {MAX_KEY_LENGTH} printable"
            " ASCII characters",
        )
    return key


async def write_once(
    request: Request[Any, Any, Any],
    key: str,
    statement: Executable,
    params: Mapping[str, object],
    answer: Callable[[Sequence[Any]], Answer],
) -> JSONAnswer:
    """Run the write and store its rows under the key, or replay the answer stored there: one
    statement (`queries.UPDATE_ITEM_VALUES_ONCE`, `INSERT_ITEMS_ONCE`), so one round trip.

    `answer(rows)` makes the status and body from the write's rows, the first time as on a
    replay, so the answer is encoded already and a handler can return it as its own.

    Sent once more, like any write, only if it provably never reached the server, or if the
    statement found an answer stored while it ran (then nothing of it was applied).
    """
    scope = token_digest(request)
    fingerprint = hashlib.sha256(
        b"%s %s\n%s" % (request.method.encode(), request.url.path.encode(), await request.body())
    ).digest()
    claimed = {
        **params,
        "token_digest": scope,
        "key": key,
        "lock_id": key_lock_id(scope, key),
        "ttl_seconds": request.app.state.settings.idempotency_ttl_seconds,
        "fingerprint": fingerprint,
    }
    sessions: SessionPool = request.app.state.sessions
    for attempt in (1, 2):
        try:
            async with sessions.lease() as session:
                outcome = (await session.execute(statement, claimed)).one()
                await session.commit()  # behind an unprepared pooler: ends the lock's transaction
            break
        except Exception as exc:
            retry = nothing_reached_server(exc) or queries.KEY_STORED_CONCURRENTLY in str(exc)
            if attempt == 2 or not retry:
                raise
            log.info("a keyed write is sent again (%s)", type(exc).__name__)
    if not outcome.locked:
        busy = ProblemException(
            409, "a request with this Idempotency-Key is still in progress; retry shortly"
        )
        busy.headers = {"Retry-After": RETRY_AFTER_SECONDS}
        raise busy
    if outcome.fingerprint is None:
        return _response(*answer(_rows(outcome.result)), replayed=False)
    if outcome.fingerprint != fingerprint:
        raise ProblemException(
            422, "this Idempotency-Key was used with a different request (method, path or body)"
        )
    request.app.state.metrics.idempotent_replays.inc()
    if outcome.body is not None:  # stored before the rows were (migration 0003)
        return _response(outcome.status, outcome.body, replayed=True)
    return _response(*answer(_rows(outcome.stored)), replayed=True)


def _rows(stored: str | None) -> list[list[Any]]:
    """A write's rows as `_write_once` stored them (JSON arrays); none for an empty batch."""
    return msgspec.json.decode(stored) if stored is not None else []


def key_lock_id(scope: bytes, key: str) -> int:
    """The advisory lock a request holds while it runs with this key (64 bits of a hash)."""
    return int.from_bytes(hashlib.sha256(scope + b"\0" + key.encode()).digest()[:8], signed=True)


def _response(status: int, body: bytes, *, replayed: bool) -> JSONAnswer:
    return JSONAnswer(
        body,
        status,
        media_type=PROBLEM_MEDIA_TYPE.encode() if status >= 400 else JSON_MEDIA_TYPE,
        headers=[(REPLAYED_HEADER.lower().encode(), b"true")] if replayed else (),
    )


async def delete_expired_keys(sessions: SessionPool, ttl_seconds: int) -> int:
    """Delete expired keys in batches until none is left; how many were deleted.

    Each batch is a transaction of its own that first takes the expiry's advisory lock: while
    another pod holds it, this one deletes nothing and leaves the work to it.
    """
    deleted = 0
    while True:
        async with sessions.transaction() as session:
            if not (await session.execute(queries.TRY_LOCK, {"lock_id": EXPIRY_LOCK_ID})).scalar():
                return deleted
            params = {"ttl_seconds": ttl_seconds, "batch": EXPIRY_BATCH}
            batch = int((await session.execute(queries.DELETE_EXPIRED_KEYS, params)).scalar_one())
        deleted += batch
        if batch < EXPIRY_BATCH:
            return deleted
        await asyncio.sleep(EXPIRY_PAUSE_SECONDS)


async def expire_keys_forever(sessions: SessionPool, ttl_seconds: int) -> None:
    """The background task: delete expired keys every minute (or every TTL, if shorter)."""
    interval = min(EXPIRY_INTERVAL_SECONDS, ttl_seconds)
    while True:
        await asyncio.sleep(interval)
        try:
            deleted = await delete_expired_keys(sessions, ttl_seconds)
        except Exception as exc:
            # The database may be away; the next round tries again, and requests say so.
            log.warning("deleting expired idempotency keys failed: %s", type(exc).__name__)
            continue
        if deleted:
            log.info("deleted %d expired idempotency keys", deleted)
