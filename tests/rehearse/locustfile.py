"""The load of tests/load/locustfile.py as a client that retries, with a ledger of its writes.

Each request is retried once, at once, on a 503 or a dropped connection (no answer, or HAProxy's
502 for a backend connection that broke); the first try is then reported under "<name> (retried)",
so locust's failures under the other names are what a client saw. A POST carries an
`Idempotency-Key`, the same on its retry, and names its rows `rh-<user>-<sequence>-<row>`; its
rows are kept. Each user PATCHes only ids of its own, so the last acknowledged value of a row is
known. Every worker appends what happened to `REHEARSE_LEDGER_DIR/ledger-<pid>.jsonl`, one JSON
object a line: {"request": name, "end": epoch seconds, "ms": duration, "ok": bool} for every
request, {"post": [names], "ack": bool} and {"patch": [[id, value], ...], "ack": bool} for writes.

Environment, besides tests/load's: REHEARSE_LEDGER_DIR, REHEARSE_ID_SLOTS (how many users may
own a block of ids; at least twice the users), REHEARSE_WORKERS (locust workers).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from locust import events
from locust.env import Environment
from locust.runners import MasterRunner

from tests.load import locustfile as load

LEDGER_DIR = Path(os.environ.get("REHEARSE_LEDGER_DIR", "."))
ID_SLOTS = int(os.environ.get("REHEARSE_ID_SLOTS") or 100)
WORKERS = int(os.environ.get("REHEARSE_WORKERS") or 1)
# 0 is FastHttpUser's status for a request that got no answer (reset, refused, timed out); 502
# is what HAProxy answers where a Service, which balances connections, would drop the connection.
RETRIED_STATUSES = (0, 502, 503)
USER_NUMBERS = itertools.count()
ledger: TextIO | None = None


def write_ledger(entry: dict[str, Any]) -> None:
    if ledger is not None:
        ledger.write(json.dumps(entry, separators=(",", ":")) + "\n")


@events.init.add_listener
def open_ledger(environment: Environment, **_: Any) -> None:
    """Workers (not the master) keep a ledger; line-buffered, so a killed worker loses little."""
    global ledger
    if not isinstance(environment.runner, MasterRunner):
        ledger = (LEDGER_DIR / f"ledger-{os.getpid()}.jsonl").open("a", buffering=1)


@events.request.add_listener
def record_request(name: str, response_time: float, exception: Any, **_: Any) -> None:
    write_ledger(
        {"request": name, "end": time.time(), "ms": round(response_time, 2), "ok": not exception}
    )


class RehearsalUser(load.ItemsUser):
    """ItemsUser that retries once, keys its POSTs, keeps their rows and PATCHes its own ids."""

    keep_created_rows = True

    def on_start(self) -> None:
        worker = getattr(self.environment.runner, "worker_index", 0)
        number = next(USER_NUMBERS)
        slot = number * WORKERS + worker
        if slot >= ID_SLOTS:
            raise RuntimeError(f"user slot {slot} is past REHEARSE_ID_SLOTS={ID_SLOTS}")
        block = load.ROWS // ID_SLOTS
        self.owned_ids = range(slot * block + 1, (slot + 1) * block + 1)
        self.owner = f"w{worker}u{number}"
        self.posts = itertools.count()

    def ids_to_patch(self) -> list[int]:
        count = random.randint(min(10, len(self.owned_ids)), min(100, len(self.owned_ids)))
        return random.sample(self.owned_ids, count)

    def new_names(self) -> list[str]:
        sequence = next(self.posts)
        return [f"rh-{self.owner}-{sequence}-{i}" for i in range(1, random.randint(1, 5) + 1)]

    def call(
        self, method: str, path: str, name: str, check: Callable[[Any], Any], **kwargs: Any
    ) -> Any:
        """Send; once more on a 503 or no answer; judge with `check`; log writes to the ledger."""
        if method == "POST":
            kwargs["headers"] = {**kwargs.get("headers", {}), "Idempotency-Key": str(uuid.uuid4())}
        for attempt in (1, 2):
            with self.client.request(method, path, name=name, catch_response=True, **kwargs) as r:
                if attempt == 1 and r.status_code in RETRIED_STATUSES:
                    r.request_meta["name"] = f"{name} (retried)"
                    r.failure(f"status {r.status_code}: retried once")
                    continue
                try:
                    result = check(r)
                except load.ShapeError as exc:
                    r.failure(str(exc))
                    result, acknowledged = None, False
                else:
                    acknowledged = True
            break
        body = kwargs.get("json")
        if method == "POST":
            write_ledger({"post": [row["name"] for row in body], "ack": acknowledged})
        elif method == "PATCH":
            write_ledger(
                {"patch": [[row["id"], row["value"]] for row in body], "ack": acknowledged}
            )
        return result
