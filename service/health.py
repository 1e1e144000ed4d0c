"""Probes: liveness touches nothing; readiness asks the database for `SELECT 1` within 1 s, at
most once per READINESS_MAX_AGE_SECONDS however many callers ask."""

from __future__ import annotations

import asyncio
import contextlib
import math

from litestar import get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Response
from sqlalchemy.ext.asyncio import AsyncEngine

from service.queries import SELECT_ONE
from service.schemas import Health

READINESS_TIMEOUT_SECONDS = 1.0
# How old a readiness answer may be. The kubelet probes every few seconds and a load balancer's
# health check at most every half second, so each of their probes still gets a check of its own;
# a flood of callers shares one, and the database sees at most four `SELECT 1` a second per pod.
READINESS_MAX_AGE_SECONDS = 0.25


class Readiness:
    """Whether the database answers `SELECT 1`, asked on a one-connection engine of its own.

    One check at a time: a caller that comes while one runs waits for it, and a caller within
    READINESS_MAX_AGE_SECONDS of a check's start gets its answer. Each caller asking for a query
    of its own queued them all on the one connection, where a flood of `/readyz` from outside
    held the kubelet's probe past its timeout and took every pod out of service.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._started = -math.inf  # loop time at which the last finished check began
        self._answer = False
        self._check: asyncio.Task[bool] | None = None

    @property
    def answer(self) -> bool:
        """The latest finished check's answer (False before the first)."""
        return self._answer

    async def database_answers(self) -> bool:
        """The answer of the latest check begun within READINESS_MAX_AGE_SECONDS, or a new one."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._started < READINESS_MAX_AGE_SECONDS:
            return self._answer
        if self._check is None:
            self._check = loop.create_task(self._run(loop.time()))
        # Shielded: a caller that goes away does not cancel the check the others wait for.
        return await asyncio.shield(self._check)

    async def _run(self, started: float) -> bool:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
                async with self.engine.connect() as connection:
                    await connection.execute(SELECT_ONE)
            answer = True
        except (
            Exception
        ):  # any failure means "not ready"; the reason is for the logs, not the probe
            answer = False
        self._answer, self._started, self._check = answer, started, None
        return answer

    async def close(self) -> None:
        """Stop a check in progress and close the engine's connection."""
        if self._check is not None:
            self._check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._check
        await self.engine.dispose()


@get("/healthz", sync_to_thread=False, include_in_schema=True)
def get_liveness() -> Health:
    """The process is up and serving; no database call, so a database blip restarts no pod."""
    return Health(status="ok")


@get(
    "/readyz",
    responses={
        503: ResponseSpec(
            Health,
            description="Not ready: the process is draining, or the database did not answer"
            " `SELECT 1` within 1 s.",
            generate_examples=False,
        )
    },
)
async def get_readiness(state: State) -> Response[Health]:
    """200 when the database answers `SELECT 1` within 1 s and the process is not draining.

    The check runs on a connection of its own, never queued behind requests: a pod whose
    database answers is ready even while every pooled connection is busy. Its answer serves
    every caller for READINESS_MAX_AGE_SECONDS.
    """
    if state.draining:
        return Response(Health(status="draining"), status_code=503)
    readiness: Readiness = state.readiness
    if not await readiness.database_answers():
        return Response(Health(status="database unavailable"), status_code=503)
    return Response(Health(status="ready"))
