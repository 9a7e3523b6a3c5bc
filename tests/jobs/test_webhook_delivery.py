"""Job callbacks in a deployment of several processes: one delivery, one idempotency key."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.jobs.test_webhooks import SECRET, verify
from tests.support.apps import Running, StartApp
from tests.support.freelancer import FakeFreelancer
from tests.support.jobs import submit, wait_for
from tests.support.procs import RedisServer


@dataclass
class SlowReceiver:
    """Takes `delay_s` to answer each POST, with the next of `answers` (then 200)."""

    delay_s: float = 0.0
    answers: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[SlowReceiver]:
    state = SlowReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((dict(self.headers), body))
            time.sleep(state.delay_s)
            self.send_response(state.answers.pop(0) if state.answers else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


async def webhook_state(running: Running, job_id: str, within_s: float = 15) -> dict[str, Any]:
    """The job's callback state once it is no longer pending (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        job = (await running.client.get(f"/api/jobs/{job_id}")).json()
        if job["webhook"] is not None and job["webhook"]["state"] != "pending":
            state: dict[str, Any] = job["webhook"]
            return state
        assert time.monotonic() < deadline, f"callback still pending: {job['webhook']}"
        await asyncio.sleep(0.05)


async def test_two_processes_send_a_callback_once(
    redis_server: RedisServer,
    start_app: StartApp,
    freelancer: FakeFreelancer,
    receiver: SlowReceiver,
) -> None:
    """Both processes poll the callbacks due; a slow receiver keeps the delivery pending
    while the other one looks (every second)."""
    receiver.delay_s = 2.5
    a = await start_app(webhook_secret=SECRET, redis_url=redis_server.url)
    b = await start_app(webhook_secret=SECRET, redis_url=redis_server.url)
    job = await submit(a, {"user_ids": [1, 2], "callback_url": receiver.url})
    await wait_for(b, job["job_id"])
    assert await webhook_state(a, job["job_id"]) == {
        "state": "delivered",
        "attempts": 1,
        "last_error": None,
    }
    await asyncio.sleep(1.5)  # both processes have polled again since
    assert len(receiver.received) == 1, "one process sent it"
    headers, body = receiver.received[0]
    assert verify(headers, body)


async def test_every_attempt_of_a_callback_carries_the_same_idempotency_key(
    start_app: StartApp, freelancer: FakeFreelancer, receiver: SlowReceiver
) -> None:
    receiver.answers = [503, 200]
    running = await start_app(webhook_secret=SECRET)
    job = await submit(running, {"user_ids": [3], "callback_url": receiver.url})
    await wait_for(running, job["job_id"])
    assert (await webhook_state(running, job["job_id"]))["attempts"] == 2
    keys = {headers["Idempotency-Key"] for headers, _ in receiver.received}
    assert len(receiver.received) == 2 and len(keys) == 1
    [key] = keys
    assert key.startswith(job["job_id"])
    # Another job's end is another delivery, with a key of its own.
    other = await submit(running, {"user_ids": [4], "callback_url": receiver.url})
    await wait_for(running, other["job_id"])
    await webhook_state(running, other["job_id"])
    assert receiver.received[-1][0]["Idempotency-Key"] not in keys
