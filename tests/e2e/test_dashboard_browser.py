"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright), against the gateway running as a process on loopback.

UPDATE_SCREENSHOT=1 also saves docs/dashboard.png, after some traffic for the charts.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    Page,
    expect,
)

from tests.support.browser import Watch
from tests.support.procs import Process, assert_clean_exit
from tests.support.procs import gateway_process as start_gateway

pytestmark = pytest.mark.e2e

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
KEY = "dashboard-e2e-secret-key"


def look_up(watch: Watch, ids: str) -> list[tuple[str, str]]:
    """Submit the lookup form; (id, source) of each row shown."""
    page = watch.page
    page.fill("#lookup-ids", ids)
    page.click("#lookup-form button")
    expect(page.locator("#lookup-message")).to_contain_text("found", timeout=10_000)
    rows = page.locator("#lookup-results tr")
    return [
        (rows.nth(i).locator("td").nth(0).inner_text(), rows.nth(i).locator(".source").inner_text())
        for i in range(rows.count())
    ]


def drive_traffic(url: str, seconds: float, clients: int = 3) -> None:
    """Concurrent lookups for a while, so the charts have lines: each 200 ms slot asks
    every client for the same ids (some new, so fetched once and shared), most repeats."""
    deadline = time.monotonic() + seconds

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while (now := time.monotonic()) < deadline:
                slot = int(now * 5)
                ids = [1000 + (slot * 3 + i) % (300 + slot // 10) for i in range(20)]
                client.post("/api/users", json={"user_ids": ids})
                time.sleep(0.05 + 0.05 * (slot // 50 % 3))

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)


def assert_clean(watch: Watch) -> None:
    assert watch.console_errors == [], watch.console_errors
    assert watch.failed == [], watch.failed
    assert watch.error_answers == [], watch.error_answers


@pytest.fixture
def budgeted_gateway(tmp_path: Path, simulator: Process) -> Iterator[Process]:
    """The gateway with a budget the page can show usage against (e2e's is wide open)."""
    budget = {
        "UPSTREAM_RATE_PER_MIN": "600",
        "UPSTREAM_RATE_PER_HOUR": "36000",
        "UPSTREAM_BURST": "60",
    }
    process = start_gateway(tmp_path, simulator, LOG_LEVEL="INFO", **budget)
    process.start()
    yield process
    if process.popen is not None:
        process.stop()


def open_dashboard(browser: Browser, process: Process) -> tuple[Page, Watch]:
    """The dashboard in a new page, once its stream is live, and a watch on the page."""
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    watch = Watch(page)
    page.goto(f"{process.url}/dashboard")
    expect(page.locator("#status")).to_have_text("live", timeout=10_000)
    return page, watch


@pytest.mark.timeout(150)  # UPDATE_SCREENSHOT=1 drives traffic for a minute first
def test_dashboard_shows_live_numbers_and_looks_users_up(
    browser: Browser, budgeted_gateway: Process
) -> None:
    gateway_process = budgeted_gateway
    page, watch = open_dashboard(browser, gateway_process)
    watch.wait_number("#requests-total", 0)
    before = watch.number("#requests-total")
    assert page.locator("#upstream-state").inner_text() == "ok"
    assert page.locator("#store-kind").inner_text() == "sqlite"

    first = look_up(watch, "11, 12 13")
    assert first == [("11", "fetched"), ("12", "fetched"), ("13", "fetched")]
    usernames = page.locator("#lookup-results tr td:nth-child(2)").all_inner_texts()
    assert all(name.strip() for name in usernames), usernames
    assert look_up(watch, "11 12 13") == [("11", "cache"), ("12", "cache"), ("13", "cache")]

    # Only the stream writes these numbers: they moved, so the stream is live.
    watch.wait_number("#requests-total", before + 2)
    watch.wait_number("#ids-total", 6)
    expect(page.locator("#hit-ratio-total")).to_have_text("50.0%", timeout=10_000)
    expect(page.locator("#latency")).to_have_text(re.compile(r"[\d.]+ / [\d.]+"))
    expect(page.locator("#budget .window").first).to_contain_text("calls")
    canvases = page.locator("canvas").evaluate_all(
        "cs => cs.map(c => c.width > 0 && c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data.some(v => v !== 0))"
    )
    assert canvases and all(canvases), canvases  # every chart drew something

    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        traffic = threading.Thread(target=drive_traffic, args=(gateway_process.url, 65))
        traffic.start()
        page.wait_for_timeout(60_000)
        look_up(watch, "11, 12, 5000, 5001")
        page.wait_for_timeout(1500)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        traffic.join(60)

    assert_clean(watch)
    page.close()
    assert_clean_exit(gateway_process)


def test_the_jobs_panel_shows_active_jobs_and_their_counts(
    browser: Browser, budgeted_gateway: Process
) -> None:
    """A range job the budget keeps running for minutes: its row, then cancelled, none."""
    gateway_process = budgeted_gateway
    page, watch = open_dashboard(browser, gateway_process)
    rows = page.locator("#jobs-active tr")
    expect(rows).to_have_text(["No active jobs"], timeout=10_000)
    label = "<b>nightly</b>"  # shown as text, never parsed as markup
    with httpx.Client(base_url=gateway_process.url, timeout=10) as client:
        submitted = client.post("/api/jobs", json={"id_range": [1, 50_000], "label": label})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        row = page.locator(f'#jobs-active tr[data-job-id="{job_id}"]')
        expect(row).to_be_visible(timeout=10_000)
        expect(row.locator("td").first).to_contain_text(label)
        assert row.locator("b").count() == 0
        expect(row.locator("td").nth(3)).to_contain_text("/ 50,000")
        expect(row.locator(".meter-fill")).to_have_count(1)
        # The runner counts statuses every 5 s.
        expect(page.locator("#jobs-status")).to_contain_text(
            re.compile(r"1 (running|pending)"), timeout=15_000
        )
        cancelled = client.post(f"/api/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
    expect(rows).to_have_text(["No active jobs"], timeout=10_000)
    expect(page.locator("#jobs-status")).to_contain_text("1 cancelled", timeout=15_000)
    assert_clean(watch)
    page.close()
    assert_clean_exit(gateway_process)


def test_the_page_shows_refresh_ahead_and_stale_answers_popular_and_others_apart(
    browser: Browser, tmp_path: Path, simulator: Process
) -> None:
    """A 10 s TTL: an id asked for every 0.3 s is popular and refreshed ahead of turning
    stale (the ids and calls move, the popular users' stale answers stay 0); an id asked
    for once is answered stale past the TTL (the others' count moves)."""
    gateway_process = start_gateway(tmp_path, simulator, CACHE_TTL_S="10")
    gateway_process.start()
    try:
        page, watch = open_dashboard(browser, gateway_process)
        expect(page.locator("#refresh-ahead-ids")).to_have_text("0", timeout=10_000)
        expect(page.locator("#refresh-ahead-calls")).to_have_text("0")
        expect(page.locator("#stale-answers")).to_have_text("0")
        expect(page.locator("#stale-popular")).to_have_text("0")
        expect(page.locator("#stale-other")).to_have_text("0")
        stale: dict[int, int] = {41: 0, 51: 0}
        with httpx.Client(base_url=gateway_process.url, timeout=10) as client:
            started = time.monotonic()
            client.post("/api/users", json={"user_ids": [51]})  # asked once, then after the TTL
            # Popular is asked REFRESH_AHEAD_MIN_HITS (3) times a TTL, kept up (counts are
            # halved every TTL); 41 is due at 8 s (REFRESH_AHEAD_AT 0.8).
            while time.monotonic() - started < 30:
                ids = [41, 51] if time.monotonic() - started > 10.5 else [41]
                for user in client.post("/api/users", json={"user_ids": ids}).json()["users"]:
                    stale[user["user_id"]] += user["stale"]
                if stale[51] and watch.number("#refresh-ahead-ids") >= 1:
                    break
                page.wait_for_timeout(300)
        assert stale == {41: 0, 51: 1}, stale
        watch.wait_number("#refresh-ahead-ids", 1)
        watch.wait_number("#refresh-ahead-calls", 1)
        expect(page.locator("#refresh-ahead-coverage")).to_have_text("100.0% of 1 popular fresh")
        watch.wait_number("#stale-other", 1)
        watch.wait_number("#stale-answers", 1)
        assert page.locator("#stale-popular").inner_text() == "0"
        if shot := os.environ.get("REFRESH_AHEAD_SCREENSHOT"):  # to look at the cards
            page.screenshot(path=shot, full_page=True)
        assert_clean(watch)
        page.close()
    finally:
        if gateway_process.popen is not None:
            gateway_process.stop()


def test_the_key_is_sent_as_a_header_and_kept_out_of_urls_and_storage(
    browser: Browser, tmp_path: Path, simulator: Process
) -> None:
    gateway = start_gateway(tmp_path, simulator, API_KEYS=f"ops:{KEY}:read")
    try:
        gateway.start()
        page = browser.new_page()
        watch = Watch(page)
        page.goto(f"{gateway.url}/dashboard")
        expect(page.locator("#status")).to_have_text("API key needed", timeout=10_000)
        # The refused stream is the only error so far (Chromium logs a 401 as one).
        assert watch.error_answers == [f"GET {gateway.url}/api/events: 401"]
        assert len(watch.console_errors) == 1 and "401" in watch.console_errors[0]
        watch.error_answers.clear()
        watch.console_errors.clear()

        page.fill("#api-key", KEY)
        page.click("#key-form button")
        expect(page.locator("#status")).to_have_text("live", timeout=10_000)
        assert look_up(watch, "21") == [("21", "fetched")]
        watch.wait_number("#requests-total", 1)

        sent = [r for r in watch.requests if "/api/" in r.url]
        keyed = [r for r in sent if r.headers.get("x-api-key") == KEY]
        assert {r.url.rsplit("/", 2)[-1] for r in keyed} >= {"events", "users"}
        assert all(KEY not in r.url for r in watch.requests)
        stored = page.evaluate(
            "() => [localStorage.length, sessionStorage.length, document.cookie]"
        )
        assert stored == [0, 0, ""]
        assert_clean(watch)
        page.close()
    finally:
        if gateway.popen is not None:
            gateway.stop()
    assert KEY not in gateway.output()


def test_sigterm_ends_open_streams_and_exits_cleanly(gateway_process: Process) -> None:
    """uvicorn waits for open responses before shutting the app down: streams must end."""
    gateway_process.start()
    frames: list[str] = []
    ended = threading.Event()

    def read() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", f"{gateway_process.url}/api/events") as response,
        ):
            for line in response.iter_lines():
                if line.startswith("event:"):
                    frames.append(line)
        ended.set()

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while frames.count("event: sample") < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert_clean_exit(gateway_process)
    assert time.monotonic() - started < 5  # well within SHUTDOWN_GRACE_S
    for reader in readers:
        reader.join(10)
        assert not reader.is_alive()
    assert ended.is_set()
    log = gateway_process.output()
    assert "timeout graceful shutdown exceeded" not in log, log
    assert not re.search(r"ERROR|Exception in ASGI", log), log


def test_the_page_shows_the_budget_from_its_log_and_what_each_job_waits_for(
    browser: Browser, tmp_path: Path, simulator: Process
) -> None:
    """A small budget the jobs soon wait for: two calls back to back, then their pace (one
    call every 200 s). The page shows the calls used from the budget's log, the lane that
    waits and why, and per job its wait: its pace, or other jobs' turn."""
    budget = {
        "UPSTREAM_RATE_PER_MIN": "5",
        "UPSTREAM_RESERVE_PER_MIN": "1",
        "UPSTREAM_RATE_PER_HOUR": "20",
        "UPSTREAM_RESERVE_PER_HOUR": "2",
        "UPSTREAM_BURST": "2",
        "BATCH_SIZE": "10",
        "SHUTDOWN_GRACE_S": "1",
        "UPSTREAM_CONCURRENCY": "2",  # one chunk in line at a time
    }
    gateway_process = start_gateway(tmp_path, simulator, LOG_LEVEL="INFO", **budget)
    gateway_process.start()
    try:
        with httpx.Client(base_url=gateway_process.url, timeout=10) as client:
            for n in range(3):
                ids = list(range(n * 1000 + 1, n * 1000 + 101))
                submitted = client.post("/api/jobs", json={"user_ids": ids, "label": f"j{n}"})
                assert submitted.status_code == 202, submitted.text
        page, watch = open_dashboard(browser, gateway_process)
        minute = page.locator('#budget .window[data-window="minute"]')
        expect(minute).to_contain_text("2 of 5 calls used", timeout=10_000)
        expect(page.locator("#budget-note")).to_contain_text("jobs for its pace", timeout=10_000)
        waits = page.locator("#jobs-active tr td:nth-child(5)")
        expect(waits.filter(has_text="its pace")).to_have_count(1, timeout=10_000)
        expect(waits.filter(has_text="other jobs")).to_have_count(2)
        assert_clean(watch)
        page.close()
    finally:
        gateway_process.stop()
