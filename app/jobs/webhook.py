"""Job callbacks: a finished job's status POSTed to its `callback_url`, signed, retried.

The signature is Stripe's scheme: `X-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
"<t>.<body>">` keyed with WEBHOOK_SECRET, so a receiver checks the body and rejects old
timestamps (replays). Each attempt checks where the URL leads and connects to the address
it checked (`app.jobs.callback_url`), follows no redirect, has one deadline for all of it
(WEBHOOK_TIMEOUT_S) and never reads the answer's body (only its status counts, so no
size of answer costs anything). Whatever goes wrong in an attempt is a failed attempt,
saved on the job and retried with backoff for an hour after the job ended: one bad URL
cannot stop the loop or hold up other jobs' callbacks. The delivery state lives on the
job, so restarts do not lose it.

Once per deployment, at least once: only the leading process delivers, and each attempt
is made under a lease on the job's callback (the `Coordinator`'s named lease, token-
guarded), taken before the job is read again, held through the POST and the state
update: two processes never send one callback at the same time, nor race on its state.
A callback is still *at least once*, never exactly once: an answer lost on the way back
(a timeout) is retried, and a process paused past its lease may send it beside the next
holder. So every attempt of one delivery carries the same `Idempotency-Key` (the job id
and when it ended; a job that ends again after `retry-failed` is a new delivery): a
receiver that remembers the keys it handled processes each callback once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

import httpx
import orjson

from app import __version__
from app.clock import Clock
from app.config import Settings
from app.errors import StoreUnavailable
from app.gateway.coordinator import Coordinator
from app.jobs.callback_url import CallbackRefused, checked_address, parse, pinned
from app.jobs.model import FINISHED, Job, job_view
from app.jobs.store import JobStore

log = logging.getLogger("app.jobs")

RETRY_FOR_S = 3600.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
POLL_S = 1.0
LEASE_MARGIN_S = 5.0
"""A delivery's lease outlives its POST and its state update by this much."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Signature` value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def idempotency_key(job: Job) -> str:
    """The same for every attempt of one delivery: the job, and when it ended."""
    return f"{job.job_id}.{round((job.finished_at or 0.0) * 1000)}"


def _due(current: Job, seen: Job, now: float) -> bool:
    """Whether the callback read under the lease is still the one due when listed."""
    return (
        current.webhook == "pending"
        and current.webhook_attempts == seen.webhook_attempts
        and (current.webhook_next_at or 0.0) <= now
    )


class Webhooks:
    """Delivers due callbacks, one at a time, from the store's list of pending ones."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        *,
        clock: Clock,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.coordinator = coordinator
        """The deployment's: who leads, and the per-delivery leases (None: this process
        is the whole deployment)."""
        self.lease_s = settings.webhook_timeout_s + 2 * settings.store_timeout_s + LEASE_MARGIN_S
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
            # No proxy from the environment (it would connect, not us, to what we checked),
            # and no pooled connection: each attempt connects to the address it checked.
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        while True:
            try:
                if self.coordinator is None or self.coordinator.leads():
                    for job in await self.store.webhooks_due(self.clock(), 20):
                        await self.deliver_once(job)
            except StoreUnavailable as exc:
                log.warning("callbacks paused: %s", exc)
            except Exception:
                log.exception("callback delivery failed; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()

    async def deliver_once(self, job: Job) -> bool | None:
        """One attempt under the delivery's lease; None when another process holds it or
        the callback is no longer due (delivered or rescheduled meanwhile)."""
        coordinator = self.coordinator
        if coordinator is None:
            return await self.deliver(job)
        name = f"webhook:{job.job_id}"
        token = await coordinator.hold(name, self.lease_s)
        if token is None:
            return None
        try:
            # Read again under the lease: `job` may be another attempt's past.
            current = await self.store.get(job.job_id)
            if current is None or not _due(current, job, self.clock()):
                return None
            return await self.deliver(current, still_held=lambda: coordinator.holds(name, token))
        finally:
            await coordinator.drop(name, token)

    async def deliver(
        self, job: Job, *, still_held: Callable[[], Awaitable[bool]] | None = None
    ) -> bool:
        """One attempt; the outcome (and the next attempt's time) is saved on the job,
        unless `still_held` says the delivery's lease was lost meanwhile (its new holder
        owns the state now)."""
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
                "Idempotency-Key": idempotency_key(job),
            }
            error = await self.attempt(job.callback_url, body, headers)
        if still_held is not None and not await still_held():
            log.warning("job %s: callback attempt %d: lease lost, state left", job.job_id, attempt)
            return error is None
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
        # Compare and set: a retry-failed that reset the callback meanwhile (or another
        # attempt's outcome) is not undone by this one.
        expect = {"webhook": "pending", "webhook_attempts": job.webhook_attempts}
        if not await self.store.update(job.job_id, changes, only_if=FINISHED, expect=expect):
            log.info("job %s changed while its callback was sent: outcome not kept", job.job_id)
        return error is None

    async def attempt(self, url: str, body: bytes, headers: dict[str, str]) -> str | None:
        """POST `body` to `url` once, within WEBHOOK_TIMEOUT_S all told; why it failed, or
        None. Never raises (but for cancellation): any error is this attempt's failure."""
        assert self._http is not None
        limit = self.settings.webhook_timeout_s
        try:
            async with asyncio.timeout(limit):
                parsed = parse(url)
                address = await checked_address(
                    parsed, allow_private=self.settings.webhook_allow_private
                )
                target, host, extensions = pinned(parsed, address)
                request = self._http.build_request(
                    "POST", target, content=body, headers={**headers, **host}, extensions=extensions
                )
                response = await self._http.send(request, stream=True)
                await response.aclose()  # the status is the answer: the body is not read
        except CallbackRefused as exc:
            return f"refused: {exc}"[:200]
        except TimeoutError:
            return f"no answer within WEBHOOK_TIMEOUT_S={limit:g} s"
        except Exception as exc:  # whatever it is, it is this attempt's failure
            return f"{type(exc).__name__}: {exc}"[:200]
        return None if response.is_success else f"HTTP {response.status_code}"
