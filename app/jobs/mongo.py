"""Jobs in the MongoDB database beside the users: a `jobs` and a `job_items` collection."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from app.jobs.model import (
    ACTIVE,
    FAILED,
    FINISHED,
    ITEM_STATES,
    JOB_FIELDS,
    PENDING,
    Item,
    Job,
)
from app.store.mongo import DUPLICATE_KEY, PROJECTION, failures

CHUNK = 10_000
"""Items per insert_many: well under the 16 MB message limit."""

Document = dict[str, Any]


class MongoJobStore:
    """Jobs in `{database}.jobs` (one document per job, as `Job.as_dict()`) and
    `{database}.job_items` (one per id). The client belongs to the user store: never closed
    here."""

    def __init__(
        self, client: AsyncMongoClient[Document], *, database: str, timeout_s: float = 5.0
    ) -> None:
        self._jobs: AsyncCollection[Document] = client[database]["jobs"]
        self._items: AsyncCollection[Document] = client[database]["job_items"]
        self.timeout_s = timeout_s

    async def open(self) -> None:
        async with self._guard():
            await self._jobs.create_index([("job_id", ASCENDING)], unique=True)
            await self._jobs.create_index([("status", ASCENDING), ("job_id", ASCENDING)])
            await self._items.create_index([("job_id", ASCENDING), ("seq", ASCENDING)], unique=True)
            await self._items.create_index(
                [("job_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING)]
            )

    async def close(self) -> None:
        """Nothing to release: the client is the user store's."""

    def _guard(self) -> AbstractAsyncContextManager[None]:
        return failures(self.timeout_s)

    async def create(self, job: Job, user_ids: Sequence[int]) -> None:
        async with self._guard():
            await self._jobs.insert_one(job.as_dict())
            await self._insert_items(job.job_id, 0, user_ids)

    async def get(self, job_id: str) -> Job | None:
        async with self._guard():
            doc = await self._jobs.find_one({"job_id": job_id}, PROJECTION)
        return None if doc is None else Job(**doc)

    async def list_jobs(self, *, status: str | None, limit: int, before: str | None) -> list[Job]:
        query: Document = {}
        if status is not None:
            query["status"] = status
        if before is not None:
            query["job_id"] = {"$lt": before}
        return await self._find(query, "job_id", DESCENDING, limit)

    async def active(self) -> list[Job]:
        return await self._find({"status": {"$in": list(ACTIVE)}}, "job_id", ASCENDING, 0)

    async def update(
        self, job_id: str, changes: Mapping[str, Any], *, only_if: Collection[str] = ()
    ) -> bool:
        unknown = set(changes) - set(JOB_FIELDS)
        if unknown:
            raise ValueError(f"not job fields: {sorted(unknown)}")
        query: Document = {"job_id": job_id}
        if only_if:
            query["status"] = {"$in": list(only_if)}
        async with self._guard():
            if not changes:
                return await self._jobs.count_documents(query, limit=1) > 0
            result = await self._jobs.update_one(query, {"$set": dict(changes)})
        return result.matched_count > 0

    async def materialise(self, job_id: str, first_seq: int, user_ids: Sequence[int]) -> None:
        async with self._guard():
            await self._insert_items(job_id, first_seq, user_ids)
            await self._jobs.update_one(
                {"job_id": job_id}, {"$max": {"materialised": first_seq + len(user_ids)}}
            )

    async def pending_items(self, job_id: str, *, after: int, limit: int) -> list[Item]:
        return await self.items(job_id, after=after, limit=limit, states=(PENDING,))

    async def record(
        self, job_id: str, items: Sequence[Item], *, upstream_calls: int, now: float
    ) -> None:
        # Failed items carry their own reasons: one update per (state, reason).
        groups: dict[tuple[int, str | None], list[int]] = defaultdict(list)
        for item in items:
            groups[(item.state, item.reason)].append(item.seq)
        counts = {name: 0 for name in ITEM_STATES.values()}
        async with self._guard():
            for (state, reason), seqs in groups.items():
                result = await self._items.update_many(
                    {"job_id": job_id, "seq": {"$in": seqs}, "state": PENDING},
                    {"$set": {"state": state, "reason": reason}},
                )
                counts[ITEM_STATES[state]] += result.modified_count
            await self._jobs.update_one(
                {"job_id": job_id},
                {
                    "$inc": {
                        **counts,
                        "done": sum(counts.values()),
                        "upstream_calls": upstream_calls,
                    },
                    "$set": {"updated_at": now},
                },
            )

    async def items(
        self, job_id: str, *, after: int, limit: int, states: Collection[int]
    ) -> list[Item]:
        query = {"job_id": job_id, "seq": {"$gt": after}, "state": {"$in": list(states)}}
        async with self._guard():
            cursor = self._items.find(query, PROJECTION).sort("seq", ASCENDING).limit(limit)
            docs = await cursor.to_list(None)
        return [Item(d["seq"], d["user_id"], d["state"], d.get("reason")) for d in docs]

    async def retry_failed(self, job_id: str, now: float) -> int:
        async with self._guard():
            result = await self._items.update_many(
                {"job_id": job_id, "state": FAILED}, {"$set": {"state": PENDING, "reason": None}}
            )
            count = result.modified_count
            await self._jobs.update_one(
                {"job_id": job_id, "status": {"$in": list(FINISHED)}},
                {
                    "$inc": {"failed": -count, "done": -count},
                    "$set": {
                        "status": "pending",
                        "finished_at": None,
                        "error": None,
                        "updated_at": now,
                        "webhook": None,
                        "webhook_attempts": 0,
                        "webhook_error": None,
                        "webhook_next_at": None,
                    },
                },
            )
        return count

    async def delete(self, job_id: str) -> bool:
        async with self._guard():
            await self._items.delete_many({"job_id": job_id})
            result = await self._jobs.delete_one({"job_id": job_id})
        return result.deleted_count > 0

    async def count_by_status(self) -> dict[str, int]:
        # distinct + a count per status (both on the (status, job_id) index) rather than an
        # aggregate $group: mongomock_motor's aggregate() is not awaitable as PyMongo's is.
        async with self._guard():
            statuses = await self._jobs.distinct("status")
            counts = {s: await self._jobs.count_documents({"status": s}) for s in statuses}
        return {status: n for status, n in counts.items() if n}

    async def webhooks_due(self, now: float, limit: int) -> list[Job]:
        query = {"webhook": "pending", "webhook_next_at": {"$lte": now}}
        return await self._find(query, "webhook_next_at", ASCENDING, limit)

    async def _find(self, query: Document, key: str, direction: int, limit: int) -> list[Job]:
        """Jobs matching `query` sorted on `key`; `limit` 0 means all."""
        async with self._guard():
            cursor = self._jobs.find(query, PROJECTION).sort(key, direction).limit(limit)
            docs = await cursor.to_list(None)
        return [Job(**doc) for doc in docs]

    async def _insert_items(self, job_id: str, first_seq: int, user_ids: Sequence[int]) -> None:
        """Pending items `first_seq...`, in chunks; items already there are left alone."""
        for start in range(0, len(user_ids), CHUNK):
            docs = [
                {"job_id": job_id, "seq": seq, "user_id": uid, "state": PENDING, "reason": None}
                for seq, uid in enumerate(user_ids[start : start + CHUNK], first_seq + start)
            ]
            try:
                await self._items.insert_many(docs, ordered=False)
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if not errors or any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
