"""The `Coordinator` seam: which process fetches an id, and news of other processes' fetches.

Inside a process the gateway's Futures coalesce requests; a coordinator coalesces the
processes. The worker claims a batch before calling Freelancer: it fetches the ids it
won, and waits for the others to arrive as events. After a fetch it announces the
outcomes, which releases its claims. Cache administration (evictions, clears) is
published the same way, so every process's memory agrees.

`LocalCoordinator` keeps the claims in memory. Coordinators that share one `LocalHub`
behave as processes of one deployment (the gateways of one process, or of one test); a
coordinator with a hub of its own is today's single-process gateway.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from app.gateway.results import Outcome


@dataclass(frozen=True, slots=True)
class Fetched:
    """Outcomes of ids another process fetched (users, not found, or failures)."""

    outcomes: Mapping[int, Outcome]


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Ids whose fetcher stopped before announcing: whoever still waits must claim them."""

    user_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Evicted:
    """Ids removed from the cache by an operator."""

    user_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ExpiredBefore:
    """Users fetched before `cutoff` (Unix seconds) were cleared from the cache."""

    cutoff: float


Event = Fetched | Abandoned | Evicted | ExpiredBefore
Listener = Callable[[Event], None]
CoordinationKind = Literal["local", "redis"]


class Coordinator(Protocol):
    """Claims ids for fetching across processes and delivers what the others did."""

    kind: CoordinationKind

    @property
    def live_processes(self) -> int:
        """Processes of the deployment seen alive lately (this one included)."""

    @property
    def round_trips(self) -> int:
        """Calls to other processes' shared state made for lookups (claims, announcements)."""

    async def open(self, listener: Listener) -> None:
        """Start delivering other processes' events to `listener` (called on the loop)."""

    async def close(self) -> None:
        """Stop delivering; claims still held are released as `Abandoned`."""

    async def claim(self, user_ids: Sequence[int]) -> list[int]:
        """Claim ids for fetching: those returned are this process's to fetch now.

        Each other id is being fetched elsewhere: its outcome arrives as `Fetched`, or
        as `Abandoned` if its fetcher stops first.
        """

    async def announce(self, outcomes: Mapping[int, Outcome]) -> None:
        """Tell the others the outcomes of ids this process claimed, and release them."""

    async def publish(self, event: Evicted | ExpiredBefore) -> None:
        """Tell the others about a change to the cache made here."""

    def leads(self) -> bool:
        """Whether this process runs the work that belongs to one process (the sweep)."""

    async def hold(self, name: str, ttl_s: float) -> str | None:
        """Take the deployment's lease on `name` for `ttl_s`: its token, or None while
        another holder has it (or it cannot be taken now: Redis unreachable)."""

    async def holds(self, name: str, token: str) -> bool:
        """Whether the lease on `name` is still held with `token`."""

    async def drop(self, name: str, token: str) -> None:
        """Give the lease back, if `token` still holds it (never another holder's)."""

    def problems(self) -> list[str]:
        """Why coordination is degraded; empty when healthy."""


class LocalHub:
    """The claims and members of coordinators that act as one deployment, in memory."""

    def __init__(self) -> None:
        self.claims: dict[int, LocalCoordinator] = {}
        self.members: list[LocalCoordinator] = []
        self.leases: dict[str, tuple[str, float]] = {}
        """Named leases: token and monotonic expiry."""

    def deliver(self, sender: LocalCoordinator, event: Event) -> None:
        """Hand `event` to every member but its sender."""
        for member in list(self.members):
            if member is not sender and member.listener is not None:
                member.listener(event)


class LocalCoordinator:
    """A `Coordinator` whose claims live in a `LocalHub` (its own unless one is given)."""

    kind: CoordinationKind = "local"

    def __init__(self, hub: LocalHub | None = None) -> None:
        self.hub = hub or LocalHub()
        self.listener: Listener | None = None

    @property
    def live_processes(self) -> int:
        return max(1, len(self.hub.members))

    @property
    def round_trips(self) -> int:
        return 0

    async def open(self, listener: Listener) -> None:
        self.listener = listener
        self.hub.members.append(self)

    async def close(self) -> None:
        held = tuple(uid for uid, owner in self.hub.claims.items() if owner is self)
        for uid in held:
            del self.hub.claims[uid]
        if self in self.hub.members:
            self.hub.members.remove(self)
        self.listener = None
        if held:
            self.hub.deliver(self, Abandoned(held))

    async def claim(self, user_ids: Sequence[int]) -> list[int]:
        claims = self.hub.claims
        return [uid for uid in user_ids if claims.setdefault(uid, self) is self]

    async def announce(self, outcomes: Mapping[int, Outcome]) -> None:
        if not outcomes:
            return
        claims = self.hub.claims
        for uid in outcomes:
            if claims.get(uid) is self:
                del claims[uid]
        if len(self.hub.members) > 1:
            self.hub.deliver(self, Fetched(dict(outcomes)))

    async def publish(self, event: Evicted | ExpiredBefore) -> None:
        self.hub.deliver(self, event)

    def leads(self) -> bool:
        return bool(self.hub.members) and self.hub.members[0] is self

    async def hold(self, name: str, ttl_s: float) -> str | None:
        now = time.monotonic()
        held = self.hub.leases.get(name)
        if held is not None and held[1] > now:
            return None
        token = secrets.token_hex(8)
        self.hub.leases[name] = (token, now + ttl_s)
        return token

    async def holds(self, name: str, token: str) -> bool:
        held = self.hub.leases.get(name)
        return held is not None and held[0] == token and held[1] > time.monotonic()

    async def drop(self, name: str, token: str) -> None:
        held = self.hub.leases.get(name)
        if held is not None and held[0] == token:
            del self.hub.leases[name]

    def problems(self) -> list[str]:
        return []
