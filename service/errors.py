"""Every error leaves as application/problem+json (RFC 9457); never a stack trace."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from http import HTTPStatus
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from sqlalchemy.exc import DBAPIError
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
# Serialization failure, deadlock, lock not available: the request was sound and nothing was
# changed; it lost a race with another transaction and may succeed if retried, so 409 with
# Retry-After. Not a 503: the database is there and answering, and an outside transaction's
# contention should not look like an outage on the service's dashboards.
CONFLICT_SQLSTATES = ("40001", "40P01", "55P03")
# The write breaks a constraint because of what the table holds now (409, no Retry-After: the
# same request fails the same way). Our only unique key is the generated id, so a 23505 also
# means the id sequence is behind the rows: it is logged for the operator.
CONSTRAINT_CONFLICTS = {
    "23505": "the write conflicts with a row that already exists (a unique key)",
    "23P01": "the write conflicts with a row that already exists (an exclusion constraint)",
    "23503": "another table refers to this row (a foreign key)",
    "23001": "another table refers to this row (a foreign key)",
}
CHECK_VIOLATION_SQLSTATE = "23514"  # a CHECK rule of the table refuses a value sent: 422
# Data exceptions a client's value causes: too long for the column (22001), out of its range
# (22003, such as 1e300 in a `real`), not in the database's encoding (22P05). Any other data
# exception is a statement of ours gone wrong (a bad cast, a division by zero, or 22000: the
# driver could not encode a parameter of ours), and with every other integrity error (23502: an
# INSERT of ours leaves out a NOT NULL column) and any InterfaceError on an open connection
# (asyncpg refusing a call of ours) it is a 500 with its traceback.
VALUE_DOES_NOT_FIT_SQLSTATES = ("22001", "22003", "22P05")


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
    """Database failures become 503/409/422 with a reason; a statement of ours that the driver or
    the server rejects, like anything unexpected, is a 500."""
    retry = {"Retry-After": RETRY_AFTER_SECONDS}
    failures: FailureLog = request.app.state.database_failures
    if isinstance(exc, PoolTimeoutError):
        return problem_response(
            503, "the database is busy: no connection became free in time", retry
        )
    if isinstance(exc, DatabaseTimeout):
        # The client-side statement timeout: no answer came in time (a silent network, an
        # overloaded server). A write may or may not have been applied; PATCH is safe to resend.
        failures.log(logging.WARNING, "the database did not answer within the statement timeout")
        return problem_response(503, "the database did not answer in time; retry shortly", retry)
    sqlstate = _sqlstate(exc)
    if (
        isinstance(exc, DatabaseUnavailable)
        # The driver found the connection closed (lost, reset, ended by the server); asyncpg's
        # "connection is closed" InterfaceError is one of these, any other is a bug of ours.
        or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        or (sqlstate is not None and sqlstate.startswith(UNAVAILABLE_SQLSTATES))
    ):
        failures.log(logging.WARNING, "database unavailable", exc)
        return problem_response(503, "the database is unavailable; retry shortly", retry)
    if sqlstate is not None and sqlstate.startswith(MISCONFIGURED_SQLSTATES):
        failures.log(logging.ERROR, "the database refuses the service's configuration", exc)
        return problem_response(503, "the database is unavailable; retry shortly", retry)
    if sqlstate == STATEMENT_TIMEOUT_SQLSTATE:
        return problem_response(
            503, "the database did not answer in time; nothing was changed", retry
        )
    if sqlstate in CONFLICT_SQLSTATES:
        return problem_response(409, "the rows are busy in another transaction; retry", retry)
    if sqlstate in CONSTRAINT_CONFLICTS:
        constraint = getattr(_driver_cause(exc), "constraint_name", None) or "unnamed"
        failures.log(logging.WARNING, f"a write broke the constraint {constraint}", exc)
        return problem_response(409, f"{CONSTRAINT_CONFLICTS[sqlstate]}; nothing was changed")
    if sqlstate == CHECK_VIOLATION_SQLSTATE:
        return problem_response(
            422, "a value breaks a rule of the table (a check constraint); nothing was changed"
        )
    if sqlstate in VALUE_DOES_NOT_FIT_SQLSTATES:
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


# SQLSTATEs a refused connection or a missing object answers with, in words.
REFUSAL_SQLSTATES = {
    "28P01": "password authentication failed",
    "28000": "the server refused this user or host (pg_hba.conf)",
    "3D000": "the database does not exist",
    "42P01": "the table does not exist (run `python -m service migrate`)",
    "42501": "the database role lacks a privilege (k8s/roles.sql grants what the service needs)",
    "23505": "a row with that key exists (for the id's key: the id sequence is behind the rows)",
    "53300": "the server has no free connection slots",
    "57P01": "the server ended the session (shutdown, restart or failover)",
    "57P03": "the server is starting up or shutting down",
}


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
TLS_HOST_MISMATCH_CODES = (62, 64)


def refused_for_good(exc: BaseException) -> bool:
    """The database refuses this configuration (password, user, database, table, TLS), as
    opposed to not being there right now: waiting will not help, an operator must act."""
    cause = _driver_cause(exc)
    sqlstate = str(getattr(cause, "sqlstate", None) or "")
    return (
        sqlstate.startswith("28")
        or sqlstate in ("3D000", "42P01")
        or isinstance(cause, ssl.SSLError)
        or (isinstance(cause, ConnectionError) and "rejected SSL upgrade" in str(cause))
        or _refused_startup_parameter(cause) is not None
    )


def _refused_startup_parameter(cause: BaseException) -> str | None:
    """The startup parameter a connection pooler refused (PgBouncer: 08P01 "unsupported startup
    parameter: NAME"); the service sends them only when DB_POOLER says nothing is in between."""
    message = str(cause)
    refused = getattr(cause, "sqlstate", None) == "08P01" and "unsupported startup" in message
    if not refused:
        return None
    return message.rpartition(":")[2].strip()


def _driver_cause(exc: BaseException) -> BaseException:
    """The driver's own error inside SQLAlchemy's or service.db's wrapper."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return exc.orig.__cause__ or exc.orig
    if isinstance(exc, DatabaseUnavailable) and exc.__cause__ is not None:
        return exc.__cause__  # the driver's own OSError, named by service.db
    return exc


def refusal_reason(exc: BaseException) -> str:
    """Why the database could not be used, in one line, without the driver's full message.

    Driver messages can quote connection parameters; this names the cause only.
    """
    cause = _driver_cause(exc)
    sqlstate = getattr(cause, "sqlstate", None)
    # pg_hba.conf had only `hostssl` lines for us; the server's words are English unless its
    # lc_messages says otherwise, and then the general 28000 reason below still holds.
    if sqlstate == "28000" and "no encryption" in str(cause):
        return "the server accepts only TLS connections (set sslmode=require or stricter)"
    if sqlstate in REFUSAL_SQLSTATES:
        return REFUSAL_SQLSTATES[sqlstate]
    if (parameter := _refused_startup_parameter(cause)) is not None:
        return (
            f"a connection pooler refused the startup parameter {parameter} (behind a pooler set "
            "DB_POOLER=transaction, or transaction-unprepared for PgBouncer < 1.21)"
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = cause.verify_message.rstrip(".")
        if cause.verify_code in TLS_HOST_MISMATCH_CODES:
            return f"the TLS certificate is not valid for this host name ({detail})"
        return f"TLS certificate not accepted ({detail})"
    if isinstance(cause, asyncpg.ConnectionDoesNotExistError):
        return "the connection was lost mid-statement (the server ended the session or restarted)"
    if isinstance(cause, ssl.SSLError):
        return "TLS handshake failed"
    if isinstance(cause, ConnectionError) and "rejected SSL upgrade" in str(cause):
        return "the server does not offer TLS, which sslmode asks for"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (is the server running, and is the port right?)"
    if isinstance(cause, socket.gaierror):
        return "unknown host name"
    if isinstance(cause, TimeoutError):
        return "no answer in time (unreachable host, or a firewall dropping packets)"
    if isinstance(cause, OSError):
        return f"network error ({cause.strerror or type(cause).__name__})"
    if sqlstate:
        return f"the server refused the request (SQLSTATE {sqlstate})"
    return type(cause).__name__


class FailureLog:
    """One log line per distinct database failure, not one per request.

    During an outage every request fails the same way; the log says so when the failure is
    first seen, then at most once every `every_seconds` while it lasts, with how many requests
    it failed in between.
    """

    MAX_DISTINCT = 64  # failure lines remembered; beyond that the memory starts afresh

    def __init__(self, where: str, every_seconds: float = 60.0) -> None:
        self.where = where  # host, port and database, as the commands' refusals name them
        self.every_seconds = every_seconds
        self._seen: dict[tuple[int, str], tuple[float, int]] = {}

    def log(self, level: int, what: str, exc: BaseException | None = None) -> None:
        line = f"{what} ({self.where})" + (f": {refusal_reason(exc)}" if exc else "")
        key = (level, line)
        now = time.monotonic()
        logged_at, repeats = self._seen.get(key, (None, 0))
        if logged_at is not None and now - logged_at < self.every_seconds:
            self._seen[key] = (logged_at, repeats + 1)
            return
        if len(self._seen) >= self.MAX_DISTINCT:
            self._seen.clear()
        self._seen[key] = (now, 0)
        since = f" [{repeats} more requests failed so since the last such line]" if repeats else ""
        log.log(level, "%s%s", line, since)


def _sqlstate(exc: BaseException) -> str | None:
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if code is None and orig is not None:
            code = getattr(orig.__cause__, "sqlstate", None)
        return str(code) if code else None
    return None


def _default_detail(status: int) -> str:
    if status == 404:
        return "no such resource"
    if status == 405:
        return "method not allowed on this resource"
    if status == 413:
        return "the request body is too large"
    return HTTPStatus(status).description or HTTPStatus(status).phrase
