"""The interface every user store implements (SQLite embedded, MongoDB in production)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal, Protocol

from app.domain import StoredUser, UserRecord

StoreKind = Literal["sqlite", "mongodb"]


class UserStore(Protocol):
    """Where cached users live; the source of truth behind the in-memory LRU.

    Every method raises `app.errors.StoreUnavailable` (with a message that names the
    setting to check, `setting`) when the backing database cannot be reached or fails.
    """

    @property
    def kind(self) -> StoreKind:
        """`sqlite` or `mongodb`: shown in `GET /` and `/api/stats`."""
        ...

    @property
    def setting(self) -> str:
        """The setting that points at this store (`SQLITE_PATH`, `MONGODB_URL`), for messages."""
        ...

    async def open(self) -> None:
        """Connect and create the schema / indexes. Safe to call again after a failure."""

    async def close(self) -> None:
        """Release connections. Safe to call when `open` failed or was never called."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers now."""

    async def get_many(self, user_ids: Collection[int]) -> dict[int, UserRecord]:
        """The stored users among `user_ids`, in one query; absent ids are left out."""
        ...

    async def get_rendered(self, user_ids: Collection[int]) -> dict[int, StoredUser]:
        """The stored users among `user_ids` as a lookup answers them: each one's JSON
        (`UserRecord.rendered()` of the stored fields) and `fetched_at`, in one query.

        The JSON is kept beside the fields, so a hit is neither parsed nor rendered; a
        user saved before the JSON was kept (or whose JSON was dropped, see `upsert_many`)
        is rendered from its fields.
        """
        ...

    def read_now(self, user_ids: Collection[int]) -> dict[int, StoredUser] | None:
        """`get_rendered` answered at once, with no await, where the store can (an embedded
        file read in a few hundred µs); None where it cannot, now or ever (a network store):
        the caller then awaits `get_rendered`. Never raises."""
        ...

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        """Insert or update users, with their JSON, in one round trip.

        A stored `created_at` is never overwritten, and an older copy never replaces a
        newer one. When the stored `created_at` shows as another second than the one
        saved, the saved JSON (which shows the latter) is dropped: `get_rendered` renders
        that user from its fields until the next save.
        """

    async def delete(self, user_id: int, *, fetched_by: float | None = None) -> bool:
        """Remove one user; True when it was there. With `fetched_by`, only a copy fetched
        then or before (undoing the save of that copy leaves a newer one alone)."""
        ...

    async def count(self) -> int:
        """How many users are stored."""
        ...

    async def delete_fetched_before(self, cutoff: float) -> int:
        """Remove users whose `fetched_at` is before `cutoff` (Unix s); how many went."""
        ...

    async def fetched_before(self, cutoff: float, *, limit: int) -> list[UserRecord]:
        """Up to `limit` users whose `fetched_at` is before `cutoff`, oldest first."""
        ...
