"""The OpenAPI document (its errors, with their real bodies as examples) and the docs page:
Swagger UI served by the service itself, under a Content-Security-Policy that lets the page load
nothing from anywhere else."""

from __future__ import annotations

import dataclasses
import html
from http import HTTPStatus
from pathlib import Path
from typing import Any

from litestar import Request, Router
from litestar.datastructures import ResponseHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, Example, Operation, SecurityScheme
from litestar.static_files import create_static_files_router

from service import __version__
from service.auth import BEARER_SCHEME
from service.errors import PROBLEM_MEDIA_TYPE, problem_document
from service.schemas import INT4_MAX, Problem

DOCS_PATH = "/schema"
# Swagger UI (vendored from npm's swagger-ui-dist by `make swagger-ui`) and the page's script.
STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PATH = "/swagger/assets"

# Everything the page needs comes from the service: Swagger UI's script and stylesheet, the
# page's own script (no inline script or style anywhere), the OpenAPI document and the
# "Try it out" requests (connect), the stylesheet's data: icons. A page that asks a CDN or an
# outside validator for anything is refused by the browser, so the test sees it at once.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)


def problem(description: str, status: int, detail: str, **members: Any) -> ResponseSpec:
    """A documented problem+json answer; its example is the body the service sends for it."""
    example = problem_document(status, detail, **members)
    return ResponseSpec(
        Problem,
        description=description,
        media_type=PROBLEM_MEDIA_TYPE,
        generate_examples=False,
        examples=[Example(value=example)],
    )


def answers(shape: type[Any], status: int = 200) -> dict[int, ResponseSpec]:
    """The OpenAPI success response of a handler that returns a `JSONAnswer` of `shape`."""
    return {
        status: ResponseSpec(
            shape, description=HTTPStatus(status).description, generate_examples=False
        )
    }


@dataclasses.dataclass
class NoValidationError(Operation):
    """An operation without Litestar's default 400 (application/json, status_code and extra),
    which it documents for every route with a parameter: an item id that is no integer, or out
    of range, names no row, so it is a 404, and nothing else on these routes is validated."""

    def __post_init__(self) -> None:
        if self.responses is not None:
            self.responses.pop("400", None)


# Each error the item endpoints answer, with what causes it and the body it comes with (checked
# against real answers by tests/test_openapi.py); each route adds its own 404 and 422.
UNAVAILABLE = problem(
    "The database is unavailable, busy or slow to answer, or the service is at capacity:"
    " retry after `Retry-After` seconds. A write that timed out may have been applied.",
    503,
    "the database is unavailable; retry shortly",
)
UNAUTHORIZED = problem(
    "No bearer token, or not one of API_TOKENS.", 401, "a bearer token is required for writes"
)
BAD_QUERY = problem(
    "A query parameter is not a number, out of its range, empty, or given more than once.",
    400,
    "invalid query or path parameter: limit",
    errors=[{"message": "Expected `int` >= 1", "key": "limit", "source": "query"}],
)
BAD_WRITE = problem(
    "The body is not JSON, or the Idempotency-Key header is malformed or given twice.",
    400,
    "the request body is not valid JSON",
)
NO_SUCH_ITEM = problem(
    f"No row has this id; an id outside 1..{INT4_MAX} names none either.",
    404,
    "no item with id 7",
)
TOO_LARGE = problem("The body is larger than MAX_BODY_BYTES.", 413, "the request body is too large")
NOT_JSON = problem(
    "The body is not declared as JSON (Content-Type: application/json or */*+json).",
    415,
    "the request body must be JSON (Content-Type: application/json)",
)
WRITE_CONFLICT = problem(
    "The Idempotency-Key is in use by a request still in progress, or the rows are locked by"
    " another transaction (both with `Retry-After`); or the write conflicts with an existing row"
    " (a unique key). Nothing was changed.",
    409,
    "a request with this Idempotency-Key is still in progress; retry shortly",
)
READ_ERRORS = {400: BAD_QUERY, 503: UNAVAILABLE}
# A malformed JSON body is a problem document too, so each write lists its own 400 rather than
# Litestar's default (application/json).
WRITE_ERRORS = {
    400: BAD_WRITE,
    401: UNAUTHORIZED,
    409: WRITE_CONFLICT,
    413: TOO_LARGE,
    415: NOT_JSON,
    503: UNAVAILABLE,
}

PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <title>{title}</title>
    <link rel="icon" type="image/png" href="{assets}/swagger-ui/favicon-32x32.png">
    <link rel="stylesheet" href="{assets}/swagger-ui/swagger-ui.css">
  </head>
  <body>
    <div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
    <script src="{assets}/swagger-ui/swagger-ui-bundle.js"></script>
    <script src="{assets}/docs.js"></script>
  </body>
</html>
"""


class SwaggerPage(OpenAPIRenderPlugin):
    """Swagger UI at /schema/swagger (and /schema), its files served from /schema/swagger/assets.

    Litestar's own SwaggerRenderPlugin takes local URLs for the files, but it still starts
    Swagger UI from an inline script (with the whole document in it) and loads its favicon
    from a CDN, which a strict Content-Security-Policy refuses.
    """

    def __init__(self) -> None:
        super().__init__(path="/swagger", favicon="", style="")
        self.assets_url = DOCS_PATH + ASSETS_PATH

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The page: the containers and files Swagger UI needs, and where the document is."""
        return PAGE.format(
            title=html.escape(openapi_schema["info"]["title"]),
            assets=self.assets_url,
            openapi_url=html.escape(self.get_openapi_json_route(request)),
        ).encode()

    def receive_router(self, router: Router) -> None:
        """Serve the page's files beside it, from the package itself."""
        self.assets_url = router.path.rstrip("/") + ASSETS_PATH
        router.register(
            create_static_files_router(
                path=ASSETS_PATH, directories=[STATIC_DIR], name="docs-assets"
            )
        )


def openapi_config() -> OpenAPIConfig:
    """The OpenAPI document at /schema/openapi.json (and .yaml) and the docs page beside it."""
    return OpenAPIConfig(
        title="playing_with_neon items",
        version=__version__,
        path=DOCS_PATH,
        render_plugins=[SwaggerPage(), YamlRenderPlugin(path=["/openapi.yaml", "/openapi.yml"])],
        # Litestar's own router for /schema, with the policy on everything it serves.
        openapi_router=Router(
            DOCS_PATH,
            route_handlers=[],
            include_in_schema=False,
            dto=None,
            return_dto=None,
            response_headers=[
                ResponseHeader(name="Content-Security-Policy", value=CONTENT_SECURITY_POLICY)
            ],
        ),
        components=Components(
            security_schemes={
                BEARER_SCHEME: SecurityScheme(
                    type="http", scheme="bearer", description="One of API_TOKENS."
                )
            }
        ),
    )
