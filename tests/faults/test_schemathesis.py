"""Generated bad (and good) input: schemathesis against the running service's own OpenAPI document.

Every operation of /schema/openapi.json gets positive and negative cases with a valid token; each
answer must be no 5xx, use a documented status code and content type, and match the documented
schema; data the schema forbids must be refused with a 4xx.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy.engine import URL

from service.config import Settings
from service.migrate import upgrade_to_head
from tests.conftest import AUTH, ServiceProcess, fresh_database, run_service, service_environment
from tests.faults.report import record
from tests.faults.support import ControlledPostgres, seed_rows

# A test-only dependency (the dev extra); say so instead of failing the whole collection.
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import Case, GenerationMode  # noqa: E402
from schemathesis.checks import CheckFunction, not_a_server_error  # noqa: E402
from schemathesis.core.result import Err  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

# Per operation and generation mode; seven operations, positive and negative, so several hundred.
MAX_EXAMPLES = 60
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# Statuses that count as refusing invalid input: schemathesis's default list lacks 413, which is
# the documented answer to a body over MAX_BODY_BYTES.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 404, 405, 406, 409, 413, 415, 422]
            }
        }
    }
)


@pytest.fixture(scope="module")
async def schemathesis_database(
    controlled_postgres: ControlledPostgres,
) -> AsyncIterator[URL]:
    """A migrated database with 50 rows, for this module only."""
    async with fresh_database(controlled_postgres.url(), prefix="schemathesis") as url:
        await asyncio.to_thread(upgrade_to_head, Settings(database_url=url, auth_disabled=True))
        await seed_rows(url, 50)
        yield url


@pytest.fixture(scope="module")
def schemathesis_service(
    schemathesis_database: URL, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """The service as shipped, with small limits so generated batches can reach them."""
    env = service_environment(
        schemathesis_database, MAX_BATCH="20", MAX_BODY_BYTES="8192", SHUTDOWN_DELAY_SECONDS="0"
    )
    with run_service(env, tmp_path_factory.mktemp("schemathesis")) as service:
        yield service
    log = service.log()
    assert "unhandled error" not in log, log


def exercise(operation: Any, mode: GenerationMode, base_url: str) -> Counter[int]:
    """Run one operation's generated cases in one mode; returns the status codes seen."""
    counts: Counter[int] = Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Case[Any]) -> None:
        response = case.call_and_validate(
            base_url=base_url, headers=AUTH, checks=CHECKS, timeout=10
        )
        counts[response.status_code] += 1

    try:
        call()
    except Unsatisfiable:
        # No parameters and no body (the probes): there is nothing to make invalid.
        if not mode.is_negative:
            raise
    return counts


def test_generated_requests_get_documented_answers(schemathesis_service: ServiceProcess) -> None:
    schema = schemathesis.openapi.from_url(
        f"{schemathesis_service.base_url}/schema/openapi.json", config=CONFIG
    )
    totals: Counter[int] = Counter()
    operations = 0
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                totals.update(exercise(operation, mode, schemathesis_service.base_url))
            except (Exception, BaseExceptionGroup) as exc:  # one failure must not hide others
                failures[f"{operation.label} ({mode.value})"] = str(exc)
    record(
        "Bad input",
        f"schemathesis {schemathesis.__version__}: positive and negative cases for all "
        f"{operations} operations of /schema/openapi.json, valid token",
        sum(totals.values()),
        totals,
        "no 5xx; every status code, content type and body as documented; "
        "schema-invalid input refused with 4xx"
        if not failures
        else f"FAILED: {', '.join(sorted(failures))}",
    )
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    assert sum(totals.values()) >= 300, totals
