"""The docs page: Swagger UI from the service's own files, under a Content-Security-Policy that
allows nothing else, and, in a real browser with no network beyond loopback, every operation of
the OpenAPI document rendered and "Try it out" answered."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from service.docs import CONTENT_SECURITY_POLICY, STATIC_DIR
from service.seed import NOTEBOOK_ROWS
from tests.browser import CHROMIUM, DevTools, headless_chromium
from tests.conftest import TOKEN, ServiceProcess, run_service, service_environment, table_snapshot

Client = AsyncTestClient[Any]
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian's `chromium` package)"
)

# Set before the page's own scripts run (DevTools' scripts are not subject to the page's
# policy): every request the policy refused, by directive and address.
RECORD_VIOLATIONS = """
window.policyViolations = [];
document.addEventListener("securitypolicyviolation",
    (event) => window.policyViolations.push(`${event.violatedDirective} ${event.blockedURI}`));
"""
# Each operation Swagger UI rendered, as [method, path template].
RENDERED_OPERATIONS = """[...document.querySelectorAll("#swagger-ui .opblock")].map((block) => [
    block.querySelector(".opblock-summary-method").textContent.toLowerCase(),
    block.querySelector(".opblock-summary-path").dataset.path,
])"""


async def test_the_page_is_served_with_its_policy_and_names_only_its_own_files(
    client: Client,
) -> None:
    for path in ("/schema/swagger", "/schema"):
        page = await client.get(path)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "<script>" not in page.text and "<style" not in page.text  # nothing inline
        addresses = re.findall(r'(?:src|href|data-openapi-url)="([^"]+)"', page.text)
        assert len(addresses) == 5, page.text
        for address in addresses:
            assert address.startswith("/schema/"), address
            answer = await client.get(address)
            assert answer.status_code == 200, address
    policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"


async def test_swagger_ui_ships_with_its_licence(client: Client) -> None:
    vendored = STATIC_DIR / "swagger-ui"
    assert "Apache License" in (vendored / "LICENSE").read_text()
    bundle = await client.get("/schema/swagger/assets/swagger-ui/swagger-ui-bundle.js")
    assert bundle.content == (vendored / "swagger-ui-bundle.js").read_bytes()
    assert bundle.headers["content-type"].startswith("text/javascript")
    # The bundle names the file that carries the licences of the code bundled in it.
    assert b"swagger-ui-bundle.js.LICENSE.txt" in bundle.content[:200]
    assert (vendored / "swagger-ui-bundle.js.LICENSE.txt").is_file()


@pytest.fixture
def docs_service(
    database_url: URL, notebook_rows: None, tmp_path: Path
) -> Iterator[ServiceProcess]:
    """The service as shipped, on loopback, with the notebook's rows."""
    env = service_environment(database_url, SHUTDOWN_DELAY_SECONDS="0")
    with run_service(env, tmp_path) as service:
        yield service


@pytest.fixture
def docs_page(docs_service: ServiceProcess, tmp_path: Path) -> Iterator[DevTools]:
    """Headless Chromium, offline but for loopback, on the docs page once it has rendered."""
    with headless_chromium(tmp_path / "chromium-profile") as browser:
        browser.open_page()
        for domain in ("Page", "Network", "Runtime", "Log"):
            browser.call(f"{domain}.enable")
        browser.call("Page.addScriptToEvaluateOnNewDocument", source=RECORD_VIOLATIONS)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        browser.call("Page.navigate", url=f"{docs_service.base_url}/schema/swagger")
        browser.wait_for(f"{RENDERED_OPERATIONS}.length > 0", timeout=20)
        yield browser


@pytest.mark.slow
@needs_chromium
def test_a_browser_offline_renders_every_operation_from_the_service_alone(
    docs_service: ServiceProcess, docs_page: DevTools, tmp_path: Path
) -> None:
    screenshot = tmp_path / "docs-page.png"
    docs_page.screenshot(screenshot)
    document = docs_page.evaluate("fetch('/schema/openapi.json').then((answer) => answer.json())")
    documented = sorted(
        [method, path] for path, operations in document["paths"].items() for method in operations
    )
    rendered = sorted(docs_page.evaluate(RENDERED_OPERATIONS))
    assert rendered == documented, f"screenshot: {screenshot}"
    assert len(rendered) == 7
    assert docs_page.evaluate("window.policyViolations") == []
    requested = [event["request"]["url"] for event in docs_page.named("Network.requestWillBeSent")]
    assert f"{docs_service.base_url}/schema/swagger/assets/swagger-ui/swagger-ui-bundle.js" in (
        requested
    )
    outside = [url for url in requested if not url.startswith((docs_service.base_url, "data:"))]
    assert outside == []
    failed = docs_page.named("Network.loadingFailed")
    assert failed == []
    assert docs_page.named("Runtime.exceptionThrown") == []
    errors = [
        e["entry"] for e in docs_page.named("Log.entryAdded") if e["entry"]["level"] == "error"
    ]
    assert errors == []
    assert screenshot.stat().st_size > 10_000


def operation(method: str, path: str) -> str:
    """The JavaScript expression for an operation's block on the page."""
    return f"""document.querySelector('#swagger-ui .opblock-{method}:has([data-path="{path}"])')"""


def try_it_out(page: DevTools, method: str, path: str, parameter: str | None = None) -> str:
    """Open an operation, type its one parameter if given, execute it; the status shown."""
    block = operation(method, path)
    page.click(f"{block}.querySelector('.opblock-summary-control')")
    page.click(f"{block}.querySelector('.try-out__btn')")
    if parameter is not None:
        page.type_into(f"{block}.querySelector('.parameters input')", parameter)
        # Swagger UI takes a typed value after a debounce: Execute waits until its state has it.
        values = f"window.ui.specSelectors.parameterValues(['{path}', '{method}']).toJS()"
        assert page.wait_for(f"Object.values({values}).includes('{parameter}')", timeout=5)
    page.click(f"{block}.querySelector('.execute')")
    answer = f"{block}.querySelector('.live-responses-table tr.response .response-col_status')"
    status = page.wait_for(f"{answer}?.textContent", timeout=10)
    return str(status).strip()


@pytest.mark.slow
@needs_chromium
def test_try_it_out_reads_the_rows_from_the_page(docs_page: DevTools, tmp_path: Path) -> None:
    status = try_it_out(docs_page, "get", "/items")
    docs_page.screenshot(tmp_path / "docs-page-try-it-out.png")
    assert status == "200", f"screenshot in {tmp_path}"
    body = docs_page.evaluate(
        f"{operation('get', '/items')}.querySelector('.live-responses-table tr.response pre')"
        ".textContent"
    )
    assert [item["name"] for item in json.loads(body)["items"]] == [
        row["name"] for row in NOTEBOOK_ROWS
    ]
    assert docs_page.evaluate("window.policyViolations") == []


@pytest.mark.slow
@needs_chromium
async def test_an_authorized_delete_from_the_page_deletes_the_row(
    docs_page: DevTools, engine: AsyncEngine, tmp_path: Path
) -> None:
    docs_page.click("document.querySelector('#swagger-ui .btn.authorize')")
    docs_page.type_into("document.querySelector('.modal-ux input')", TOKEN)
    docs_page.click("document.querySelector('.modal-ux .auth-btn-wrapper .authorize')")
    assert docs_page.wait_for("document.querySelector('.modal-ux').innerText.includes('Logout')", 5)
    docs_page.click("document.querySelector('.modal-ux .btn-done')")
    status = try_it_out(docs_page, "delete", "/items/{item_id}", "5")
    docs_page.screenshot(tmp_path / "docs-page-delete.png")
    assert status == "204", f"screenshot in {tmp_path}"
    assert 5 not in [row[0] for row in await table_snapshot(engine)]
    assert docs_page.evaluate("window.policyViolations") == []
