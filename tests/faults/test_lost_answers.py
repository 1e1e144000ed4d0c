"""Idempotency-Key on real processes: a write whose answer was lost is retried with its key.

Lost two ways: the service is killed (SIGKILL) with keyed POSTs in flight, some committed and
unanswered; or the client sends a keyed POST and drops the connection before the answer. Each
retry must answer the stored answer, or apply the write if it never committed: every key's rows
are in the table exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from sqlalchemy.engine import URL

from tests.conftest import TOKEN, asyncpg_dsn, run_service, service_environment
from tests.faults.report import record, status_counts
from tests.faults.support import Outcome, backends_gone, kill_during_load, send

pytestmark = pytest.mark.slow

WORKERS = 8
BATCH = 200
ROUNDS = 3
KILL_AFTER_ACKNOWLEDGED = 20
DROPPED = 5


def keyed(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key}


def batch(key: str) -> list[dict[str, Any]]:
    """The rows a key's POST inserts, named after the key so they can be counted per key."""
    return [{"name": f"{key}/{i}", "value": 1.0} for i in range(BATCH)]


async def rows_per_key(database: URL) -> dict[str, int]:
    connection = await asyncpg.connect(asyncpg_dsn(database))
    try:
        rows = await connection.fetch(
            "SELECT split_part(name, '/', 1) AS key, count(*) AS rows FROM playing_with_neon "
            "WHERE name LIKE '%/%' GROUP BY 1"
        )
        stored = await connection.fetchval("SELECT count(*) FROM idempotency_keys")
    finally:
        await connection.close()
    counts = {row["key"]: row["rows"] for row in rows}
    counts["(stored answers)"] = stored
    return counts


async def retry_every_key(base_url: str, keys: list[str]) -> dict[str, httpx.Response]:
    """Send each key's POST again (after 409s, again) and return the final answers."""
    answers: dict[str, httpx.Response] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for key in keys:
            for _ in range(50):
                response = await client.post("/items", json=batch(key), headers=keyed(key))
                if response.status_code != 409:
                    break
                await asyncio.sleep(0.1)
            answers[key] = response
    return answers


async def kill_during_keyed_posts(
    env: dict[str, str],
    tmp_path: Path,
    round_number: int,
    sent: list[str],
    acknowledged: dict[str, str],
) -> list[Outcome]:
    """Start the service, send keyed POSTs from WORKERS clients, SIGKILL it mid-load."""
    target = len(acknowledged) + KILL_AFTER_ACKNOWLEDGED
    keys = (f"killed-{round_number}-{n}" for n in itertools.count())

    async def one_post(client: httpx.AsyncClient) -> Outcome:
        key = next(keys)
        sent.append(key)
        outcome = await send(client, "POST", "POST", "/items", json=batch(key), headers=keyed(key))
        if outcome.status == 201:
            acknowledged[key] = outcome.body
        return outcome

    return await kill_during_load(
        env, tmp_path, WORKERS, one_post, lambda: len(acknowledged) >= target
    )


async def test_keyed_posts_in_flight_at_a_sigkill_are_applied_once_on_retry(
    fault_database: URL, tmp_path: Path
) -> None:
    env = service_environment(fault_database, SHUTDOWN_DELAY_SECONDS="0", MAX_BATCH=str(BATCH))
    sent: list[str] = []
    acknowledged: dict[str, str] = {}  # key -> the body of its answer
    outcomes: list[Outcome] = []
    for round_number in range(ROUNDS):
        outcomes += await kill_during_keyed_posts(env, tmp_path, round_number, sent, acknowledged)
        await backends_gone(fault_database)
    assert all(o.status in (201, None) for o in outcomes), status_counts(o.status for o in outcomes)
    before_retry = await rows_per_key(fault_database)
    in_flight = [key for key in sent if key not in acknowledged]

    with run_service(env, tmp_path) as service:
        answers = await retry_every_key(service.base_url, sent)

    assert {key: answer.status_code for key, answer in answers.items()} == dict.fromkeys(sent, 201)
    for key, body in acknowledged.items():
        assert answers[key].headers.get("idempotent-replayed") == "true", key
        assert answers[key].text == body, key
    replayed_in_flight = [key for key in in_flight if "idempotent-replayed" in answers[key].headers]
    # A replayed key had committed before the kill; a key applied now had not.
    for key in in_flight:
        assert (key in replayed_in_flight) == (before_retry.get(key) == BATCH), key
    counts = await rows_per_key(fault_database)
    assert counts == {**dict.fromkeys(sent, BATCH), "(stored answers)": len(sent)}
    record(
        "Idempotency",
        f"SIGKILL of the service, {ROUNDS} times, during {WORKERS} clients' keyed POSTs of {BATCH}"
        " rows; after a restart every key's POST sent again",
        len(sent),
        status_counts(o.status for o in outcomes),
        f"{len(acknowledged)} answered, {len(in_flight)} in flight at the kill; on retry all 201:"
        f" every answered key replayed byte for byte, {len(replayed_in_flight)} in-flight keys "
        f"replayed (committed, answer lost), {len(in_flight) - len(replayed_in_flight)} applied "
        "then; every key's rows present exactly once",
    )


def raw_post(port: int, key: str) -> None:
    """Send a keyed POST and close the connection without reading a byte of the answer."""
    body = msgspec.json.encode(batch(key))
    head = (
        f"POST /items HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(head.encode() + body)


async def test_a_keyed_post_whose_client_dropped_the_connection_is_replayed(
    fault_database: URL, tmp_path: Path
) -> None:
    env = service_environment(fault_database, SHUTDOWN_DELAY_SECONDS="0")
    keys = [f"dropped-{n}" for n in range(DROPPED)]
    with run_service(env, tmp_path) as service:
        port = int(service.base_url.rsplit(":", 1)[1])
        for key in keys:
            raw_post(port, key)
        # The service finishes the work of a client that left: wait (10 s at most) for it.
        for _ in range(100):
            if (await rows_per_key(fault_database))["(stored answers)"] == DROPPED:
                break
            await asyncio.sleep(0.1)
        answers = await retry_every_key(service.base_url, keys)

    for key in keys:
        answer = answers[key]
        assert answer.status_code == 201, answer.text
        assert answer.headers.get("idempotent-replayed") == "true", key
        assert [item["name"] for item in answer.json()["items"]] == [r["name"] for r in batch(key)]
    counts = await rows_per_key(fault_database)
    assert counts == {**dict.fromkeys(keys, BATCH), "(stored answers)": DROPPED}
    record(
        "Idempotency",
        "Keyed POSTs whose client closed the connection before the answer, then sent again",
        DROPPED,
        status_counts(answer.status_code for answer in answers.values()),
        "each retry answered the stored 201 with Idempotent-Replayed: true and the ids of the "
        "rows the first request inserted; every key's rows present exactly once",
    )
