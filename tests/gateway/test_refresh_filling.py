"""On a scarce budget a refresh call fills up before it is spent: stale users wait (served
stale) until a call's worth is queued or the oldest has waited the planner's patience; on a
plentiful one they go at once. Calls counted at Freelancer's door, on simulated time."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.domain import UserRecord
from app.gateway.cache import cache_entry
from app.gateway.planner import REFRESH_PATIENCE_S
from tests.support.simulation import Simulation, simulate

TTL_S = 3600.0  # patience: min(60 s, TTL / 20 = 180 s, STALE_IF_ERROR_S / 2 = 1800 s)


def stale(sim: Simulation, ids: range) -> None:
    """`ids` held in memory, a little past the TTL (served stale, refreshed on a hit)."""
    fetched_at = sim.gateway.clock() - TTL_S - 10
    for uid in ids:
        sim.gateway.memory.users.put(
            uid, cache_entry(UserRecord(uid, f"u{uid}", fetched_at=fetched_at))
        )


def calls_of(sim: Simulation) -> list[tuple[float, int]]:
    return [(round(at, 1), len(ids)) for at, ids in sim.freelancer.calls]


def test_a_few_stale_users_wait_to_fill_a_call_on_the_default_budget(tmp_path: Path) -> None:
    async def scenario(sim: Simulation) -> None:
        stale(sim, range(1, 201))
        start = sim.now
        for uid in range(1, 6):  # five stale hits, a second apart: five ids queued
            answer = await sim.gateway.lookup([uid])
            assert answer.sources == ["stale"]
            await asyncio.sleep(1)
        await asyncio.sleep(REFRESH_PATIENCE_S - 10)
        assert sim.freelancer.calls == [], "no near-empty call while the patience lasts"
        await asyncio.sleep(15)
        assert [n for _, n in calls_of(sim)] == [5], "then one call with the five"
        assert sim.freelancer.calls[0][0] - start <= REFRESH_PATIENCE_S + 1
        # A call's worth queued goes at once.
        await asyncio.gather(*(sim.gateway.lookup([uid]) for uid in range(101, 201)))
        await asyncio.sleep(1)
        assert [n for _, n in calls_of(sim)] == [5, 100]

    simulate(tmp_path, scenario, cache_ttl_s=TTL_S, refresh_ahead=False)


def test_on_a_plentiful_budget_a_stale_user_is_refreshed_at_once(tmp_path: Path) -> None:
    async def scenario(sim: Simulation) -> None:
        stale(sim, range(1, 2))
        await sim.gateway.lookup([1])
        await asyncio.sleep(1)
        assert [n for _, n in calls_of(sim)] == [1]

    simulate(
        tmp_path,
        scenario,
        cache_ttl_s=TTL_S,
        refresh_ahead=False,
        upstream_rate_per_min=6000,
        upstream_rate_per_hour=360_000,
    )
