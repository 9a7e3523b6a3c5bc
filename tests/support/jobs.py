"""Crawl jobs through the API: submit one, and wait (bounded) for it to reach a state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app.jobs.model import FINISHED
from tests.support.apps import Running


async def submit(running: Running, body: Any = None, **kwargs: Any) -> dict[str, Any]:
    response = await running.client.post("/api/jobs", json=body, **kwargs)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert response.headers["location"] == f"/api/jobs/{job['job_id']}"
    return job


async def wait_for(
    running: Running,
    job_id: str,
    statuses: tuple[str, ...] = FINISHED,
    within_s: float = 20,
    done: int = 0,
) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses` with at least `done` ids done
    (bounded in time)."""
    deadline = time.monotonic() + within_s
    while True:
        job: dict[str, Any] = (await running.client.get(f"/api/jobs/{job_id}")).json()
        if job["status"] in statuses and job["done"] >= done:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']}: {job}"
        await asyncio.sleep(0.02)
