"""Job callbacks in a deployment of several processes: one delivery, one idempotency key."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.support.apps import Running, StartApp
from tests.support.freelancer import FakeFreelancer
from tests.support.jobs import submit, wait_for
from tests.support.procs import RedisServer
from tests.support.receiver import SECRET, Receiver, verify


async def webhook_state(running: Running, job_id: str, within_s: float = 15) -> dict[str, Any]:
    """The job's callback state once it is no longer pending (bounded)."""
    deadline = time.monotonic() + within_s
    while True:
        job = (await running.client.get(f"/api/jobs/{job_id}")).json()
        if job["webhook"] is not None and job["webhook"]["state"] != "pending":
            state: dict[str, Any] = job["webhook"]
            return state
        assert time.monotonic() < deadline, f"callback still pending: {job['webhook']}"
        await asyncio.sleep(0.05)


async def test_two_processes_send_a_callback_once(
    redis_server: RedisServer,
    start_app: StartApp,
    freelancer: FakeFreelancer,
    receiver: Receiver,
) -> None:
    """Both processes poll the callbacks due; a slow receiver keeps the delivery pending
    while the other one looks (every second)."""
    receiver.delay_s = 2.5
    a = await start_app(
        webhook_secret=SECRET, webhook_allow_private=True, redis_url=redis_server.url
    )
    b = await start_app(
        webhook_secret=SECRET, webhook_allow_private=True, redis_url=redis_server.url
    )
    job = await submit(a, {"user_ids": [1, 2], "callback_url": receiver.url})
    await wait_for(b, job["job_id"])
    assert await webhook_state(a, job["job_id"]) == {
        "state": "delivered",
        "attempts": 1,
        "last_error": None,
    }
    await asyncio.sleep(1.5)  # both processes have polled again since
    assert len(receiver.received) == 1, "one process sent it"
    headers, body = receiver.received[0]
    assert verify(headers, body)


async def test_every_attempt_of_a_callback_carries_the_same_idempotency_key(
    start_app: StartApp, freelancer: FakeFreelancer, receiver: Receiver
) -> None:
    receiver.answers = [503, 200]
    running = await start_app(webhook_secret=SECRET, webhook_allow_private=True)
    job = await submit(running, {"user_ids": [3], "callback_url": receiver.url})
    await wait_for(running, job["job_id"])
    assert (await webhook_state(running, job["job_id"]))["attempts"] == 2
    keys = {headers["Idempotency-Key"] for headers, _ in receiver.received}
    assert len(receiver.received) == 2 and len(keys) == 1
    [key] = keys
    assert key.startswith(job["job_id"])
    # Another job's end is another delivery, with a key of its own.
    other = await submit(running, {"user_ids": [4], "callback_url": receiver.url})
    await wait_for(running, other["job_id"])
    await webhook_state(running, other["job_id"])
    assert receiver.received[-1][0]["Idempotency-Key"] not in keys
