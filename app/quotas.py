"""Fair limits per client, on the `limits` package: requests, ids and new ids a minute.

Requests and ids past RATE_LIMIT_PER_MIN / RATE_LIMIT_IDS_PER_MIN are refused with 429 and
the IETF RateLimit headers. New ids (misses, which spend Freelancer's budget) past
KEY_MISSES_PER_MIN are not refused: the client still gets its cached users, and the ids
it may not fetch come back `unavailable` with reason `quota`. Each window is a sliding
window counter: cheap, and close to exact.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from app.access import Client
from app.config import Settings
from app.errors import TooManyRequests


@dataclass(slots=True)
class Usage:
    """What one client (by key name) did since start."""

    requests: int = 0
    ids: int = 0
    misses: int = 0
    refused: int = 0
    """Requests answered 429."""
    over_quota: int = 0
    """New ids answered `unavailable` with reason `quota`."""


class ClientLimits:
    """Counts each client's requests, ids and misses in sliding one-minute windows."""

    def __init__(self, settings: Settings) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self.requests = RateLimitItemPerMinute(settings.rate_limit_per_min)
        self.ids = RateLimitItemPerMinute(settings.rate_limit_ids_per_min)
        self.misses = RateLimitItemPerMinute(settings.key_misses_per_min)
        self.usage: defaultdict[str, Usage] = defaultdict(Usage)
        self._policy = f'"requests";q={self.requests.amount};w=60, "ids";q={self.ids.amount};w=60'

    def admit(self, client: Client) -> None:
        """Count a request; TooManyRequests when the client is past its requests a minute."""
        usage = self.usage[client.name]
        usage.requests += 1
        if not self._limiter.hit(self.requests, client.name):
            usage.refused += 1
            self._refuse(client, self.requests, "requests")

    def admit_ids(self, client: Client, count: int) -> None:
        """Count `count` ids looked up; TooManyRequests past the ids a minute."""
        usage = self.usage[client.name]
        usage.ids += count
        if not self._limiter.hit(self.ids, client.name, cost=count):
            usage.refused += 1
            self._refuse(client, self.ids, "ids")

    def allow_misses(self, client: Client, count: int) -> int:
        """How many of `count` new ids the client may send to Freelancer now (and count them)."""
        stats = self._limiter.get_window_stats(self.misses, client.name)
        allowed = min(count, stats.remaining)
        if allowed:
            self._limiter.hit(self.misses, client.name, cost=allowed)
        usage = self.usage[client.name]
        usage.misses += allowed
        usage.over_quota += count - allowed
        return allowed

    def snapshot(self) -> list[dict[str, Any]]:
        """Usage per client name, for /api/stats, /metrics and the dashboard."""
        return [{"name": name, **asdict(usage)} for name, usage in sorted(self.usage.items())]

    def _refuse(self, client: Client, item: RateLimitItem, name: str) -> None:
        stats = self._limiter.get_window_stats(item, client.name)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise TooManyRequests(
            f"{client.name!r} is past {item.amount} {name} a minute; retry in {retry_after} s",
            retry_after=retry_after,
            limit_headers={
                "RateLimit-Policy": self._policy,
                "RateLimit": f'"{name}";r={stats.remaining};t={retry_after}',
            },
        )
