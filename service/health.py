"""Probes: liveness touches nothing; readiness asks the database for `SELECT 1` within 1 s."""

from __future__ import annotations

import asyncio

from litestar import get
from litestar.datastructures import State
from litestar.response import Response

from service.queries import SELECT_ONE
from service.schemas import Health

READINESS_TIMEOUT_SECONDS = 1.0


@get("/healthz", sync_to_thread=False, include_in_schema=True)
def get_liveness() -> Health:
    """The process is up and serving; no database call, so a database blip restarts no pod."""
    return Health(status="ok")


@get("/readyz")
async def get_readiness(state: State) -> Response[Health]:
    """200 when the database answers `SELECT 1` within 1 s and the process is not draining.

    The check runs on a connection of its own, never queued behind requests: a pod whose
    database answers is ready even while every pooled connection is busy.
    """
    if state.draining:
        return Response(Health(status="draining"), status_code=503)
    try:
        async with asyncio.timeout(READINESS_TIMEOUT_SECONDS):
            async with state.probe_engine.connect() as connection:
                await connection.execute(SELECT_ONE)
    except Exception:  # any failure means "not ready"; the reason is for the logs, not the probe
        return Response(Health(status="database unavailable"), status_code=503)
    return Response(Health(status="ready"))
