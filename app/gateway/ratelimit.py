"""A token bucket shared by every upstream call, so the gateway never causes a 429 itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; callers reserve a token and sleep if needed.

    Reservations may drive the balance negative: each caller then waits its turn, in
    order, instead of all waking at once. `pause_for` (a 429's Retry-After) and
    `observe_remaining` (Freelancer's `RateLimit-Remaining`) slow it down further.
    """

    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = 0.0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self) -> float:
        """Take one token; return how many seconds the caller must wait before using it."""
        now = self._clock()
        self._refill(now)
        self._tokens -= 1.0
        wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        return max(wait, self._paused_until - now)

    async def acquire(self) -> None:
        """Wait until a call may go out."""
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)

    def pause_for(self, seconds: float) -> None:
        """Send nothing for `seconds` (Freelancer said Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def observe_remaining(self, remaining: int) -> None:
        """Never hold more tokens than Freelancer says are left in its window."""
        now = self._clock()
        self._refill(now)
        self._tokens = min(self._tokens, float(remaining))

    @property
    def throttled(self) -> bool:
        """True while the next call would have to wait."""
        now = self._clock()
        self._refill(now)
        return self._tokens < 1.0 or self._paused_until > now
