"""Fair limits per client, on the `limits` package: requests, ids and new ids a minute.

Requests and ids past RATE_LIMIT_PER_MIN / RATE_LIMIT_IDS_PER_MIN are refused with 429 and
the IETF RateLimit headers. New ids (misses, which spend Freelancer's budget) past
KEY_MISSES_PER_MIN are not refused: the client still gets its cached users, and the ids
it may not fetch come back `unavailable` with reason `quota`. Requests and ids are
counted by the `limits` package's sliding window counter: cheap, and close to exact.
Counting stays in the process (a hit must never wait on Redis): with several processes
each counts against an equal share.

New ids are counted by `MissQuota`, our own sliding log, because the quota must be taken
where the gateway decides which ids are new, in its await-free stretch (so parallel
requests of one key can never each see the same room), up to what is left rather than
all or nothing, and given back when another fetch answered the ids: `limits` has
synchronous strategies, but no "take up to n" and no refund.

Clients named by a key are few and configured. Clients named by their address (open
mode) are not: at most MAX_ADDRESS_CLIENTS of them are kept, the least recently seen
and those idle for IDLE_S leave (their counts go to one `ip:*` row, so totals never go
back), and metrics label them all `ip:*`, so no caller can grow a map or a label set.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
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


class MissQuota:
    """New ids one client may send upstream in any `WINDOW_S`: a sliding log of takes.

    Each take is an entry `[time, ids]`; what a window holds is the sum of the entries
    younger than `WINDOW_S`. `take` and `give_back` never await, so a caller in the
    gateway's await-free stretch sees and spends the room in one step.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: deque[list[float]] = deque()

    def used(self, now: float) -> int:
        """Ids taken in the window ending at `now` (older entries are dropped)."""
        entries = self.entries
        while entries and entries[0][0] <= now - WINDOW_S:
            entries.popleft()
        return int(sum(entry[1] for entry in entries))

    def take(self, count: int, limit: int, now: float) -> tuple[int, list[float] | None]:
        """Up to `count` ids of what is left of `limit`, and the entry to give back to."""
        allowed = max(0, min(count, limit - self.used(now)))
        if not allowed:
            return 0, None
        entry = [now, float(allowed)]
        self.entries.append(entry)
        return allowed, entry

    @staticmethod
    def give_back(entry: list[float], count: int) -> None:
        """Return `count` ids of a take (its entry's own: the window forgets them when it
        would have forgotten the take, never later, never earlier)."""
        entry[1] = max(0.0, entry[1] - count)


class MissReservation:
    """What one lookup took of its client's miss quota; settled once the lookup ends."""

    __slots__ = ("_entries", "_limits", "_name", "allowed", "refused")

    def __init__(self, limits: ClientLimits, name: str) -> None:
        self._limits = limits
        self._name = name
        self._entries: list[tuple[list[float], int]] = []
        self.allowed = 0
        self.refused = 0

    def take(self, count: int) -> int:
        """How many of `count` new ids may go upstream now (no await: the gateway calls it
        while it registers them); the rest are answered `quota`."""
        allowed, entry = self._limits.take_misses(self._name, count)
        if entry is not None:
            self._entries.append((entry, allowed))
        self.allowed += allowed
        self.refused += count - allowed
        return allowed

    def settle(self, answered_elsewhere: int) -> None:
        """The lookup ended: give back the ids another fetch answered, and count the rest."""
        back = min(answered_elsewhere, self.allowed)
        for entry, taken in reversed(self._entries):
            if back <= 0:
                break
            returned = min(back, taken)
            MissQuota.give_back(entry, returned)
            back -= returned
        usage = self._limits.usage(self._name)
        usage.misses += self.allowed - min(answered_elsewhere, self.allowed)
        usage.over_quota += self.refused


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
        self._misses: dict[str, MissQuota] = {}
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
            self._misses.pop(name, None)

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
            kept = self._credit.get(key)
            if kept is not None and now - kept[1] < WINDOW_S:
                # A parallel request's leftover is kept, not overwritten (it would be
                # lost: counted by the limiter, never spent); it lapses with the older take.
                kept[0] += chunk - cost
            else:
                self._credit[key] = [chunk - cost, now]
            return True
        self._credit.pop(key, None)
        return bool(await self._limiter.hit(item, client.name, cost=cost))

    def reserve_misses(self, client: Client) -> MissReservation:
        """A reservation against the client's new ids a minute, for one lookup."""
        return MissReservation(self, client.name)

    def take_misses(self, name: str, count: int) -> tuple[int, list[float] | None]:
        """Take up to `count` of a client's new ids a minute (this process's share)."""
        quota = self._misses.get(name)
        if quota is None:
            quota = self._misses[name] = MissQuota()
        limit = max(1, self._limits["misses"] // max(1, self._processes()))
        return quota.take(count, limit, time.monotonic())

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
