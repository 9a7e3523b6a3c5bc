"""The one subscription to the deployment's channel, alive only while Redis says so.

In redis-py's asyncio `PubSub`, `subscribe()` and `ping()` return once the command is
sent; the confirmation and the PONG arrive later, as messages. A link that went silent (a
failover behind a virtual IP, a NAT that dropped the flow) raises nothing and delivers
nothing, until the kernel gives up about 15 minutes later. So the link's liveness is
read from what arrives: the subscription counts only once Redis confirms it, a PING goes
out every PING_EVERY_S, and a confirmation or PONG missing for `pong_timeout_s` ends the
link. A supervisor then starts a new one (after any exception at all, not only Redis'
own), with health degraded until Redis confirms it. redis-py's own reconnection is not
relied on (redis-py issues #1572, #2089, #2417).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.coordination.client import bounded

log = logging.getLogger("app.coordination")

PING_EVERY_S = 1.0
POLL_S = 0.25


class LinkSilent(Exception):
    """Redis did not answer on the subscription's link in time."""


class Subscriber:
    """Keeps one subscription to `channel`, handing each message's data to `on_message`
    and each confirmation to `on_confirmed` (which re-checks what a gap may have lost)."""

    def __init__(
        self,
        redis: Redis,
        channel: str,
        *,
        timeout_s: float,
        on_message: Callable[[bytes], None],
        on_confirmed: Callable[[], None],
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.timeout_s = timeout_s
        self.pong_timeout_s = max(2.0, 4 * timeout_s)
        self.on_message = on_message
        self.on_confirmed = on_confirmed
        self.subscribed = asyncio.Event()
        self.problem: str | None = "not subscribed yet"
        """Why the process is not subscribed now; None while it is."""
        self.restarts = 0
        self.confirmations = 0

    async def run(self) -> None:
        """Subscribe, and subscribe again whenever the link ends, for ever."""
        failures = 0
        while True:
            confirmed = self.confirmations
            try:
                await self._subscription()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, LinkSilent) as exc:
                reason = str(exc) or type(exc).__name__
                if failures <= 1:
                    log.info("Redis subscription lost (%s); subscribing again", reason)
            except Exception as exc:
                reason = f"the subscriber failed: {type(exc).__name__}: {exc}"
                log.exception("Redis subscriber failed; restarting it")
            finally:
                self.subscribed.clear()
            self.problem = reason[:160]
            self.restarts += 1
            failures = 1 if self.confirmations > confirmed else failures + 1
            await asyncio.sleep(min(2.0, 0.1 * 2**failures))

    async def _subscription(self) -> None:
        """One subscription's life: it returns or raises only when its link is lost."""
        pubsub = self.redis.pubsub()
        try:
            await bounded(pubsub.subscribe(self.channel), self.timeout_s)
            waiting_since: float | None = time.monotonic()  # for the confirmation
            what = "the subscription's confirmation"
            last_ping = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=POLL_S)
                if message is not None:
                    kind = message["type"]
                    if kind == "message":
                        self.on_message(message["data"])
                    elif kind == "pong":
                        waiting_since = None
                    elif kind == "subscribe":
                        waiting_since = None
                        self.problem = None
                        self.confirmations += 1
                        self.subscribed.set()
                        self.on_confirmed()
                now = time.monotonic()
                if waiting_since is not None and now - waiting_since > self.pong_timeout_s:
                    raise LinkSilent(f"no answer from Redis for {self.pong_timeout_s:g} s ({what})")
                if waiting_since is None and now - last_ping >= PING_EVERY_S:
                    await bounded(pubsub.ping(), self.timeout_s)
                    waiting_since = last_ping = now
                    what = "PONG"
        finally:
            with contextlib.suppress(RedisError, OSError):
                await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
