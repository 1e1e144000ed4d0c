"""Every error leaves as application/problem+json (RFC 9457); never a stack trace."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from sqlalchemy.exc import DBAPIError, InterfaceError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.db import DatabaseTimeout, DatabaseUnavailable

log = logging.getLogger("service.errors")

PROBLEM_MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_SECONDS = "1"

# SQLSTATEs that mean "the database is not there right now": connection exceptions (class 08),
# shutdown and start-up (57P01..57P03), too many connections, out of memory or disk.
UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300", "53200", "53100")
STATEMENT_TIMEOUT_SQLSTATE = "57014"
# The database refuses us as configured: wrong password or user (class 28), no such database
# (3D000), no table (42P01: migrations not applied). Not the client's fault, and retrying only
# helps once an operator fixes it, so it is a 503 with an error in the log, not a 500.
MISCONFIGURED_SQLSTATES = ("28", "3D000", "42P01")
# Serialization failure, deadlock, lock not available: the same request may succeed if retried.
CONFLICT_SQLSTATES = ("40001", "40P01", "55P03")
# Data exceptions (class 22): a value the column cannot hold, such as an overflow of `real`.
DATA_EXCEPTION_CLASS = "22"


class ProblemException(HTTPException):
    """An HTTP error with extra RFC 9457 members (errors, missing_ids)."""

    def __init__(self, status_code: int, detail: str, **members: Any) -> None:
        super().__init__(detail=detail, status_code=status_code)
        self.members = members


def problem_document(status: int, detail: str, **members: Any) -> dict[str, Any]:
    """An RFC 9457 problem document; `members` become extra top-level members."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    body.update({key: value for key, value in members.items() if value is not None})
    return body


def problem_response(
    status: int, detail: str, headers: dict[str, str] | None = None, **members: Any
) -> Response[dict[str, Any]]:
    """A problem+json response; `members` become extra top-level members."""
    body = problem_document(status, detail, **members)
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own errors (404, 405, 413, validation) and ours, as problem documents."""
    if isinstance(exc, ProblemException):
        return problem_response(exc.status_code, exc.detail, exc.headers, **exc.members)
    if isinstance(exc, ValidationException):
        return _validation_problem(exc)
    status = exc.status_code
    detail = exc.detail if exc.detail and exc.detail != HTTPStatus(status).phrase else ""
    return problem_response(status, detail or _default_detail(status), exc.headers)


def handle_database_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Database failures become 503/409/422 with a reason; only the unexpected is a 500."""
    retry = {"Retry-After": RETRY_AFTER_SECONDS}
    if isinstance(exc, PoolTimeoutError):
        return problem_response(
            503, "the database is busy: no connection became free in time", retry
        )
    if isinstance(exc, DatabaseTimeout):
        # The client-side statement timeout: no answer came in time (a silent network, an
        # overloaded server). A write may or may not have been applied; PATCH is safe to resend.
        log.warning("the database did not answer within the statement timeout")
        return problem_response(503, "the database did not answer in time; retry shortly", retry)
    sqlstate = _sqlstate(exc)
    if (
        isinstance(exc, DatabaseUnavailable | InterfaceError)
        or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        or (sqlstate is not None and sqlstate.startswith(UNAVAILABLE_SQLSTATES))
    ):
        log.warning("database unavailable: %s", _summary(exc))
        return problem_response(503, "the database is unavailable; retry shortly", retry)
    if sqlstate is not None and sqlstate.startswith(MISCONFIGURED_SQLSTATES):
        log.error("the database refuses the service's configuration: %s", _summary(exc))
        return problem_response(503, "the database is unavailable; retry shortly", retry)
    if sqlstate == STATEMENT_TIMEOUT_SQLSTATE:
        return problem_response(
            503, "the database did not answer in time; nothing was changed", retry
        )
    if sqlstate in CONFLICT_SQLSTATES:
        return problem_response(409, "the rows are busy in another transaction; retry", retry)
    if sqlstate is not None and sqlstate.startswith(DATA_EXCEPTION_CLASS):
        return problem_response(422, "a value does not fit the table's column")
    return handle_internal_error(request, exc)


def handle_internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The last resort: log the exception, answer without any detail of it."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an internal error occurred")


def _validation_problem(exc: ValidationException) -> Response[Any]:
    errors = exc.extra if isinstance(exc.extra, list) else []
    from_body = any(isinstance(e, dict) and e.get("source") == "body" for e in errors)
    if from_body:
        # Litestar keeps only the message; msgspec's own error (the cause) also says where:
        # "Expected `int` >= 1 - at `$.data[3].id`". The body is the handler's `data`, so "$".
        cause = str(exc.__cause__ or "") or "; ".join(str(e.get("message")) for e in errors)
        where = cause.replace("`$.data", "`$")
        entries = [{"message": where, "source": "body"}]
        return problem_response(422, f"the request body is invalid: {where}", errors=entries)
    names = [str(e["key"]) for e in errors if isinstance(e, dict) and e.get("key")]
    if names:
        detail = f"invalid query or path parameter: {', '.join(sorted(set(names)))}"
    else:
        detail = exc.detail or "the request is invalid"
    return problem_response(400, detail, errors=errors or None)


def _sqlstate(exc: BaseException) -> str | None:
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code is None and orig is not None:
            code = getattr(orig.__cause__, "sqlstate", None)
        return str(code) if code else None
    return None


def _summary(exc: BaseException) -> str:
    """The error class and SQLSTATE only: driver messages can quote connection parameters."""
    if isinstance(exc, DatabaseUnavailable):
        return str(exc)  # our own words, which name the driver's error class only
    return f"{type(exc).__name__} sqlstate={_sqlstate(exc)}"


def _default_detail(status: int) -> str:
    if status == 404:
        return "no such resource"
    if status == 405:
        return "method not allowed on this resource"
    if status == 413:
        return "the request body is too large"
    return HTTPStatus(status).description or HTTPStatus(status).phrase
