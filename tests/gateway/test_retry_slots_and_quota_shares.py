"""Red-team attacks on the budget, lanes, quota and hardening promises that BROKE: each
test fails on `integrate` and says which promise, with what input or interleaving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from app.gateway import Gateway
from app.gateway.budget import LocalBudget, Window
from app.http.auth import Client
from app.http.client_limits import ClientLimits
from app.store import SqliteUserStore
from app.upstream import FreelancerClient
from tests.support.apps import make_settings, until
from tests.support.freelancer import API, FakeFreelancer, error_response


async def test_a_clients_miss_does_not_wait_behind_a_job_retry_held_by_the_reserve(
    tmp_path: Path,
) -> None:
    """Promise (2), lanes: a client's miss never waits behind a job when the window has room.

    5 calls a minute, 2 of them reserved for clients: two misses spend 2, a job's batch
    spends the 3rd and gets a 503. Its retry asks the planner again and must wait ~60 s for
    the jobs' reserve, inside `ResilientUpstream.fetch_users`, so it keeps its worker slot
    (UPSTREAM_CONCURRENCY=1 here; with the default 4, four crawl batches do the same). A
    client's new id then arrives: the window has 2 calls left for it, yet it is not fetched
    before its deadline.
    """
    settings = make_settings(
        tmp_path,
        upstream_concurrency=1,
        upstream_reserve_per_min=2,
        upstream_reserve_per_hour=2,
        wait_timeout_s=2.0,
        batch_window_ms=0,
    )
    freelancer = FakeFreelancer()
    http = httpx.AsyncClient(transport=freelancer.transport)
    budget = LocalBudget([Window("minute", 5, 60.0), Window("hour", 100, 3600.0)])
    gateway = Gateway(
        settings=settings,
        store=SqliteUserStore(tmp_path / "users.db"),
        upstream=FreelancerClient(http, base_url=API),
        budget=budget,
    )
    await gateway.start()
    try:
        await gateway.lookup([1])
        await gateway.lookup([2])
        assert [w.used for w in budget.windows()] == [2, 2]
        freelancer.failures.append(error_response(503))
        gateway.enlist([1_000_001], {})
        await until(lambda: len(freelancer.calls) == 3)  # the job's call, answered 503
        await asyncio.sleep(0.2)  # its retry now waits for the jobs' reserve
        assert budget.windows()[0].remaining == 2, "the window has room for clients"
        result = await gateway.lookup([3])
        assert [3] in freelancer.calls, (
            "a client's miss waited behind a job's retry with 2 calls left in the window: "
            f"calls {freelancer.calls}, answer {result}"
        )
    finally:
        await gateway.stop()
        await http.aclose()


def test_a_keys_miss_quota_is_split_over_the_processes_at_one_id_each_at_least(
    tmp_path: Path,
) -> None:
    """Quota with several processes: each counts against an equal share, rounded down,
    but at least one id a minute (the README's rule). So a quota of 7 over 3 processes
    gets at most 6 ids fetched in a minute, and one of 2 over 3 processes at most 3 (one
    a process): the documented bound, never more."""
    for quota, expected in ((7, 6), (2, 3), (300, 300)):
        settings = make_settings(tmp_path, key_misses_per_min=quota)
        processes = [ClientLimits(settings, lambda: 3, key_names={"k"}) for _ in range(3)]
        fetched = sum(p.reserve_misses(Client("k", "read")).take(400) for p in processes)
        assert fetched == expected, (quota, fetched)
