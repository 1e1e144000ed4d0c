"""Load test of the items API, weighted like real traffic, checking every answer's shape.

Mostly filtered, keyset-paged reads; some single-row reads; batched PATCHes of 10 to 100 existing
rows; now and then a POST whose rows are deleted again. The target must hold the demo rows
1..LOAD_ROWS (`python -m service seed --rows LOAD_ROWS`), which this test reads and updates but
never deletes. Environment: LOAD_ROWS (default 10000), LOAD_API_TOKEN (bearer token for writes;
unset when the target's writes are open), LOAD_P95_MS (when set, locust exits 1 if the overall
p95 is above it, so an in-cluster Job fails like `make load` does).
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from collections.abc import Callable
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment
from locust.runners import WorkerRunner

ROWS = int(os.environ.get("LOAD_ROWS") or 10_000)
TOKEN = os.environ.get("LOAD_API_TOKEN", "").strip()
WRITE_HEADERS = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
PAGE_SIZES = (10, 20, 50, 100)
# Seeded values lie in [0, 1000); PATCHes keep them there, so every threshold selects some rows.
VALUE_RANGE = (0.0, 1000.0)
ITEM_KEYS = {"id", "name", "value"}
P95_LIMIT_MS = float(os.environ.get("LOAD_P95_MS") or "inf")
log = logging.getLogger("locustfile")


@events.quitting.add_listener
def fail_on_slow_p95(environment: Environment, **_: Any) -> None:
    """Exit status 1 when the overall p95 is above LOAD_P95_MS (failures already give 1)."""
    if isinstance(environment.runner, WorkerRunner) or not environment.stats.total.num_requests:
        return
    p95 = environment.stats.total.get_response_time_percentile(0.95)
    if p95 > P95_LIMIT_MS:
        log.error("p95 %.0f ms is above LOAD_P95_MS=%.0f", p95, P95_LIMIT_MS)
        environment.process_exit_code = 1


class ShapeError(Exception):
    """The answer has the right status but not the promised body."""


def random_value() -> float:
    return round(random.uniform(*VALUE_RANGE), 2)


def json_body(response: ResponseContextManager, status: int) -> Any:
    """The decoded body when the status is `status`; otherwise ShapeError naming what came."""
    if response.status_code != status:
        raise ShapeError(
            f"status {response.status_code}, expected {status}: {(response.text or '')[:200]}"
        )
    try:
        return response.json()
    except ValueError:
        raise ShapeError(f"body is not JSON: {(response.text or '')[:200]}") from None


def check_item(item: Any) -> dict[str, Any]:
    """One item: exactly id (int), name (str), value (float)."""
    if not isinstance(item, dict) or set(item) != ITEM_KEYS:
        raise ShapeError(f"item is not {{id, name, value}}: {item!r}")
    if type(item["id"]) is not int or item["id"] < 1:
        raise ShapeError(f"id is not a positive integer: {item!r}")
    if not isinstance(item["name"], str) or not isinstance(item["value"], float):
        raise ShapeError(f"name is not a string or value not a float: {item!r}")
    return item


def check_page(body: Any, *, limit: int, after_id: int, min_value: float | None) -> int | None:
    """A page: ids ascending past `after_id`, values above `min_value`, a consistent cursor."""
    if not isinstance(body, dict) or set(body) != {"items", "next_after_id"}:
        raise ShapeError(f"page is not {{items, next_after_id}}: {str(body)[:200]}")
    items = body["items"]
    if not isinstance(items, list) or len(items) > limit:
        raise ShapeError(f"items is not a list of at most {limit}")
    previous = after_id
    for item in map(check_item, items):
        if item["id"] <= previous:
            raise ShapeError(f"ids not ascending past {previous}: {item['id']}")
        if min_value is not None and not item["value"] > min_value:
            raise ShapeError(f"value {item['value']} not above min_value {min_value}")
        previous = item["id"]
    expected_cursor = int(items[-1]["id"]) if len(items) == limit else None
    if body["next_after_id"] != expected_cursor:
        raise ShapeError(f"next_after_id {body['next_after_id']!r}, expected {expected_cursor!r}")
    return expected_cursor


def checked(response: ResponseContextManager, check: Any) -> Any:
    """Run `check(response)`; a ShapeError marks the request failed, with its reason."""
    try:
        return check(response)
    except ShapeError as exc:
        response.failure(str(exc))
        return None


class ItemsUser(FastHttpUser):
    """A client of the service: reads most of the time, writes in batches now and then."""

    wait_time = between(0.1, 0.5)
    # Bounded waits so a hung server shows up as failures instead of a stalled test.
    network_timeout = 10.0
    connection_timeout = 5.0
    # Verify TLS against a real deployment (locust's FastHttpUser does not by default).
    insecure = False
    # The rows a POST creates are deleted again, so the table keeps its size.
    keep_created_rows = False

    def call(
        self, method: str, path: str, name: str, check: Callable[[Any], Any], **kwargs: Any
    ) -> Any:
        """One request, judged by `check`; returns what `check` returned, None if it failed."""
        with self.client.request(method, path, name=name, catch_response=True, **kwargs) as r:
            return checked(r, check)

    def ids_to_patch(self) -> list[int]:
        """10 to 100 distinct seeded ids, in random order."""
        return random.sample(range(1, ROWS + 1), random.randint(10, min(100, ROWS)))

    def new_names(self) -> list[str]:
        """Names for the 1 to 5 rows of a POST."""
        tag = uuid.uuid4().hex[:12]
        return [f"load-{tag}-{i}" for i in range(1, random.randint(1, 5) + 1)]

    @task(12)
    def list_items(self) -> None:
        """A filtered (4 in 5) or unfiltered list, then one or two more pages by keyset cursor."""
        limit = random.choice(PAGE_SIZES)
        min_value = random_value() if random.random() < 0.8 else None
        params: dict[str, Any] = {"limit": limit}
        if min_value is not None:
            params["min_value"] = min_value
        cursor: int | None = 0
        pages = 1 + random.randint(0, 2)
        for page in range(pages):
            if page:
                params["after_id"] = cursor
            name = "/items?" + "&".join(sorted(params))
            after_id = cursor or 0
            cursor = self.call(
                "GET",
                "/items",
                name,
                lambda r, after_id=after_id: check_page(
                    json_body(r, 200), limit=limit, after_id=after_id, min_value=min_value
                ),
                params=params,
            )
            if cursor is None:
                return

    @task(5)
    def get_item(self) -> None:
        """One seeded row, which no user deletes, so 404 is a failure."""
        item_id = random.randint(1, ROWS)

        def check(response: ResponseContextManager) -> None:
            if response.status_code == 404:
                # No id in the message, so locust counts these as one error, not one per id.
                raise ShapeError(
                    f"404 for a seeded id: is the target seeded with "
                    f"`python -m service seed --rows {ROWS}`?"
                )
            item = check_item(json_body(response, 200))
            if item["id"] != item_id or item["name"] != f"demo-{item_id:06d}":
                raise ShapeError(f"asked for item {item_id}, got {item!r}")

        self.call("GET", f"/items/{item_id}", "/items/[id]", check)

    @task(2)
    def patch_values(self) -> None:
        """New values for 10 to 100 distinct seeded rows, sent in random order."""
        ids = self.ids_to_patch()
        batch = [{"id": item_id, "value": random_value()} for item_id in ids]

        def check(response: ResponseContextManager) -> None:
            body = json_body(response, 200)
            if body != {"updated": len(batch)}:
                raise ShapeError(f"expected {{'updated': {len(batch)}}}, got {str(body)[:200]}")

        self.call("PATCH", "/items", "/items", check, json=batch, headers=WRITE_HEADERS)

    @task(1)
    def create_then_delete(self) -> None:
        """Insert 1 to 5 rows, check they come back in order with new ids, delete them again."""
        batch = [{"name": name, "value": random_value()} for name in self.new_names()]

        def check(response: ResponseContextManager) -> list[int]:
            body = json_body(response, 201)
            if not isinstance(body, dict) or set(body) != {"items"} or not body["items"]:
                raise ShapeError(f"expected {{items: [...]}}, got {str(body)[:200]}")
            if not isinstance(body["items"], list):
                raise ShapeError(f"items is not a list: {str(body)[:200]}")
            items = [check_item(item) for item in body["items"]]
            sent = [(row["name"], row["value"]) for row in batch]
            if [(item["name"], item["value"]) for item in items] != sent:
                raise ShapeError(f"rows came back changed or reordered: {items!r}")
            ids = [item["id"] for item in items]
            if ids != sorted(set(ids)) or ids[0] <= ROWS:
                raise ShapeError(f"new ids not ascending and past the seeded rows: {ids}")
            return ids

        created = self.call("POST", "/items", "/items", check, json=batch, headers=WRITE_HEADERS)
        if self.keep_created_rows:
            return

        def check_deleted(response: ResponseContextManager) -> bool:
            if response.status_code != 204:
                raise ShapeError(f"status {response.status_code}, expected 204")
            return True

        for item_id in created or []:
            self.call(
                "DELETE", f"/items/{item_id}", "/items/[id]", check_deleted, headers=WRITE_HEADERS
            )
