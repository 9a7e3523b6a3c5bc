"""The budget as Freelancer sees it: calls counted at the fake Freelancer's door, at the
moment each one arrives, with the delays a real deployment has between the budget's log and
that door: a claim round trip before the send (grant to send) and a trip after it (send to
arrival). The real gateway runs on a virtual clock (`tests.support.simulation`)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from app.gateway.coordinator import LocalCoordinator
from tests.support.simulation import CountingFreelancer, Simulation, busiest, clients, simulate

LIMIT = 10
"""Calls a minute in these runs (a fifth of the default: the same arithmetic, faster)."""


class SlowClaims(LocalCoordinator):
    """A coordinator whose claim takes up to `max_s` (a slow Redis): a call granted before
    its batch was claimed goes out that much later."""

    def __init__(self, rng: random.Random, max_s: float) -> None:
        super().__init__()
        self.rng = rng
        self.max_s = max_s

    async def claim(self, user_ids: Sequence[int]) -> list[int]:
        await asyncio.sleep(self.rng.uniform(0, self.max_s))
        return await super().claim(user_ids)


def flood(tmp_path: Path, *, margin_s: float, trip_s: float, claim_s: float) -> Simulation:
    """Clients wanting 24 calls a minute for 10 minutes, with trips up to `trip_s` and
    claims up to `claim_s` (uniform, seeded), under LIMIT calls a minute."""
    rng = random.Random(16)

    async def scenario(sim: Simulation) -> None:
        await clients(sim, 600, every_s=10, size=4)

    return simulate(
        tmp_path,
        scenario,
        freelancer=CountingFreelancer(trip_s=lambda: rng.uniform(0, trip_s)),
        coordinator=SlowClaims(rng, claim_s),
        upstream_rate_per_min=LIMIT,
        upstream_reserve_per_min=2,
        upstream_window_margin_s=margin_s,
        wait_timeout_s=3600,
    )


@pytest.mark.sim
def test_with_trips_within_the_margin_freelancer_never_sees_a_minute_over_the_limit(
    tmp_path: Path,
) -> None:
    sim = flood(tmp_path, margin_s=0.5, trip_s=0.5, claim_s=2.0)
    arrivals = sim.freelancer.times()
    assert busiest(arrivals, 60.0) == LIMIT, "the limit, used and never passed"
    assert len(arrivals) >= 10 * LIMIT - 5, "and used minute after minute"


@pytest.mark.sim
def test_without_the_margin_a_trip_puts_freelancer_over_the_limit(tmp_path: Path) -> None:
    """Why the margin: the log is exact, but calls arrive a trip after they are logged;
    a late one and an early one `limit` apart land less than a minute apart."""
    sim = flood(tmp_path, margin_s=0.0, trip_s=0.5, claim_s=0.0)
    assert busiest(sim.freelancer.times(), 60.0) > LIMIT


@pytest.mark.sim
def test_a_slow_claim_does_not_eat_the_margin_calls_are_logged_when_sent(tmp_path: Path) -> None:
    """Claims of up to 2 s between the grant and the send, and a margin of 50 ms for the
    trip: the call is logged at its send (`Budget.stamp`), not at its grant."""
    sim = flood(tmp_path, margin_s=0.05, trip_s=0.05, claim_s=2.0)
    assert busiest(sim.freelancer.times(), 60.0) == LIMIT
