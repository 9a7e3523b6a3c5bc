"""A job shares Freelancer with waiting clients: it leaves them budget and slots, and it
never spends more than the hour allows."""

from __future__ import annotations

import asyncio

from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer
from tests.support.jobs import submit, wait_for


async def test_a_job_keeps_a_reserve_for_clients_and_plans_against_the_hour(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    # 20 calls an hour, 6 of them back to back: the job may take 3 and leave 3 (the reserve).
    running = await start_app(
        upstream_rate_per_min=1000, upstream_rate_per_hour=20, upstream_burst=6, batch_size=10
    )
    job = await submit(running, {"user_ids": list(range(1, 501))})
    await wait_for(running, job["job_id"], ("running",))
    for _ in range(100):
        if len(freelancer.calls) >= 3:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)
    assert len(freelancer.calls) == 3, "the job stopped at the reserve"
    # Its three chunks are recorded (a chunk whose write failed is redone, from the store).
    state = await wait_for(running, job["job_id"], ("running",), done=30)
    assert state["done"] == 30 and len(freelancer.calls) == 3
    # 47 calls to go, 3 left this hour, then one every 257 s: hours, not seconds.
    assert state["eta_s"] > 3 * 3600
    # A waiting client still gets a call at once.
    answer = await running.lookup(9_999)
    assert answer["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 4
    health = (await running.client.get("/")).json()
    hour = next(w for w in health["budget"] if w["name"] == "hour")
    assert (hour["limit"], hour["remaining"]) == (20, 2)


async def test_a_waiting_client_does_not_queue_behind_a_job(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_concurrency=2)
    freelancer.latency_s = 0.3
    job = await submit(running, {"user_ids": list(range(1, 2001))})
    await asyncio.wait_for(freelancer.arrived.wait(), 5)
    answer = await running.lookup(77_777)
    assert answer["users"][0]["source"] == "fetched"
    # The job holds one of the two slots: the client's call went out beside its first
    # batch, not after the 20 it has queued up.
    assert len(freelancer.calls) <= 3
    state = (await running.client.get(f"/api/jobs/{job['job_id']}")).json()
    assert state["done"] <= 200


async def test_jobs_of_higher_priority_go_first_and_equals_take_turns(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_concurrency=2, batch_size=10)
    freelancer.gate = asyncio.Event()
    blocker = await submit(running, {"user_ids": [1]})
    await asyncio.wait_for(freelancer.arrived.wait(), 5)  # the lane is busy
    low = await submit(running, {"user_ids": list(range(1000, 1030)), "priority": "low"})
    a = await submit(running, {"user_ids": list(range(2000, 2030))})
    b = await submit(running, {"user_ids": list(range(3000, 3030))})
    freelancer.gate.set()
    for job in (blocker, a, b, low):
        await wait_for(running, job["job_id"])
    order = [call[0] // 1000 for call in freelancer.calls[1:]]
    assert order[:6] == [2, 3, 2, 3, 2, 3], order
    assert order[6:] == [1, 1, 1], "the low-priority job went last"


async def test_a_job_gets_its_share_while_clients_use_up_the_budget(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    # About 10 calls a second after a burst of 4; clients alone would spend all of them.
    running = await start_app(
        upstream_rate_per_min=600, upstream_burst=4, batch_size=10, batch_window_ms=0
    )
    stop = asyncio.Event()

    async def client(first: int) -> None:
        uid = first
        while not stop.is_set() and uid < first + 500:
            uid += 1
            await running.lookup(uid)

    clients = [asyncio.create_task(client(100_000 * n)) for n in range(1, 4)]
    await asyncio.sleep(0.5)  # the clients have drained the burst
    job = await submit(running, {"user_ids": list(range(1, 201))})
    await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*clients)
    state = (await running.client.get(f"/api/jobs/{job['job_id']}")).json()
    job_calls = sum(1 for call in freelancer.calls if call[0] <= 200)
    total = len(freelancer.calls)
    assert state["done"] >= 30, state
    assert job_calls >= 0.1 * total, (job_calls, total)
