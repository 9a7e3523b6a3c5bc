"""Fair limits per client: requests, ids and new ids a minute, counted exactly.

Requests and ids past RATE_LIMIT_PER_MIN / RATE_LIMIT_IDS_PER_MIN are refused with 429, the
IETF RateLimit headers and a Retry-After that is when the room comes back. New ids (misses,
which spend Freelancer's budget) past KEY_MISSES_PER_MIN are not refused: the client still
gets its cached users, and the ids it may not fetch come back `unavailable` with reason
`quota`. Counting stays in the process (a hit must never wait on Redis): with several
processes each counts against an equal share.

All three are counted by `SlidingLog`: what a client took in the last `WINDOW_S`, exactly
(never more than the limit in any span of a minute, never a refusal while there is room).
Hand-written rather than the `limits` package for three reasons. Its sliding window
counter, which this module used first, is an estimate: it weights the last minute's count
by the part of it still in the window and rounds down, so 20 a minute let 21 requests
through across a minute's boundary (seen in CI), and up to half as many again when the last
minute's requests came at its end. Its moving window is exact but stores one entry per unit
of cost (100 per 100-id request) and is a coroutine; a request's limits here are checked in
one synchronous step, O(1) amortized, with no await (the hot path's budget is a few
microseconds). And new ids need what it has no strategy for: take up to n rather than all
or nothing, in the gateway's await-free stretch (so parallel requests of one key can never
each see the same room), and give back what another fetch answered.

Clients named by a key are few and configured. Clients named by their address (open
mode) are not: at most MAX_ADDRESS_CLIENTS of them are kept, and metrics label them all
`ip:*`, so no caller can grow a map or a label set. One idle for IDLE_S leaves (its counts
go to one `ip:*` row, so totals never go back); so does the least recently seen when the
table is full and nothing it took is still in the window. One with takes in the window
never leaves: it would come back with an empty log, and 257 addresses asking in turn
would each pass their limit as often as they liked. While the table is full of such
clients, a new address is counted with the others in its place, in the `ip:*` logs (the
limit once, for all of them together); when it gets a place of its own, its logs start as
a copy of those, so what it took among them still counts. Both err on the side of
refusing: past MAX_ADDRESS_CLIENTS addresses in a minute, a newcomer may be refused while
it alone would have room, never let past its limit.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any

from app.config import Settings
from app.errors import InvalidRequest, TooManyRequests
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
MAX_ADDRESS_CLIENTS = 256
IDLE_S = 2 * WINDOW_S
ADDRESSES = "ip:*"
"""The row and the metrics label of every client named by its address (no key name has
a colon, so it names no key)."""


class SlidingLog:
    """What one client took of one limit in the last `WINDOW_S`: takes by millisecond,
    oldest first, and their running total.

    Takes in the same millisecond of the clock (the same `floor(t * 1000)`) share one
    entry, dated by the latest of them, so a log holds at most one entry a millisecond (and
    at most `limit` entries): bounded whatever the limit, even lifted. An entry leaves the
    window `WINDOW_S` after its date, so a take counts exactly as long as it should when it
    is alone in its millisecond, and under 1 ms longer when not: the window can look fuller
    than it is, never emptier. Times and amounts are two deques of numbers (not an object
    per take, which the garbage collector would walk), and a take's handle is its entry's
    position counted from the log's start, so giving back to a take the window already
    forgot finds nothing. No method awaits: a caller sees and spends the room in one step.
    """

    __slots__ = ("amounts", "gone", "times", "total")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.amounts: deque[int] = deque()
        self.gone = 0
        """Entries that left the window since the log began (handles below it are gone)."""
        self.total = 0

    def used(self, now: float) -> int:
        """Taken in the window ending at `now` (older entries leave the log)."""
        times = self.times
        horizon = now - WINDOW_S
        while times and times[0] <= horizon:
            times.popleft()
            self.total -= self.amounts.popleft()
            self.gone += 1
        return self.total

    def _add(self, amount: int, now: float) -> int:
        """Log `amount` taken at `now`; its entry's handle."""
        times, amounts = self.times, self.amounts
        if times and int(times[-1] * 1000) == int(now * 1000):  # the same millisecond
            times[-1] = now
            amounts[-1] += amount
        else:
            times.append(now)
            amounts.append(amount)
        self.total += amount
        return self.gone + len(times) - 1

    def take(self, count: int, limit: int, now: float) -> tuple[int, int | None]:
        """Up to `count` of what is left of `limit`, and the handle to give back to."""
        allowed = max(0, min(count, limit - self.used(now)))
        if not allowed:
            return 0, None
        return allowed, self._add(allowed, now)

    def take_all(self, cost: int, limit: int, now: float) -> bool:
        """Take `cost` if all of it fits, else nothing."""
        times = self.times
        # `used` only when an entry is due to leave: this runs on every request.
        if times and times[0] <= now - WINDOW_S:
            self.used(now)
        if self.total + cost > limit:
            return False
        self._add(cost, now)
        return True

    def copy(self) -> SlidingLog:
        """A log holding the same takes (given back to on its own)."""
        log = SlidingLog()
        log.times.extend(self.times)
        log.amounts.extend(self.amounts)
        log.total = self.total
        return log

    def give_back(self, handle: int, count: int) -> None:
        """Return up to `count` of the take at `handle` (never more than its entry holds):
        the window forgets them now, where it would have forgotten them with the take."""
        index = handle - self.gone
        if 0 <= index < len(self.amounts):  # else the window forgot it already
            returned = min(count, self.amounts[index])
            self.amounts[index] -= returned
            self.total -= returned

    def wait(self, cost: int, limit: int, now: float) -> float:
        """Seconds until `cost` fits (the oldest takes leave first); WINDOW_S when it never
        fits (`cost` above `limit`: ClientLimits refuses that as bad input instead)."""
        room = limit - self.used(now)
        if room >= cost:
            return 0.0
        if cost <= limit:
            for at, amount in zip(self.times, self.amounts, strict=True):
                room += amount
                if room >= cost:
                    # Not `at + WINDOW_S - now`: that sum rounds, and a take at `now`
                    # came to 60.0000000000001 s, a Retry-After of 61.
                    return WINDOW_S - (now - at)
        return WINDOW_S


class MissReservation:
    """What one lookup took of its client's miss quota; settled once the lookup ends."""

    __slots__ = ("_entries", "_limits", "_name", "allowed", "refused")

    def __init__(self, limits: ClientLimits, name: str) -> None:
        self._limits = limits
        self._name = name
        self._entries: list[tuple[SlidingLog, int, int]] = []
        """Each take: its log, its handle, how many it took."""
        self.allowed = 0
        self.refused = 0

    def take(self, count: int) -> int:
        """How many of `count` new ids may go upstream now (no await: the gateway calls it
        while it registers them); the rest are answered `quota`."""
        log = self._limits.log(self._name, "misses")
        allowed, handle = log.take(count, self._limits.share("misses"), time.monotonic())
        if handle is not None:
            self._entries.append((log, handle, allowed))
        self.allowed += allowed
        self.refused += count - allowed
        return allowed

    def settle(self, fetched_here: int) -> None:
        """The lookup ended: count the new ids it fetched here, and give back the rest of
        what it took: those another fetch answered, and those it never started (the
        gateway takes the quota before it checks its bounds, and may then shed the
        request)."""
        spent = min(fetched_here, self.allowed)
        back = self.allowed - spent
        for log, handle, taken in reversed(self._entries):
            if back <= 0:
                break
            returned = min(back, taken)
            log.give_back(handle, returned)
            back -= returned
        usage = self._limits.usage(self._name)
        usage.misses += spent
        usage.over_quota += self.refused


LIMITS = ("requests", "ids", "misses")


class ClientLimits:
    """Counts each client's requests, ids and misses in sliding one-minute windows."""

    def __init__(
        self,
        settings: Settings,
        processes: Callable[[], int] = lambda: 1,
        *,
        key_names: Collection[str] = (),
    ) -> None:
        self._limits = {
            "requests": settings.rate_limit_per_min,
            "ids": settings.rate_limit_ids_per_min,
            "misses": settings.key_misses_per_min,
        }
        self._processes = processes
        self._key_names = frozenset(key_names)
        self._keyed: dict[str, Usage] = {}
        self._addresses: OrderedDict[str, Usage] = OrderedDict()
        """Clients named by their address, least recently seen first."""
        self._gone = Usage()
        """What the address clients that left did."""
        self._logs: dict[tuple[str, str], SlidingLog] = {}
        self._policy = ", ".join(f'"{n}";q={self._limits[n]};w=60' for n in ("requests", "ids"))

    def share(self, name: str) -> int:
        """This process's share of a limit: with N processes behind one balancer, 1/N each
        (at least 1)."""
        processes = self._processes()  # every request asks: one call, no max() when alone
        limit = self._limits[name]
        return limit if processes <= 1 else max(1, limit // processes)

    def log(self, client: str, name: str) -> SlidingLog:
        """The client's log for one limit (a new one, if it has none yet); an address
        client without a place in the table (it never had one, or it left) counts in the
        `ip:*` logs."""
        log = self._logs.get((client, name))
        if log is None:
            if client not in self._keyed and client not in self._addresses:
                client = ADDRESSES
                log = self._logs.get((client, name))
            if log is None:
                log = self._logs[(client, name)] = SlidingLog()
        return log

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
        self._expire(now, room=True)
        if len(self._addresses) >= MAX_ADDRESS_CLIENTS:
            return self._gone  # no place: it counts with the others, as `ip:*`
        usage = self._addresses[name] = Usage(seen=now)
        for limit in LIMITS:  # what it may have taken as `ip:*` still counts
            shared = self._logs.get((ADDRESSES, limit))
            if shared is not None and shared.used(now):
                self._logs[(name, limit)] = shared.copy()
        return usage

    def _expire(self, now: float, *, room: bool = False) -> None:
        """Address clients idle for IDLE_S leave; with `room`, so does the least recently
        seen while the table is full; either only once nothing it took is in the window."""
        clients = self._addresses
        while clients:
            name, oldest = next(iter(clients.items()))
            due = now - oldest.seen >= IDLE_S or (room and len(clients) >= MAX_ADDRESS_CLIENTS)
            if not (due and self._idle(name, now)):
                return
            del clients[name]
            self._gone.add(oldest)
            for limit in LIMITS:
                self._logs.pop((name, limit), None)

    def _idle(self, name: str, now: float) -> bool:
        """Nothing the client took is in the window ending at `now`."""
        for limit in LIMITS:
            log = self._logs.get((name, limit))
            if log is not None and log.used(now):
                return False
        return True

    def admit(self, client: Client) -> None:
        """Count a request; TooManyRequests when the client is past its requests a minute."""
        now = time.monotonic()
        usage = self.usage(client.name, now)
        usage.requests += 1
        self._take(client, usage, "requests", 1, now)

    def admit_ids(self, client: Client, count: int) -> None:
        """Count `count` ids looked up; TooManyRequests past the ids a minute."""
        now = time.monotonic()
        usage = self.usage(client.name, now)
        usage.ids += count
        self._take(client, usage, "ids", count, now)

    def _take(self, client: Client, usage: Usage, name: str, cost: int, now: float) -> None:
        log = self.log(client.name, name)
        limit = self.share(name)
        if log.take_all(cost, limit, now):
            return
        if cost > limit:  # it never fits: no wait would help (only ids cost more than 1)
            whole = self._limits[name]
            shared = f" ({whole} over the processes)" if limit < whole else ""
            raise InvalidRequest(
                f"user_ids must hold at most {limit} ids (got {cost}): {client.name!r} may "
                f"look up {limit} {name} a minute here{shared}",
                status_code=400,
            )
        usage.refused += 1
        retry_after = max(1, math.ceil(log.wait(cost, limit, now)))
        remaining = max(0, limit - log.used(now))
        raise TooManyRequests(
            f"{client.name!r} is past {self._limits[name]} {name} a minute; "
            f"retry in {retry_after} s",
            retry_after=retry_after,
            limit_headers={
                "RateLimit-Policy": self._policy,
                "RateLimit": f'"{name}";r={remaining};t={retry_after}',
            },
        )

    def reserve_misses(self, client: Client) -> MissReservation:
        """A reservation against the client's new ids a minute, for one lookup."""
        return MissReservation(self, client.name)

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


def _counts(usage: Usage) -> dict[str, int]:
    return {name: getattr(usage, name) for name in COUNTS}
