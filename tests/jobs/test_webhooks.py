"""Job callbacks, received by a real HTTP server on loopback: signed, retried, not redirected."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from app.jobs.webhook import sign
from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer
from tests.support.jobs import submit, wait_for

SECRET = "whsec-test-0123456789"


@dataclass
class Receiver:
    """Answers each POST with the next status of `answers` (then 200) and records it."""

    answers: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((dict(self.headers), body))
            status = state.answers.pop(0) if state.answers else 200
            self.send_response(status)
            if status in (301, 302, 307):
                self.send_header("Location", "/elsewhere")
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


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the HMAC of "t.body" and compare."""
    parts = dict(item.split("=", 1) for item in headers["X-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    fresh = abs(time.time() - int(parts["t"])) < 300
    return fresh and hmac.compare_digest(expected.hexdigest(), parts["v1"])


async def test_a_finished_job_calls_back_signed_and_retries_until_it_is_taken(
    start_app: StartApp, freelancer: FakeFreelancer, receiver: Receiver
) -> None:
    receiver.answers = [302, 500]  # a redirect is not followed; a 500 is retried
    running = await start_app(webhook_secret=SECRET)
    job = await submit(running, {"user_ids": [1, 2, 3], "callback_url": receiver.url})
    await wait_for(running, job["job_id"])
    deadline = time.monotonic() + 15
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = (await running.client.get(f"/api/jobs/{job['job_id']}")).json()
        if state["webhook"]["state"] != "pending":
            break
        await asyncio.sleep(0.05)
    assert state["webhook"] == {"state": "delivered", "attempts": 3, "last_error": None}
    assert len(receiver.received) == 3, "nothing went to /elsewhere"
    for headers, body in receiver.received:
        assert verify(headers, body)
        assert headers["X-Job-Id"] == job["job_id"]
        sent = orjson.loads(body)
        assert (sent["job_id"], sent["status"], sent["found"]) == (job["job_id"], "completed", 3)
    headers, body = receiver.received[-1]
    assert not verify(headers, body.replace(b'"found":3', b'"found":4')), "tampering shows"


def test_the_signature_is_stripes_scheme() -> None:
    body = b'{"job_id":"x"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", body, 1_700_000_000) == f"t=1700000000,v1={expected}"
