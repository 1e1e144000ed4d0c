"""What an error becomes: only the database's trouble is a 503; a bug of ours is a 500."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url

from service import routes
from service.app import create_app
from service.config import Settings
from tests.conftest import free_port


def fail_with_our_own_oserror(*args: Any, **kwargs: Any) -> Any:
    """What a bug of ours looks like: an OSError that has nothing to do with the database."""
    raise FileNotFoundError(2, "No such file or directory", "missing-template.json")


@pytest.mark.parametrize(
    "function",
    [
        "_check_given_once",  # before the request takes a database session
        "Item",  # while it holds one, between the statement and the response
    ],
)
async def test_an_oserror_of_our_own_is_a_500_with_its_traceback_logged_once(
    client: AsyncTestClient[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    function: str,
) -> None:
    monkeypatch.setattr(routes, function, fail_with_our_own_oserror)
    with caplog.at_level(logging.INFO):
        response = await client.get("/items")
    assert response.status_code == 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "retry-after" not in response.headers
    assert response.json()["detail"] == "an internal error occurred"
    assert "missing-template" not in response.text
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 1, [record.getMessage() for record in tracebacks]
    assert tracebacks[0].levelno == logging.ERROR
    assert isinstance(tracebacks[0].exc_info[1], FileNotFoundError)  # type: ignore[index]
    assert not any("unavailable" in record.getMessage() for record in caplog.records)

    monkeypatch.undo()  # the session the failed request held is usable again
    assert (await client.get("/items/5")).status_code == 200


async def test_a_refused_database_connection_is_a_503_logged_without_a_traceback(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    nobody = make_url(f"postgresql+asyncpg://postgres:pw@127.0.0.1:{free_port()}/nothing")
    refused = dataclasses.replace(settings, database_url=nobody, db_pool_timeout=1.0)
    async with AsyncTestClient(app=create_app(refused)) as client:
        with caplog.at_level(logging.INFO):
            response = await client.get("/items/5")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"] == "the database is unavailable; retry shortly"
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.errors"]
    assert warnings == [
        f"database unavailable (127.0.0.1:{nobody.port}/nothing): connection refused "
        "(is the server running, and is the port right?)"
    ]
    assert not any(record.exc_info for record in caplog.records)
