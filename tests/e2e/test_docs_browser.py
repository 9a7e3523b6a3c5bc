"""/docs and /redoc in a real headless Chromium, with no internet: they render from the
app's own assets, and Swagger's Authorize button takes a key in either header form."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, expect

from tests.support.browser import Watch
from tests.support.procs import Process
from tests.support.procs import gateway_process as start_gateway

pytestmark = pytest.mark.e2e

KEY = "docs-e2e-secret-key-0123"


@pytest.fixture
def gateway(tmp_path: Path, simulator: Process) -> Iterator[Process]:
    process = start_gateway(tmp_path, simulator, API_KEYS=f"reader:{KEY}:read")
    process.start()
    yield process
    process.stop()


def test_swagger_renders_offline_and_authorizes_with_either_header(
    browser: Browser, gateway: Process
) -> None:
    page = browser.new_page()
    watch = Watch(page)
    page.goto(f"{gateway.url}/docs")
    expect(page.locator(".swagger-ui .title")).to_contain_text("Freelancer user-info gateway")
    page.get_by_role("button", name="Authorize").first.click()
    dialog = page.locator(".dialog-ux")
    expect(dialog).to_contain_text("X-API-Key")
    expect(dialog).to_contain_text("Bearer")
    dialog.locator("input").first.fill(KEY)
    dialog.locator("button", has_text="Authorize").first.click()
    dialog.locator("button", has_text="Close").first.click()
    # Try GET /api/stats from the page: the key goes in the header, the answer is 200.
    operation = page.locator("#operations-monitoring-stats_api_stats_get")
    operation.click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    expect(operation.locator(".live-responses-table tbody .response-col_status")).to_have_text(
        "200"
    )
    sent = [r for r in watch.requests if r.url.endswith("/api/stats")]
    assert sent and sent[-1].headers.get("x-api-key") == KEY
    hosts = {urlsplit(request.url).netloc for request in watch.requests}
    assert hosts == {urlsplit(gateway.url).netloc}, "nothing is loaded from elsewhere"
    assert watch.console_errors == [] and watch.failed == []


def test_redoc_renders_offline(browser: Browser, gateway: Process) -> None:
    page = browser.new_page()
    watch = Watch(page)
    response = page.goto(f"{gateway.url}/redoc")
    assert response is not None
    assert "img-src 'self' data:" in response.headers["content-security-policy"]
    expect(page.locator("h1").first).to_contain_text("Freelancer user-info gateway")
    expect(page.locator("h2", has_text="Look up a batch of users")).to_be_visible()
    # ReDoc's footer asks cdn.redoc.ly for a logo; the page's Content-Security-Policy blocks
    # it, so nothing was loaded from elsewhere (blob: and data: URLs are the page's own).
    loaded = {
        urlsplit(r.url).netloc
        for r in watch.requests
        if r.url.startswith("http") and r.response() is not None
    }
    assert loaded == {urlsplit(gateway.url).netloc}
    assert [f for f in watch.failed if "cdn.redoc.ly" not in f] == []
