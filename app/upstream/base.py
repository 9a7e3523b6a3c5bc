"""The `Upstream` protocol: one batched look-up of users, whatever answers it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from app.domain import UserRecord


@dataclass(slots=True, frozen=True)
class UpstreamBatch:
    """What one batch call returned: the users found and Freelancer's rate-limit hints."""

    users: dict[int, UserRecord]
    rate_remaining: int | None = None


class Upstream(Protocol):
    """Anything that looks up many users in one call: the Freelancer client, or a wrapper."""

    async def fetch_users(self, user_ids: Sequence[int]) -> UpstreamBatch:
        """The users found among `user_ids`; ids left out do not exist. Raises UpstreamError."""
        ...
