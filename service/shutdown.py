"""Graceful shutdown: on SIGTERM, fail readiness at once, keep serving a while, then drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from litestar.datastructures import State

log = logging.getLogger("service.shutdown")


def drain_on_sigterm(state: State, delay_seconds: float) -> Callable[[], None]:
    """Chain onto the server's SIGTERM handler; returns a function that unhooks it again.

    uvicorn stops accepting connections the moment it sees SIGTERM, so a readiness probe could
    never see a 503. Instead `/readyz` turns 503 at once and the server keeps serving for
    `delay_seconds`, the time a load balancer needs to stop sending traffic here; only then is
    uvicorn's own handler called, which finishes in-flight requests and runs the lifespan
    shutdown. A second SIGTERM skips the wait.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):  # no server owns the signal (an in-process test client)
        return lambda: None
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if state.draining:
            server_handler(signum, frame)
            return
        state.draining = True
        log.info("SIGTERM: readiness now fails; shutting down in %.1f s", delay_seconds)
        loop.call_soon_threadsafe(loop.call_later, delay_seconds, server_handler, signum, None)

    def stop_watching() -> None:
        signal.signal(signal.SIGTERM, server_handler)

    signal.signal(signal.SIGTERM, on_sigterm)
    return stop_watching
