"""The production store: a MongoDB collection through PyMongo's async API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pymongo import ASCENDING, AsyncMongoClient, UpdateOne
from pymongo.errors import BulkWriteError, PyMongoError

from app.domain import StoredUser, UserRecord
from app.errors import StoreUnavailable

DUPLICATE_KEY = 11000

PROJECTION = {"_id": 0}
RENDERED = {"_id": 0, "user_id": 1, "fetched_at": 1, "json": 1}
"""What a hit needs: the rest of a document is neither sent nor decoded."""
SECOND = timedelta(seconds=1)


class MongoUserStore:
    """Users in `{database}.users`, one document per user, unique on `user_id`.

    The client is a parameter so tests can pass a stand-in; it is closed with the store
    when `owns_client`.
    """

    kind: Literal["mongodb"] = "mongodb"
    setting = "MONGODB_URL"

    def __init__(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        *,
        database: str,
        collection: str = "users",
        timeout_s: float = 5.0,
        owns_client: bool = True,
    ) -> None:
        self._client = client
        self._users = client[database][collection]
        self.timeout_s = timeout_s
        self._owns_client = owns_client

    @property
    def client(self) -> AsyncMongoClient[dict[str, Any]]:
        """The client: the job store shares it (app.jobs.store.create_job_store)."""
        return self._client

    async def open(self) -> None:
        """Create the indexes (idempotent); fails while the server cannot be reached."""
        async with self._guard():
            await self._users.create_index([("user_id", ASCENDING)], unique=True)
            await self._users.create_index([("fetched_at", ASCENDING)])

    async def close(self) -> None:
        """Close the client when this store owns it."""
        if self._owns_client:
            await self._client.close()

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the server answers."""
        async with self._guard():
            await self._users.find_one({}, PROJECTION)

    async def get_many(self, user_ids: Collection[int]) -> dict[int, UserRecord]:
        """The stored users among `user_ids`, in one `$in` query."""
        if not user_ids:
            return {}
        async with self._guard():
            cursor = self._users.find({"user_id": {"$in": list(user_ids)}}, PROJECTION)
            documents = await cursor.to_list(None)
        return {doc["user_id"]: _record(doc) for doc in documents}

    async def get_rendered(self, user_ids: Collection[int]) -> dict[int, StoredUser]:
        """The stored users among `user_ids`, their JSON as stored, in one `$in` query
        that projects only it and `fetched_at`; documents without it (saved before it was
        kept) are read whole by a second query and rendered."""
        if not user_ids:
            return {}
        older: list[dict[str, Any]] = []
        async with self._guard():
            cursor = self._users.find({"user_id": {"$in": list(user_ids)}}, RENDERED)
            documents = await cursor.to_list(None)
            bare = [doc["user_id"] for doc in documents if doc.get("json") is None]
            if bare:
                cursor = self._users.find({"user_id": {"$in": bare}}, PROJECTION)
                older = await cursor.to_list(None)
        found: dict[int, StoredUser] = {}
        for doc in documents:
            json = doc.get("json")
            if json is not None:
                found[doc["user_id"]] = (bytes(json), _timestamp(doc["fetched_at"]) or 0.0)
        for doc in older:
            record = _record(doc)
            found[record.user_id] = (record.rendered(), record.fetched_at)
        return found

    def read_now(self, user_ids: Collection[int]) -> dict[int, StoredUser] | None:
        """None: a read from MongoDB is a network round trip, always awaited."""
        return None

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        """One unordered bulk_write of two updates a user; `created_at` only on insert.

        The first sets the fields and the JSON where the stored `created_at` shows as the
        same second as the saved one (or inserts the user); the second, where it shows
        otherwise, sets the fields and drops the JSON (it shows the wrong `created_at`:
        the user is rendered from its fields on read until its next save). Their filters
        exclude each other, so the order they run in does not matter.
        """
        if not users:
            return
        operations = []
        for user in users:
            document = _document(user)
            created_at = document.pop("created_at")
            first = _datetime(float(user.created_at // 1))
            same_second = {"$gte": first, "$lt": first + SECOND}
            other_second = [
                {"created_at": {"$lt": first}},
                {"created_at": {"$gte": first + SECOND}},
                {"created_at": {"$exists": False}},
            ]
            # Matches only an older copy (or none): a late writer never replaces a newer
            # one. Its upsert then collides on the unique user_id, which is ignored below.
            newer = {"user_id": user.user_id, "fetched_at": {"$lte": document["fetched_at"]}}
            operations.append(
                UpdateOne(
                    {**newer, "created_at": same_second},
                    {
                        "$set": {**document, "json": user.rendered()},
                        "$setOnInsert": {"created_at": created_at},
                    },
                    upsert=True,
                )
            )
            operations.append(
                UpdateOne(
                    {**newer, "$or": other_second}, {"$set": document, "$unset": {"json": ""}}
                )
            )
        async with self._guard():
            try:
                await self._users.bulk_write(operations, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise

    async def delete(self, user_id: int, *, fetched_by: float | None = None) -> bool:
        """Remove one user; True when it was there. With `fetched_by`, only a copy
        fetched then or before."""
        query: dict[str, Any] = {"user_id": user_id}
        if fetched_by is not None:
            query["fetched_at"] = {"$lte": _datetime(fetched_by)}
        async with self._guard():
            result = await self._users.delete_one(query)
        return result.deleted_count > 0

    async def count(self) -> int:
        """How many users are stored."""
        async with self._guard():
            return await self._users.count_documents({})

    async def delete_fetched_before(self, cutoff: float) -> int:
        """Remove users fetched before `cutoff`; how many went."""
        async with self._guard():
            result = await self._users.delete_many({"fetched_at": {"$lt": _datetime(cutoff)}})
        return result.deleted_count

    async def fetched_before(self, cutoff: float, *, limit: int) -> list[UserRecord]:
        """Up to `limit` users fetched before `cutoff`, oldest first."""
        async with self._guard():
            cursor = (
                self._users.find({"fetched_at": {"$lt": _datetime(cutoff)}}, PROJECTION)
                .sort("fetched_at", ASCENDING)
                .limit(limit)
            )
            documents = await cursor.to_list(None)
        return [_record(doc) for doc in documents]

    def _guard(self) -> AbstractAsyncContextManager[None]:
        return failures(self.timeout_s)


@asynccontextmanager
async def failures(timeout_s: float) -> AsyncIterator[None]:
    """Bound the operation in time; driver errors become StoreUnavailable (no URL in it)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (PyMongoError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        raise StoreUnavailable(f"MongoDB store failed: {reason}; check MONGODB_URL") from exc


def _datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.timestamp()
    return float(value)


def _document(user: UserRecord) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "username": user.username,
        "display_name": user.display_name,
        "country": user.country,
        "city": user.city,
        "role": user.role,
        "registration_date": None
        if user.registration_date is None
        else _datetime(user.registration_date),
        "avatar_url": user.avatar_url,
        "created_at": _datetime(user.created_at),
        "fetched_at": _datetime(user.fetched_at),
    }


def _record(doc: dict[str, Any]) -> UserRecord:
    return UserRecord(
        user_id=int(doc["user_id"]),
        username=doc.get("username") or str(doc["user_id"]),
        display_name=doc.get("display_name"),
        country=doc.get("country"),
        city=doc.get("city"),
        role=doc.get("role"),
        registration_date=_timestamp(doc.get("registration_date")),
        avatar_url=doc.get("avatar_url"),
        created_at=_timestamp(doc.get("created_at")) or 0.0,
        fetched_at=_timestamp(doc.get("fetched_at")) or 0.0,
    )
