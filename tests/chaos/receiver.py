"""A loopback receiver for job callbacks: records each delivery, its Idempotency-Key and
whether its signature checks out, and answers 200.

A few lines of asyncio streams rather than a web framework: it must live on the
harness's own event loop (beside the Redis proxies) and needs to read one POST a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from dataclasses import dataclass, field

import orjson

READ_S = 10.0
MAX_BODY = 1 << 20


@dataclass(frozen=True, slots=True)
class Delivery:
    """One callback POST as received."""

    at: float
    job_id: str
    idempotency_key: str
    signed: bool
    """X-Signature is the HMAC of `t.body` under the secret."""
    status: str
    """The job's status in the body."""


@dataclass
class CallbackReceiver:
    """Serves 127.0.0.1:`port`; `deliveries` grows with every POST."""

    secret: str
    deliveries: list[Delivery] = field(default_factory=list)
    malformed: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_S):
                head = await reader.readuntil(b"\r\n\r\n")
                headers = _headers(head)
                length = min(int(headers.get("content-length", "0")), MAX_BODY)
                body = await reader.readexactly(length)
            self._record(headers, body)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ValueError, ConnectionError):
            self.malformed += 1
        finally:
            writer.close()

    def _record(self, headers: dict[str, str], body: bytes) -> None:
        try:
            job = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.malformed += 1
            return
        self.deliveries.append(
            Delivery(
                at=time.time(),
                job_id=str(job.get("job_id")),
                idempotency_key=headers.get("idempotency-key", ""),
                signed=_signed(self.secret, headers.get("x-signature", ""), body),
                status=str(job.get("status")),
            )
        )


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _signed(secret: str, header: str, body: bytes) -> bool:
    """The Stripe-style check a real receiver makes: `t=<unix>,v1=<hex HMAC of t.body>`."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    stamp, mac = parts.get("t", ""), parts.get("v1", "")
    if not stamp.isdigit():
        return False
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), mac)
