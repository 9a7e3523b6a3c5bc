"""Fair limits per client, on the `limits` package: requests, ids and new ids a minute.

Requests and ids past RATE_LIMIT_PER_MIN / RATE_LIMIT_IDS_PER_MIN are refused with 429 and
the IETF RateLimit headers. New ids (misses, which spend Freelancer's budget) past
KEY_MISSES_PER_MIN are not refused: the client still gets its cached users, and the ids
it may not fetch come back `unavailable` with reason `quota`. Each window is a sliding
window counter: cheap, and close to exact. Counting stays in the process (a hit must
never wait on Redis): with several processes each counts against an equal share.

Clients named by a key are few and configured. Clients named by their address (open
mode) are not: at most MAX_ADDRESS_CLIENTS of them are kept, the least recently seen
and those idle for IDLE_S leave (their counts go to one `ip:*` row, so totals never go
back), and metrics label them all `ip:*`, so no caller can grow a map or a label set.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from app.config import Settings
from app.errors import TooManyRequests
from app.http.auth import Client


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
    seen: float = 0.0
    """When it last called (monotonic): an address client idle for IDLE_S leaves."""

    def add(self, other: Usage) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))


COUNTS = tuple(f.name for f in fields(Usage) if f.name != "seen")
WINDOW_S = 60.0
CREDIT_PARTS = 20
MAX_ADDRESS_CLIENTS = 256
IDLE_S = 2 * WINDOW_S
ADDRESSES = "ip:*"
"""The row and the metrics label of every client named by its address (no key name has
a colon, so it names no key)."""


class ClientLimits:
    """Counts each client's requests, ids and misses in sliding one-minute windows."""

    def __init__(
        self,
        settings: Settings,
        processes: Callable[[], int] = lambda: 1,
        *,
        key_names: Collection[str] = (),
    ) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._limits = {
            "requests": settings.rate_limit_per_min,
            "ids": settings.rate_limit_ids_per_min,
            "misses": settings.key_misses_per_min,
        }
        self._processes = processes
        self._items: dict[tuple[str, int], RateLimitItem] = {}
        self._key_names = frozenset(key_names)
        self._keyed: dict[str, Usage] = {}
        self._addresses: OrderedDict[str, Usage] = OrderedDict()
        """Clients named by their address, least recently seen first."""
        self._gone = Usage()
        """What the address clients that left did."""
        self._credit: dict[tuple[str, str], list[float]] = {}
        self._policy = ", ".join(f'"{n}";q={self._limits[n]};w=60' for n in ("requests", "ids"))

    def _item(self, name: str) -> RateLimitItem:
        """This process's share of a limit: with N processes behind one balancer, 1/N each."""
        share = max(1, self._processes())
        item = self._items.get((name, share))
        if item is None:
            amount = max(1, self._limits[name] // share)
            item = self._items[(name, share)] = RateLimitItemPerMinute(amount, namespace=name)
        return item

    def usage(self, name: str, now: float | None = None) -> Usage:
        """The client's counters (a new client's, if it has none yet); `now` is
        time.monotonic(), when the caller has it."""
        usage = self._keyed.get(name)
        if usage is not None:
            return usage
        usage = self._addresses.get(name)
        now = time.monotonic() if now is None else now
        if usage is not None:
            if now - usage.seen >= 1.0:  # least recently seen first, to the second
                self._addresses.move_to_end(name)
                usage.seen = now
            return usage
        if name in self._key_names:
            usage = self._keyed[name] = Usage()
            return usage
        usage = self._addresses[name] = Usage(seen=now)
        self._expire(now)
        return usage

    def _expire(self, now: float) -> None:
        """Address clients past MAX_ADDRESS_CLIENTS or idle for IDLE_S leave."""
        clients = self._addresses
        while clients:
            name, oldest = next(iter(clients.items()))
            if len(clients) <= MAX_ADDRESS_CLIENTS and now - oldest.seen < IDLE_S:
                return
            del clients[name]
            self._gone.add(oldest)
            self._credit.pop((name, "requests"), None)
            self._credit.pop((name, "ids"), None)

    async def admit(self, client: Client) -> None:
        """Count a request; TooManyRequests when the client is past its requests a minute."""
        now = time.monotonic()
        usage = self.usage(client.name, now)
        usage.requests += 1
        if not await self._take(client, "requests", 1, now):
            usage.refused += 1
            await self._refuse(client, "requests")

    async def admit_ids(self, client: Client, count: int) -> None:
        """Count `count` ids looked up; TooManyRequests past the ids a minute."""
        now = time.monotonic()
        usage = self.usage(client.name, now)
        usage.ids += count
        if not await self._take(client, "ids", count, now):
            usage.refused += 1
            await self._refuse(client, "ids")

    async def _take(self, client: Client, name: str, cost: int, now: float) -> bool:
        """Spend `cost` of a limit, from credit taken earlier when there is some.

        Asking the limiter on every request cost the hot path a fifth of its throughput
        in `make bench`, so a client far from its limit takes 1/CREDIT_PARTS of it at a
        time and spends it locally; credit lapses with its window, and near the limit
        (a take of that size refused) every request asks the limiter exactly.
        """
        key = (client.name, name)
        credit = self._credit.get(key)
        if credit is not None and credit[0] >= cost and now - credit[1] < WINDOW_S:
            credit[0] -= cost
            return True
        item = self._item(name)
        chunk = item.amount // CREDIT_PARTS
        if chunk > cost and await self._limiter.hit(item, client.name, cost=chunk):
            self._credit[key] = [chunk - cost, now]
            return True
        self._credit.pop(key, None)
        return bool(await self._limiter.hit(item, client.name, cost=cost))

    async def misses_left(self, client: Client) -> int:
        """How many new ids the client may still send to Freelancer this minute."""
        stats = await self._limiter.get_window_stats(self._item("misses"), client.name)
        return int(stats.remaining)

    async def spend_misses(self, client: Client, allowed: int, refused: int) -> None:
        """Count the new ids a lookup sent upstream, and those it answered `quota`."""
        if allowed:
            await self._limiter.hit(self._item("misses"), client.name, cost=allowed)
        usage = self.usage(client.name)
        usage.misses += allowed
        usage.over_quota += refused

    def snapshot(self) -> list[dict[str, Any]]:
        """Usage per client name, for /api/stats and the dashboard: the keys, the address
        clients seen lately, and `ip:*` for those that left."""
        self._expire(time.monotonic())
        rows = sorted({**self._keyed, **self._addresses}.items())
        if any(getattr(self._gone, name) for name in COUNTS):
            rows.append((ADDRESSES, self._gone))
        return [{"name": name, **_counts(usage)} for name, usage in rows]

    def by_label(self) -> list[dict[str, Any]]:
        """Usage per metrics label: each key's name, and `ip:*` for every address client
        (a bounded label set whoever calls)."""
        self._expire(time.monotonic())
        everyone = Usage()
        everyone.add(self._gone)
        for usage in self._addresses.values():
            everyone.add(usage)
        rows = [{"name": name, **_counts(usage)} for name, usage in sorted(self._keyed.items())]
        if self._addresses or any(getattr(everyone, name) for name in COUNTS):
            rows.append({"name": ADDRESSES, **_counts(everyone)})
        return rows

    async def _refuse(self, client: Client, name: str) -> None:
        item = self._item(name)
        stats = await self._limiter.get_window_stats(item, client.name)
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


def _counts(usage: Usage) -> dict[str, int]:
    return {name: getattr(usage, name) for name in COUNTS}
