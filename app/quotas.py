"""Fair limits per client, on the `limits` package: requests, ids and new ids a minute.

Requests and ids past RATE_LIMIT_PER_MIN / RATE_LIMIT_IDS_PER_MIN are refused with 429 and
the IETF RateLimit headers. New ids (misses, which spend Freelancer's budget) past
KEY_MISSES_PER_MIN are not refused: the client still gets its cached users, and the ids
it may not fetch come back `unavailable` with reason `quota`. Each window is a sliding
window counter: cheap, and close to exact. Counting stays in the process (a hit must
never wait on Redis): with several processes each counts against an equal share.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
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

    def __init__(self, settings: Settings, processes: Callable[[], int] = lambda: 1) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._limits = {
            "requests": settings.rate_limit_per_min,
            "ids": settings.rate_limit_ids_per_min,
            "misses": settings.key_misses_per_min,
        }
        self._processes = processes
        self._items: dict[tuple[str, int], RateLimitItem] = {}
        self.usage: defaultdict[str, Usage] = defaultdict(Usage)
        self._policy = ", ".join(f'"{n}";q={self._limits[n]};w=60' for n in ("requests", "ids"))

    def _item(self, name: str) -> RateLimitItem:
        """This process's share of a limit: with N processes behind one balancer, 1/N each."""
        share = max(1, self._processes())
        item = self._items.get((name, share))
        if item is None:
            amount = max(1, self._limits[name] // share)
            item = self._items[(name, share)] = RateLimitItemPerMinute(amount, namespace=name)
        return item

    def admit(self, client: Client) -> None:
        """Count a request; TooManyRequests when the client is past its requests a minute."""
        usage = self.usage[client.name]
        usage.requests += 1
        item = self._item("requests")
        if not self._limiter.hit(item, client.name):
            usage.refused += 1
            self._refuse(client, item, "requests")

    def admit_ids(self, client: Client, count: int) -> None:
        """Count `count` ids looked up; TooManyRequests past the ids a minute."""
        usage = self.usage[client.name]
        usage.ids += count
        item = self._item("ids")
        if not self._limiter.hit(item, client.name, cost=count):
            usage.refused += 1
            self._refuse(client, item, "ids")

    def allow_misses(self, client: Client, count: int) -> int:
        """How many of `count` new ids the client may send to Freelancer now (and count them)."""
        item = self._item("misses")
        stats = self._limiter.get_window_stats(item, client.name)
        allowed = min(count, stats.remaining)
        if allowed:
            self._limiter.hit(item, client.name, cost=allowed)
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
            f"{client.name!r} is past {self._limits[name]} {name} a minute; "
            f"retry in {retry_after} s",
            retry_after=retry_after,
            limit_headers={
                "RateLimit-Policy": self._policy,
                "RateLimit": f'"{name}";r={stats.remaining};t={retry_after}',
            },
        )
