"""A callback receiver on loopback: a real HTTP server that records each POST and answers
with the statuses a test scripts, and what a receiver does to check a signature."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SECRET = "whsec-test-0123456789"
"""The WEBHOOK_SECRET the callback tests sign with."""


@dataclass
class Receiver:
    """Answers each POST with the next status of `answers` (then 200) and records it."""

    answers: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    hold: threading.Event | None = None
    """When set, each POST is answered only once this is set (at most 10 s)."""
    delay_s: float = 0.0
    """How long each POST takes to answer."""


@contextmanager
def serve_receiver() -> Iterator[Receiver]:
    """A `Receiver` listening on a free loopback port until the block ends."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((dict(self.headers), body))
            if state.hold is not None:
                state.hold.wait(10)
            time.sleep(state.delay_s)
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
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the HMAC of "t.body" and compare."""
    parts = dict(item.split("=", 1) for item in headers["X-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    fresh = abs(time.time() - int(parts["t"])) < 300
    return fresh and hmac.compare_digest(expected.hexdigest(), parts["v1"])
