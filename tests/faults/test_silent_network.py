"""Fault 6: the network goes silent (packets dropped, no FIN, no RST) between the service and
PostgreSQL, as a NAT or firewall that forgets a connection does.

A TCP proxy of the test's own stops forwarding without closing anything. Every request must end
within DB_STATEMENT_TIMEOUT_MS plus the client margin (never hang), as a 503 that says the
database did not answer in time; once the network forwards again, requests succeed.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from service.config import CLIENT_TIMEOUT_MARGIN_SECONDS
from tests.conftest import AUTH, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import TcpProxy, seed_rows, send

pytestmark = pytest.mark.slow

STATEMENT_TIMEOUT_MS = 500


async def test_a_silent_network_costs_a_bounded_503_never_a_hang(
    fault_database: URL, tmp_path: Path
) -> None:
    await seed_rows(fault_database, 10)
    proxy = TcpProxy(fault_database.port or 5432)
    async with proxy.running():
        env = service_environment(
            fault_database.set(port=proxy.port),
            DB_STATEMENT_TIMEOUT_MS=str(STATEMENT_TIMEOUT_MS),
            DB_POOL_SIZE="4",
            DB_POOL_TIMEOUT="2",
            SHUTDOWN_DELAY_SECONDS="0",
        )
        bound = STATEMENT_TIMEOUT_MS / 1000 + CLIENT_TIMEOUT_MARGIN_SECONDS + 1.0
        with run_service(env, tmp_path) as service:
            async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
                for _ in range(3):  # every pooled connection is open and has run statements
                    warm = await asyncio.gather(*(client.get("/items?limit=5") for _ in range(4)))
                    assert [r.status_code for r in warm] == [200] * 4
                proxy.silent = True
                started = time.monotonic()
                outcomes = await asyncio.gather(
                    *(send(client, "GET", "GET", "/items?limit=5") for _ in range(3)),
                    send(client, "PATCH", "PATCH", "/items", json=[{"id": 3, "value": 3.5}],
                         headers=AUTH),
                )  # fmt: skip
                slowest = time.monotonic() - started
                assert slowest < bound, (slowest, bound)
                for outcome in outcomes:
                    assert outcome.status == 503, outcome
                    assert outcome.problem_json and outcome.retry_after == "1"
                    detail = json.loads(outcome.body)["detail"]
                    assert detail.startswith("the database did not answer in time"), detail
                assert (await client.get("/healthz")).status_code == 200
                proxy.silent = False
                # The connections that went silent are discarded; new ones work.
                recovered = [(await client.get("/items?limit=5")).status_code for _ in range(8)]
                assert recovered == [200] * 8, recovered
            log = service.log()
    assert "Traceback" not in log
    record(
        "Fault 6",
        f"Silent network: a TCP proxy stops forwarding (no FIN, no RST) under reads and a PATCH, "
        f"DB_STATEMENT_TIMEOUT_MS={STATEMENT_TIMEOUT_MS}",
        len(outcomes) + len(recovered),
        status_counts([o.status for o in outcomes] + recovered),
        f"every request ended in {slowest:.2f} s at most (bound {bound:.1f} s) with 503 'the "
        "database did not answer in time' and Retry-After; requests succeed once the network "
        "forwards again",
    )
