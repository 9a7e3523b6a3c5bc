"""Job callbacks: a finished job's status POSTed to its `callback_url`, signed, retried.

The signature is Stripe's scheme: `X-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>">` keyed with WEBHOOK_SECRET, so a receiver checks the body and rejects old
timestamps (replays). Redirects are not followed; each attempt is bounded by
WEBHOOK_TIMEOUT_S and logged; failures are retried with backoff for an hour after the
job ended. The delivery state lives on the job, so restarts do not lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging

import httpx
import orjson

from app import __version__
from app.clock import Clock
from app.config import Settings
from app.errors import StoreUnavailable
from app.jobs.model import FINISHED, Job, job_view
from app.jobs.store import JobStore

log = logging.getLogger("app.jobs")

RETRY_FOR_S = 3600.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
POLL_S = 1.0


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Signature` value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class Webhooks:
    """Delivers due callbacks, one at a time, from the store's list of pending ones."""

    def __init__(self, store: JobStore, settings: Settings, *, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def run(self) -> None:
        self._http = httpx.AsyncClient(
            follow_redirects=False,
            timeout=self.settings.webhook_timeout_s,
            headers={"User-Agent": f"freelancer-gateway/{__version__}"},
        )
        while True:
            try:
                for job in await self.store.webhooks_due(self.clock(), 20):
                    await self.deliver(job)
            except StoreUnavailable as exc:
                log.warning("callbacks paused: %s", exc)
            except Exception:
                log.exception("callback delivery failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    async def deliver(self, job: Job) -> bool:
        """One attempt; the outcome (and the next attempt's time) is saved on the job."""
        assert self._http is not None and job.callback_url is not None
        secret = self.settings.webhook_secret
        attempt = job.webhook_attempts + 1
        error: str | None
        if secret is None:
            error = "WEBHOOK_SECRET is not set: the callback cannot be signed"
        else:
            body = orjson.dumps(job_view(job))
            headers = {
                "Content-Type": "application/json",
                "X-Signature": sign(secret.get_secret_value(), body, int(self.clock())),
                "X-Job-Id": job.job_id,
            }
            try:
                response = await self._http.post(job.callback_url, content=body, headers=headers)
                error = None if response.is_success else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
        now = self.clock()
        changes: dict[str, object] = {"webhook_attempts": attempt, "webhook_error": error}
        if error is None:
            changes |= {"webhook": "delivered", "webhook_next_at": None}
            log.info("job %s: callback delivered (attempt %d)", job.job_id, attempt)
        else:
            wait = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
            ended = job.finished_at or now
            give_up = secret is None or now + wait - ended > RETRY_FOR_S
            changes |= {
                "webhook": "failed" if give_up else "pending",
                "webhook_next_at": None if give_up else now + wait,
            }
            log.warning(
                "job %s: callback attempt %d failed (%s)%s",
                job.job_id,
                attempt,
                error,
                "; giving up" if give_up else f"; next in {wait:.0f} s",
            )
        # Compare and set: a retry-failed that reset the callback meanwhile is not undone.
        expect = {"webhook": "pending", "webhook_attempts": job.webhook_attempts}
        await self.store.update(job.job_id, changes, only_if=FINISHED, expect=expect)
        return error is None
