"""Headless Chromium for the page tests: Debian's /usr/bin/chromium driven by Playwright,
and a `Watch` that records what a page logged, requested and failed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def launch_chromium() -> Iterator[Browser]:
    """Chromium from Debian's package; skipped (saying why) where it is not installed."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: apt-get install -y chromium"
        print(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@dataclass
class Watch:
    """What a page did: console errors, failed requests, error answers, requests sent."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    error_answers: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        self.page.on("requestfailed", self._failed)
        self.page.on("response", self._response)
        self.page.on("request", lambda request: self.requests.append(request))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.console_errors.append(f"{message.type}: {message.text}")

    def _failed(self, request: Request) -> None:
        self.failed.append(f"{request.method} {request.url}: {request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.error_answers.append(
                f"{response.request.method} {response.url}: {response.status}"
            )

    def number(self, selector: str) -> int:
        """An integer the page shows (thousands separators allowed), -1 while it shows none."""
        text = self.page.locator(selector).inner_text().replace(",", "")
        return int(text) if text.isdigit() else -1

    def wait_number(self, selector: str, minimum: int, timeout_s: float = 10.0) -> int:
        """Wait until the number in `selector` reaches `minimum` (the stream updates it)."""
        deadline = time.monotonic() + timeout_s
        while (value := self.number(selector)) < minimum:
            if time.monotonic() > deadline:
                raise AssertionError(f"{selector} shows {value}, not yet {minimum}")
            self.page.wait_for_timeout(100)
        return value
