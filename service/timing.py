"""Server-Timing (SERVER_TIMING=true): how long an item request spent in its database statements
and in all, shown by a browser's developer tools beside the request."""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncEngine


class Stopwatch:
    """The seconds one request's statements took, added up."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0


# The stopwatch of the request this task serves (set by `service.middleware`), if it is timed.
CURRENT: ContextVar[Stopwatch | None] = ContextVar("statement_stopwatch", default=None)


def time_statements(engine: AsyncEngine) -> None:
    """Add the time of each statement `engine` runs to the current request's stopwatch: from
    sending it to having its rows (or its error)."""

    def before(
        conn: Any, cursor: Any, statement: str, params: Any, execution: Any, many: bool
    ) -> None:
        execution.timing_started = time.perf_counter()

    def after(
        conn: Any, cursor: Any, statement: str, params: Any, execution: Any, many: bool
    ) -> None:
        _stop(execution)

    def failed(error: ExceptionContext) -> None:
        if error.execution_context is not None:
            _stop(error.execution_context)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    event.listen(engine.sync_engine, "after_cursor_execute", after)
    event.listen(engine.sync_engine, "handle_error", failed)


def _stop(execution: Any) -> None:
    started = execution.__dict__.pop("timing_started", None)
    stopwatch = CURRENT.get()
    if started is not None and stopwatch is not None:
        stopwatch.seconds += time.perf_counter() - started


def server_timing(stopwatch: Stopwatch, total_seconds: float) -> bytes:
    """The header's value: `db;dur=…, total;dur=…` in milliseconds."""
    return f"db;dur={stopwatch.seconds * 1000:.2f}, total;dur={total_seconds * 1000:.2f}".encode()
