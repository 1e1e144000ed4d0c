"""SIGTERM under steady load: readiness fails at once, nothing accepted is lost, exit status 0."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import AUTH, run_service, service_environment, table_snapshot

pytestmark = pytest.mark.slow

CLIENTS = 6
ROWS_PER_CLIENT = 20
LOAD_SECONDS_BEFORE_SIGTERM = 1.5
SHUTDOWN_DELAY_SECONDS = 2.0
LOAD_BALANCER_REACTION_SECONDS = 1.0


async def test_sigterm_under_load_loses_nothing(
    database_url: URL, engine: AsyncEngine, tmp_path: Path
) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE playing_with_neon"))
        await connection.execute(
            text("INSERT INTO playing_with_neon (id, name, value) VALUES (:id, 'row', 0)"),
            [{"id": i} for i in range(1, CLIENTS * ROWS_PER_CLIENT + 1)],
        )
    env = service_environment(database_url, SHUTDOWN_DELAY_SECONDS=str(SHUTDOWN_DELAY_SECONDS))
    outcomes: Counter[str] = Counter()
    acknowledged: dict[int, float] = {}  # client -> value of its last acknowledged batch
    lost: list[str] = []
    stop = threading.Event()

    def client_loop(client: int, base_url: str) -> None:
        ids = list(range(client * ROWS_PER_CLIENT + 1, (client + 1) * ROWS_PER_CLIENT + 1))
        batch_number = 0
        with httpx.Client(base_url=base_url, timeout=30) as http:
            while not stop.is_set():
                batch_number += 1
                value = float(client * 1_000_000 + batch_number)
                try:
                    response = http.patch(
                        "/items", json=[{"id": i, "value": value} for i in ids], headers=AUTH
                    )
                except httpx.ConnectError:
                    outcomes["refused before sending"] += 1  # not accepted, so not lost
                    time.sleep(0.05)
                    continue
                except httpx.HTTPError as exc:  # accepted, then dropped: that is a loss
                    lost.append(f"{type(exc).__name__}: {exc}")
                    continue
                outcomes[str(response.status_code)] += 1
                if response.status_code == 200:
                    acknowledged[client] = value
                else:
                    lost.append(f"{response.status_code}: {response.text}")

    def run_load_and_stop() -> tuple[httpx.Response, httpx.Response, float, int, str]:
        with run_service(env, tmp_path) as service:
            threads = [
                threading.Thread(target=client_loop, args=(c, service.base_url))
                for c in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            time.sleep(LOAD_SECONDS_BEFORE_SIGTERM)
            service.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            with httpx.Client(base_url=service.base_url, timeout=5) as probe:
                readiness = probe.get("/readyz")
                liveness = probe.get("/healthz")
            probe_seconds = time.monotonic() - signalled
            # Like a load balancer, the clients need a moment to notice the failed readiness;
            # they stop sending within the shutdown delay, before the listener closes.
            time.sleep(LOAD_BALANCER_REACTION_SECONDS)
            stop.set()
            exit_status = service.process.wait(timeout=30)
            for thread in threads:
                thread.join(timeout=30)
        return readiness, liveness, probe_seconds, exit_status, service.log()

    # The clients block; they run in a thread so the event loop (and the engine) stays free.
    readiness, liveness, probe_seconds, exit_status, log = await asyncio.to_thread(
        run_load_and_stop
    )
    assert readiness.status_code == 503
    assert liveness.status_code == 200
    assert probe_seconds < SHUTDOWN_DELAY_SECONDS - 0.5  # at once, not after the delay
    assert exit_status == 0, log
    assert lost == []
    assert outcomes["200"] > CLIENTS  # the load really ran, before and during the drain
    final = {row[0]: row[2] for row in await table_snapshot(engine)}
    for client in range(CLIENTS):
        values = {
            final[i]
            for i in range(client * ROWS_PER_CLIENT + 1, (client + 1) * ROWS_PER_CLIENT + 1)
        }
        assert values == {acknowledged.get(client, 0.0)}, (client, values)
    assert "Traceback" not in log
