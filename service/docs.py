"""The OpenAPI document and the docs page: Swagger UI served by the service itself, under a
Content-Security-Policy that lets the page load nothing from anywhere else."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from litestar import Request, Router
from litestar.datastructures import ResponseHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from service import __version__
from service.auth import BEARER_SCHEME

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
