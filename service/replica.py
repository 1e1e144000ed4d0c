"""Reads on a streaming read replica: routing, the Consistency-Token, the replica's health.

A write answers with a Consistency-Token: the primary's WAL position once its commit is done. A
read that sends it is served on a replica connection only once the server behind that very
connection has replayed that position, so it sees the write; otherwise, after waiting up to
READ_CONSISTENCY_WAIT_MS, by the primary. That holds when the read URL is a load balancer over
several replicas (an RDS reader endpoint, a CloudNativePG `-ro` Service, HAProxy): what one
server has replayed says nothing of another. A read without a token is served by the replica as
it is. A read that finds every replica connection busy for READ_CONSISTENCY_WAIT_MS goes to the
primary. A replica that is down, unreachable or lagging more than READ_MAX_LAG_MS is left aside,
and every read goes to the primary, until a background check (once a second) finds it healthy
again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from service.db import DatabaseUnavailable, PoolTimeout, SessionPool, connection_was_lost
from service.errors import ProblemException, refusal_reason
from service.queries import SELECT_REPLAYED_POSITION, SELECT_WAL_POSITION

log = logging.getLogger("service.replica")

CONSISTENCY_HEADER = "consistency-token"
# Where a write leaves its token in the request's scope state, for the response's headers.
CONSISTENCY_STATE_KEY = "consistency_token"
# A token is the WAL position as 16 hex digits: opaque to clients, cheap to check here.
TOKEN_PATTERN = re.compile(r"[0-9a-f]{16}")
CHECK_INTERVAL_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 1.0
# How often a read with a token asks the replica how far it has replayed: the first time at
# once, then after 2 ms, doubling up to 20 ms.
FIRST_POLL_SECONDS, LONGEST_POLL_SECONDS = 0.002, 0.02
# Samples of the primary's position kept for the lag: ten minutes at one a second.
POSITION_SAMPLES = 600
TARGETS = ("replica", "primary", "fallback")
# Where a replica connection keeps the position its server was last seen to have replayed.
REPLAYED_KEY = "replica_replayed_position"


class RunRead(Protocol):
    """A read on a session of `sessions`, waiting at most `wait` seconds for one if given."""

    def __call__(
        self,
        sessions: SessionPool,
        statement: Executable,
        params: Mapping[str, object],
        wait: float | None = None,
    ) -> Awaitable[Sequence[Any]]: ...


def format_token(position: int) -> str:
    """The Consistency-Token for a WAL position."""
    return f"{position:016x}"


def parse_token(raw: str) -> int:
    """The WAL position in a Consistency-Token header; a malformed token is a 400."""
    if not TOKEN_PATTERN.fullmatch(raw):
        raise ProblemException(
            400,
            "the Consistency-Token header is malformed: send back the one a write answered with",
            errors=[{"message": "malformed token", "key": "Consistency-Token", "source": "header"}],
        )
    return int(raw, 16)


async def wal_position(session: AsyncSession) -> int:
    """The primary's WAL position now: after a commit, at or past that commit's record."""
    return int((await session.execute(SELECT_WAL_POSITION)).scalar_one())


class Replica:
    """The read replica's session pool and what this process knows of its health."""

    def __init__(
        self,
        sessions: SessionPool,
        *,
        replica_probe: AsyncEngine,
        primary_probe: AsyncEngine,
        max_lag_seconds: float,
        consistency_wait_seconds: float,
        behind_pooler: bool,
    ) -> None:
        self.sessions = sessions
        self.replica_probe = replica_probe
        self.primary_probe = primary_probe
        self.max_lag_seconds = max_lag_seconds
        self.consistency_wait_seconds = consistency_wait_seconds
        # Behind a transaction-mode pooler, one connection's transactions may each run on
        # another server connection, so nothing learnt on it holds for the next transaction.
        self.behind_pooler = behind_pooler
        # Unhealthy until the first check has seen it answer.
        self.healthy = False
        self.lag_seconds = float("nan")
        self.reads = dict.fromkeys(TARGETS, 0)
        # (when, position) of the primary, oldest first: the lag is the age of the oldest
        # position the replica has not replayed yet, which needs no clock shared by the servers.
        self._positions: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=POSITION_SAMPLES
        )
        self._task: asyncio.Task[None] | None = None

    async def read(
        self,
        primary: SessionPool,
        token: str | None,
        run: RunRead,
        statement: Executable,
        params: Mapping[str, object],
    ) -> Sequence[Any]:
        """The rows of a read, from the replica when it may serve it, else from the primary."""
        position = 0 if token is None else parse_token(token)
        if not self.healthy:
            self.reads["fallback"] += 1
            return await run(primary, statement, params)
        try:
            if position:
                rows = await self._read_replayed(position, statement, params)
            else:
                rows = await run(self.sessions, statement, params, self.consistency_wait_seconds)
        except Exception as exc:
            self._failed(exc)
            self.reads["fallback"] += 1
            return await run(primary, statement, params)
        if rows is None:
            self.reads["primary"] += 1
            return await run(primary, statement, params)
        self.reads["replica"] += 1
        return rows

    async def _read_replayed(
        self, position: int, statement: Executable, params: Mapping[str, object]
    ) -> Sequence[Any] | None:
        """The rows from a replica connection whose server has replayed `position`, or None
        when none has within the wait (the time spent waiting for the connection included).

        The check and the read are two statements, in that order, on one connection (in one
        transaction behind a pooler): the read's snapshot, taken as it starts, holds everything
        replayed by the time of the check. One statement doing both would take its snapshot
        before it reads the replay position, and replay could pass the token in between.
        """
        wait = self.consistency_wait_seconds
        deadline = time.monotonic() + wait
        # Behind a transaction-mode pooler only a transaction stays on one server.
        leased = self.sessions.transaction if self.behind_pooler else self.sessions.lease
        async with leased(wait) as session:
            if not await self._wait_for(session, position, deadline):
                return None
            return (await session.execute(statement, params)).all()

    async def _wait_for(self, session: AsyncSession, position: int, deadline: float) -> bool:
        """Ask the server behind `session` until it has replayed `position` (True) or the
        deadline has passed (False)."""
        # A connection talks to one server for its life, also through a TCP load balancer, so
        # what its server was seen to have replayed is remembered on the connection and dies
        # with it (a restarted replica ends its connections): only a token past it costs a
        # question. Behind a transaction-mode pooler it is asked every time.
        known = None if self.behind_pooler else _connection_info(session)
        if known is not None and known.get(REPLAYED_KEY, 0) >= position:
            return True
        pause = FIRST_POLL_SECONDS
        while True:
            replayed = int((await session.execute(SELECT_REPLAYED_POSITION)).scalar_one())
            if known is not None:
                known[REPLAYED_KEY] = replayed
            if replayed >= position:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, LONGEST_POLL_SECONDS)

    def _failed(self, exc: Exception) -> None:
        # A lost or refused connection: leave the replica aside until the next check finds it
        # answering. Anything else (a conflict with recovery, a busy pool) concerns one read; a
        # busy pool, which under load is every read for a while, is counted, not logged.
        # Named by refusal_reason, as every database failure's log line: the driver's own message
        # may quote the statement, its parameters and the connection's details.
        if isinstance(exc, DatabaseUnavailable) or connection_was_lost(exc):
            if self.healthy:
                reason = refusal_reason(exc)
                log.warning("the read replica failed (%s); reads go to the primary", reason)
            self.healthy = False
        elif not isinstance(exc, PoolTimeout):
            reason = refusal_reason(exc)
            log.info("a read failed on the replica (%s); it is served by the primary", reason)

    def start(self) -> None:
        """Start the background health check."""
        self._task = asyncio.create_task(self._check_forever(), name="replica-health")

    async def stop(self) -> None:
        """Stop the health check and close the replica's connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sessions.close()
        for engine in (self.sessions.engine, self.replica_probe, self.primary_probe):
            await engine.dispose()

    async def _check_forever(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(CHECK_INTERVAL_SECONDS)

    async def check(self) -> None:
        """One health check: the primary's position, then how far the replica has replayed."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                primary = await _position(self.primary_probe, SELECT_WAL_POSITION)
            self._positions.append((time.monotonic(), primary))
        except Exception:  # noqa: S110 (the primary's own failures are the requests' to report)
            pass  # no new sample: the lag is judged on what the primary last wrote
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                replayed = await _position(self.replica_probe, SELECT_REPLAYED_POSITION)
        except Exception as exc:
            if self.healthy:
                reason = refusal_reason(exc)
                log.warning(
                    "the read replica does not answer (%s); reads go to the primary", reason
                )
            self.healthy = False
            return
        positions = self._positions
        while positions and positions[0][1] <= replayed:
            positions.popleft()
        self.lag_seconds = time.monotonic() - positions[0][0] if positions else 0.0
        healthy = self.lag_seconds <= self.max_lag_seconds
        if healthy != self.healthy:
            if healthy:
                log.info(
                    "the read replica is healthy (lag %.3f s); reads go to it", self.lag_seconds
                )
            else:
                log.warning(
                    "the read replica lags %.1f s behind; reads go to the primary", self.lag_seconds
                )
        self.healthy = healthy


async def _position(engine: AsyncEngine, statement: Executable) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(statement)).scalar_one())


def _connection_info(session: AsyncSession) -> dict[Any, Any] | None:
    """The info dict of the database connection a leased session is bound to: SQLAlchemy keeps
    it for as long as that connection lives, and a new connection starts with an empty one."""
    connection = session.bind
    return connection.info if isinstance(connection, AsyncConnection) else None
