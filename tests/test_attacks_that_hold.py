"""Red-team attacks that HELD, kept as regressions: a key's miss quota under parallel,
cancelled, shared and not-found lookups, and callbacks to private addresses in every spelling."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from app.errors import InvalidRequest
from app.jobs.callback_url import check_submitted
from tests.support.apps import Running, StartApp
from tests.support.freelancer import FakeFreelancer

KEY = "greedy-key-0123456789abcdef"
OTHER = "other-key-0123456789abcdef"
KEYS = f"greedy:{KEY}:read,other:{OTHER}:read"


async def post(running: Running, ids: list[int], secret: str) -> httpx.Response:
    return await running.client.post(
        "/api/users", json={"user_ids": ids}, headers={"X-API-Key": secret}
    )


async def test_a_keys_quota_holds_with_cancelled_shared_and_not_found_ids(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Twenty parallel requests of one key (quota 30), each with 5 ids another key is
    fetching, 10 new ids of which 3 do not exist, half of them cancelled mid-way (a client
    that hung up); then a second wave. The key never gets more than 30 ids fetched."""
    freelancer.latency_s = 0.1
    freelancer.missing = {uid for uid in range(10_000, 20_000) if uid % 10 < 3}
    running = await start_app(api_keys=KEYS, key_misses_per_min=30, wait_timeout_s=3)
    shared = list(range(1, 6))
    other = asyncio.create_task(post(running, shared, OTHER))
    await asyncio.wait_for(freelancer.arrived.wait(), 2)
    next_id = iter(range(10_000, 20_000))

    def batch() -> list[int]:
        return [*shared, *(next(next_id) for _ in range(10))]

    first = [asyncio.create_task(post(running, batch(), KEY)) for _ in range(20)]
    await asyncio.sleep(0.02)
    for task in first[::2]:
        task.cancel()
    for task in first:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    second = await asyncio.gather(*(post(running, batch(), KEY) for _ in range(10)))
    assert {r.status_code for r in [await other, *second]} == {200}
    greedy = [uid for uid in freelancer.lookups if uid >= 10_000]
    assert 0 < len(greedy) <= 30, f"{len(greedy)} new ids of one key fetched, quota 30"
    assert all(count == 1 for count in freelancer.lookups.values()), "each id fetched once"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",  # 127.0.0.1 as a decimal
        "http://0177.0.0.1/",  # as octal
        "http://0x7f.1/",
        "http://0.0.0.0:8000/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::1]/",
        "http://[64:ff9b::a9fe:a9fe]/",  # 169.254.169.254 through NAT64
        "http://[2002:a9fe:a9fe::1]/",  # through 6to4
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://localhost:8000/",
    ],
)
async def test_a_callback_to_a_private_address_is_refused_in_every_spelling(url: str) -> None:
    with pytest.raises(InvalidRequest, match="callback_url"):
        await check_submitted(url, allow_private=False)
