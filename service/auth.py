"""Checks for the write endpoints, run before the body is read: a bearer token, a JSON body.

They are `before_request` hooks rather than Litestar guards: Litestar hands every guard a copy
of the route handler object, which cost more than the checks themselves.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection

from service.errors import ProblemException

# The OpenAPI security scheme the write operations declare.
BEARER_SCHEME = "BearerToken"
WRITE_SECURITY: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}]


def token_digests(tokens: tuple[str, ...]) -> tuple[bytes, ...]:
    """Digests of the accepted tokens; comparing digests takes the same time for any length."""
    return tuple(hashlib.sha256(token.encode()).digest() for token in tokens)


async def authorize_write(request: Request[Any, Any, Any]) -> None:
    """`before_request` hook of DELETE: a valid bearer token."""
    require_token(request)


async def authorize_json_write(request: Request[Any, Any, Any]) -> None:
    """`before_request` hook of POST and PATCH: a valid bearer token, then a JSON body."""
    require_token(request)
    require_json(request)


def require_token(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Let the request through only with `Authorization: Bearer <one of API_TOKENS>`."""
    if connection.app.state.settings.auth_disabled:
        return
    scheme, _sep, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("a bearer token is required for writes")
    offered = hashlib.sha256(token.strip().encode()).digest()
    matched = False
    # Every accepted token is compared, so the time taken does not tell which one came close.
    for accepted in connection.app.state.token_digests:
        matched |= hmac.compare_digest(offered, accepted)
    if not matched:
        raise _unauthorized("the bearer token is not valid")


def token_digest(connection: ASGIConnection[Any, Any, Any, Any]) -> bytes:
    """Whose idempotency keys a request uses: its bearer token's SHA-256 digest, so the token
    itself is never stored; with AUTH_DISABLED everyone's (an empty value)."""
    if connection.app.state.settings.auth_disabled:
        return b""
    _scheme, _sep, token = connection.headers.get("authorization", "").partition(" ")
    return hashlib.sha256(token.strip().encode()).digest()


def require_json(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    """Refuse a body that does not say it is JSON before it is read."""
    media_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ProblemException(
            415, "the request body must be JSON (Content-Type: application/json)"
        )


def _unauthorized(detail: str) -> ProblemException:
    exc = ProblemException(401, detail)
    exc.headers = {"WWW-Authenticate": 'Bearer realm="items"'}
    return exc
