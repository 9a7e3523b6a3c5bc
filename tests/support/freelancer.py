"""A fake Freelancer for in-process tests: its users API behind an httpx transport."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.domain import UserRecord
from app.upstream import UpstreamBatch

API = "https://api.freelancer.test/api/users/0.1/users"


def freelancer_user(user_id: int) -> dict[str, Any]:
    """A user object shaped like Freelancer's."""
    return {
        "id": user_id,
        "username": f"user{user_id}",
        "display_name": f"User {user_id}",
        "role": "freelancer",
        "registration_date": 1_500_000_000 + user_id,
        "avatar_cdn": f"//cdn.test/{user_id}.jpg",
        "location": {"country": {"name": "Australia", "code": "au"}, "city": "Sydney"},
    }


@dataclass
class FakeFreelancer:
    """Freelancer's users API, served by `transport`; records the ids of every call."""

    calls: list[list[int]] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)
    latency_s: float = 0.0
    gate: asyncio.Event | None = None
    failures: list[httpx.Response | Exception] = field(default_factory=list)
    """Answers served (or exceptions raised), in order, before the normal ones."""
    always: httpx.Response | None = None
    """When set, every call gets this answer."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first call has arrived."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        ids = [int(v) for k, v in request.url.params.multi_items() if k == "users[]"]
        self.calls.append(ids)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        if self.always is not None:
            return self.always
        users = {str(i): freelancer_user(i) for i in ids if i not in self.missing}
        return httpx.Response(
            200, json={"status": "success", "result": {"users": users}, "request_id": "t"}
        )

    @property
    def transport(self) -> httpx.MockTransport:
        """An httpx transport answering with `handle`, for `create_app(upstream_transport=)`."""
        return httpx.MockTransport(self.handle)

    @property
    def lookups(self) -> Counter[int]:
        """How many times each id was sent upstream."""
        return Counter(i for call in self.calls for i in call)


def error_response(status: int, *, headers: dict[str, str] | None = None) -> httpx.Response:
    """An error answer in Freelancer's format."""
    body = {"status": "error", "message": f"error {status}", "error_code": "X", "request_id": "t"}
    return httpx.Response(status, json=body, headers=headers)


def stub_user(uid: int) -> UserRecord:
    """A minimal record, fetched at Unix time 2."""
    return UserRecord(uid, f"user{uid}", created_at=1.0, fetched_at=2.0)


@dataclass
class SlowUpstream:
    """Answers every id after `delay_s`, recording the ids of each call."""

    delay_s: float = 0.05
    calls: list[list[int]] = field(default_factory=list)

    async def fetch_users(self, user_ids: Sequence[int]) -> UpstreamBatch:
        self.calls.append(list(user_ids))
        await asyncio.sleep(self.delay_s)
        now = time.time()
        found = [uid for uid in user_ids if uid % 97]
        return UpstreamBatch(
            {u: stub_user(u)._replace(created_at=now, fetched_at=now) for u in found}
        )
