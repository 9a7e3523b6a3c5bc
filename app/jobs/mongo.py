"""Jobs in the MongoDB database beside the users: a `jobs` and a `job_items` collection.

An operation is several writes with no transaction (a standalone server has none; one
algorithm everywhere is one behaviour to test), ordered and journaled so that a crash or a
timeout between any two writes leaves nothing to act on wrongly (two-phase commit):
- `create` writes the job hidden (status `creating`), then its ids, then shows it;
- `record` and `retry_failed` push an entry on the job's `journal`, tag the items they
  move with its token, then move the counters and pull the entry in one atomic update.
  An entry a crash left is settled from its tagged items (counted; for a retry, moved
  again), so the counters end equal to the items. A retry holds the job out of `active`;
- `delete` hides the job (status `deleting`), removes its ids in bounded chunks, the job
  last; `sweep` finishes what a crash or the time bound left.
An entry is abandoned once `stale_after_s` old: a live operation never lasts that long
(each is bounded by STORE_TIMEOUT_S), and settling a live one would count its ids twice.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.errors import BulkWriteError

from app.errors import JobConflict
from app.jobs.model import (
    ACTIVE,
    CREATING,
    DELETING,
    FAILED,
    FINISHED,
    HIDDEN,
    ITEM_STATES,
    PENDING,
    Item,
    Job,
    check_fields,
)
from app.store.mongo import DUPLICATE_KEY, PROJECTION, failures

CHUNK = 10_000
"""Items per insert_many: well under the 16 MB message limit."""
DELETE_CHUNK = 5_000
"""Items removed per delete_many: each step stays far inside STORE_TIMEOUT_S."""
SWEEP_JOBS = 100
"""Jobs one sweep looks at; the next sweep takes the rest."""
JOB_PROJECTION = {"_id": 0, "journal": 0}
PENDING_INDEX = [("job_id", ASCENDING), ("state", ASCENDING), ("seq", ASCENDING)]
VISIBLE = {"$nin": list(HIDDEN)}

Document = dict[str, Any]


def due_webhooks(now: float) -> Document:
    """The jobs whose callback is due by `now`: what the partial index `webhook_due` holds."""
    return {"webhook": "pending", "webhook_next_at": {"$lte": now}}


class MongoJobStore:
    """Jobs in `{database}.jobs` (one document per job, as `Job.as_dict()`, plus its
    `journal`) and `{database}.job_items` (one per id). The client belongs to the user
    store: never closed here."""

    def __init__(
        self,
        client: AsyncMongoClient[Document],
        *,
        database: str,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        stale_after_s: float | None = None,
    ) -> None:
        self._jobs: AsyncCollection[Document] = client[database]["jobs"]
        self._items: AsyncCollection[Document] = client[database]["job_items"]
        self.timeout_s = timeout_s
        self.purge_s = timeout_s
        """How long one delete or sweep goes on removing ids; the next sweep goes on."""
        self._clock = clock
        self.stale_after_s = max(60.0, 12 * timeout_s) if stale_after_s is None else stale_after_s

    async def open(self) -> None:
        async with self._guard():
            await self._jobs.create_index([("job_id", ASCENDING)], unique=True)
            await self._jobs.create_index([("status", ASCENDING), ("job_id", ASCENDING)])
            # Only jobs whose callback waits are in it: the poll each second reads a few
            # keys, not every job ever run.
            await self._jobs.create_index(
                [("webhook_next_at", ASCENDING)],
                name="webhook_due",
                partialFilterExpression={"webhook": "pending"},
            )
            await self._jobs.create_index([("journal.at", ASCENDING)])
            await self._items.create_index([("job_id", ASCENDING), ("seq", ASCENDING)], unique=True)
            await self._items.create_index(PENDING_INDEX)

    async def close(self) -> None:
        """Nothing to release: the client is the user store's."""

    def _guard(self) -> AbstractAsyncContextManager[None]:
        return failures(self.timeout_s)

    def _entry(self, kind: str, **fields: Any) -> Document:
        return {"token": secrets.token_hex(8), "kind": kind, "at": self._clock(), **fields}

    async def create(self, job: Job, user_ids: Sequence[int]) -> None:
        entry = self._entry("create")
        hidden = job.as_dict() | {"status": CREATING, "journal": [entry]}
        async with self._guard():
            await self._jobs.insert_one(hidden)
            await self._insert_items(job.job_id, 0, user_ids)
            await self._jobs.update_one(
                {"job_id": job.job_id, "status": CREATING},
                {"$set": {"status": job.status, "journal": []}},
            )

    async def get(self, job_id: str) -> Job | None:
        async with self._guard():
            doc = await self._jobs.find_one({"job_id": job_id, "status": VISIBLE}, JOB_PROJECTION)
        return None if doc is None else Job(**doc)

    async def status(self, job_id: str) -> str | None:
        async with self._guard():
            doc = await self._jobs.find_one({"job_id": job_id}, {"_id": 0, "status": 1})
        return None if doc is None or doc["status"] in HIDDEN else str(doc["status"])

    async def list_jobs(self, *, status: str | None, limit: int, before: str | None) -> list[Job]:
        query: Document = {"status": VISIBLE if status is None else status}
        if before is not None:
            query["job_id"] = {"$lt": before}
        return await self._find(query, "job_id", DESCENDING, limit)

    async def active(self) -> list[Job]:
        query = {"status": {"$in": list(ACTIVE)}, "journal.kind": {"$ne": "retry"}}
        return await self._find(query, "job_id", ASCENDING, 0)

    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        only_if: Collection[str] = (),
        expect: Mapping[str, Any] | None = None,
    ) -> bool:
        check_fields({**changes, **(expect or {})})
        statuses = [s for s in only_if if s not in HIDDEN] if only_if else None
        query: Document = {"job_id": job_id}
        query["status"] = VISIBLE if statuses is None else {"$in": statuses}
        if expect:  # `$and`: an expected status must not replace the one above
            query = {"$and": [query, dict(expect)]}
        async with self._guard():
            if not changes:
                return await self._jobs.count_documents(query, limit=1) > 0
            result = await self._jobs.update_one(query, {"$set": dict(changes)})
        return result.matched_count > 0

    async def complete(self, job_id: str, changes: Mapping[str, Any]) -> bool:
        check_fields(changes)
        query: Document = {"job_id": job_id, "status": {"$in": list(ACTIVE)}}
        fields = {"_id": 0, "journal": 1, "materialised": 1, "total": 1}
        async with self._guard():
            doc = await self._jobs.find_one(query, fields)
        if doc is None or doc["materialised"] < doc["total"]:
            return False  # gone, stopped, or ids of its range not written yet
        if await self._settle_stale(job_id, doc.get("journal") or []):
            # An operation may still be counting (or a crashed one is not surely
            # abandoned yet): not done before its ids are counted.
            return False
        async with self._guard():
            if await self._items.find_one({"job_id": job_id, "state": PENDING}, {"_id": 1}):
                return False
            result = await self._jobs.update_one(query, {"$set": dict(changes)})
        return result.matched_count > 0

    async def materialise(self, job_id: str, first_seq: int, user_ids: Sequence[int]) -> None:
        active = {"job_id": job_id, "status": {"$in": list(ACTIVE)}}
        async with self._guard():
            if not await self._jobs.count_documents(active, limit=1):
                return  # stopped, deleted or gone: its ids would be left behind
            await self._insert_items(job_id, first_seq, user_ids)
            result = await self._jobs.update_one(
                {"job_id": job_id, "status": VISIBLE},
                {"$max": {"materialised": first_seq + len(user_ids)}},
            )
            if not result.matched_count:  # deleted meanwhile: take back what was added
                span = {"$gte": first_seq, "$lt": first_seq + len(user_ids)}
                await self._items.delete_many({"job_id": job_id, "seq": span})

    async def pending_items(self, job_id: str, *, after: int, limit: int) -> list[Item]:
        return await self.items(job_id, after=after, limit=limit, states=(PENDING,))

    async def record(
        self, job_id: str, items: Sequence[Item], *, upstream_calls: int, now: float
    ) -> None:
        seqs = [item.seq for item in items]
        entry = self._entry(
            "record", first=min(seqs, default=None), last=max(seqs, default=None)
        ) | {"calls": upstream_calls}
        # Failed items carry their own reasons: one update per (state, reason).
        groups: dict[tuple[int, str | None], list[int]] = defaultdict(list)
        for item in items:
            if item.state != PENDING:
                groups[(item.state, item.reason)].append(item.seq)
        moved: Counter[int] = Counter()
        async with self._guard():
            before = await self._jobs.find_one_and_update(
                {"job_id": job_id, "status": VISIBLE},
                {"$push": {"journal": entry}},
                projection={"_id": 0, "journal": 1},
            )
            if before is None:
                return  # deleted: nothing left to count
            for (state, reason), group in groups.items():
                result = await self._items.update_many(
                    {"job_id": job_id, "seq": {"$in": group}, "state": PENDING},
                    {"$set": {"state": state, "reason": reason, "rec": entry["token"]}},
                )
                moved[state] += result.modified_count
            await self._apply(job_id, entry, moved, {"updated_at": now})
        await self._settle_stale(job_id, before.get("journal") or [])

    async def items(
        self, job_id: str, *, after: int, limit: int, states: Collection[int]
    ) -> list[Item]:
        async with self._guard():
            docs = await self._item_cursor(job_id, after, limit, states).to_list(None)
        return [Item(d["seq"], d["user_id"], d["state"], d.get("reason")) for d in docs]

    def _item_cursor(
        self, job_id: str, after: int, limit: int, states: Collection[int]
    ) -> AsyncCursor[Document]:
        query = {"job_id": job_id, "seq": {"$gt": after}, "state": {"$in": list(states)}}
        cursor = self._items.find(query, PROJECTION).sort("seq", ASCENDING).limit(limit)
        # Straight to the pending ids, not through the finished ones before them.
        return cursor.hint(PENDING_INDEX) if list(states) == [PENDING] else cursor

    async def retry_failed(self, job_id: str, now: float) -> int:
        entry = self._entry("retry")
        reopen = {
            "status": "pending",
            "finished_at": None,
            "error": None,
            "updated_at": now,
            "webhook": None,
            "webhook_attempts": 0,
            "webhook_error": None,
            "webhook_next_at": None,
        }
        async with self._guard():
            # The job first, and only from a finished state: a second retry finds it
            # pending and changes nothing. Not while a record may still be counting: its
            # failed ids, moved back now, would lose their tags before they are counted.
            query = {"job_id": job_id, "status": {"$in": list(FINISHED)}}
            result = await self._jobs.update_one(
                {**query, "journal.0": {"$exists": False}},
                {"$set": reopen, "$push": {"journal": entry}},
            )
        if not result.matched_count:
            raise JobConflict(f"job {job_id} is not finished, or a chunk is still being counted")
        return await self._settle(job_id, entry)

    async def delete(self, job_id: str) -> bool:
        deadline = self._deadline()
        async with self._guard():
            before = await self._jobs.find_one_and_update(
                {"job_id": job_id, "status": {"$ne": CREATING}},
                {"$set": {"status": DELETING, "webhook": None, "webhook_next_at": None}},
                projection={"_id": 0, "status": 1},
            )
        if before is None:
            return False
        await self._purge(job_id, deadline)
        return bool(before["status"] != DELETING)

    async def count_by_status(self) -> dict[str, int]:
        # distinct + a count per status (both on the (status, job_id) index) rather than an
        # aggregate $group: mongomock_motor's aggregate() is not awaitable as PyMongo's is.
        async with self._guard():
            statuses = await self._jobs.distinct("status")
            counts = {s: await self._jobs.count_documents({"status": s}) for s in statuses}
        return {status: n for status, n in counts.items() if n and status not in HIDDEN}

    async def webhooks_due(self, now: float, limit: int) -> list[Job]:
        return await self._find(due_webhooks(now), "webhook_next_at", ASCENDING, limit)

    async def sweep(self) -> None:
        deadline = self._deadline()
        cutoff = self._clock() - self.stale_after_s
        query = {"$or": [{"journal.at": {"$lt": cutoff}}, {"status": DELETING}]}
        fields = {"_id": 0, "job_id": 1, "status": 1, "journal": 1}
        async with self._guard():
            docs = await self._jobs.find(query, fields).limit(SWEEP_JOBS).to_list(None)
        for doc in docs:
            if doc["status"] == DELETING:
                await self._purge(doc["job_id"], deadline)
            else:
                await self._settle_stale(doc["job_id"], doc.get("journal") or [])
            if asyncio.get_running_loop().time() >= deadline:
                return

    async def _settle_stale(self, job_id: str, journal: list[Document]) -> bool:
        """Settle the entries older than `stale_after_s`; True if fresher ones remain (an
        operation may still be under way)."""
        cutoff = self._clock() - self.stale_after_s
        for entry in journal:
            if entry["at"] < cutoff:
                await self._settle(job_id, entry)
        return any(entry["at"] >= cutoff for entry in journal)

    async def _settle(self, job_id: str, entry: Document) -> int:
        """Finish the operation `entry` began, from what its tagged items say; how many
        items it moved."""
        token = entry["token"]
        moved: Counter[int] = Counter()
        if entry["kind"] == "create":  # a submission cut short: nobody has its id
            async with self._guard():
                abandoned = await self._jobs.update_one(
                    {"job_id": job_id, "status": CREATING}, {"$set": {"status": DELETING}}
                )
            if abandoned.matched_count:
                await self._purge(job_id, self._deadline())
            return 0
        async with self._guard():
            if entry["kind"] == "retry":
                await self._items.update_many(
                    {"job_id": job_id, "state": FAILED},
                    {"$set": {"state": PENDING, "reason": None, "rec": token}},
                )
                query = {"job_id": job_id, "state": PENDING, "rec": token}
                back = await self._items.count_documents(query)
                await self._apply(job_id, entry, Counter({FAILED: -back}), {})
                return back
            if entry.get("first") is not None:
                span = {"$gte": entry["first"], "$lte": entry["last"]}
                query = {"job_id": job_id, "seq": span, "rec": token}
                docs = await self._items.find(query, {"_id": 0, "state": 1}).to_list(None)
                moved.update(doc["state"] for doc in docs if doc["state"] != PENDING)
            await self._apply(job_id, entry, moved, {})
        return moved.total()

    async def _apply(
        self, job_id: str, entry: Document, moved: Counter[int], changes: Document
    ) -> None:
        """Move the counters by `moved` (items per state) and pull `entry`, at once: an
        entry is applied once, however many try."""
        inc = {ITEM_STATES[state]: n for state, n in moved.items() if n}
        inc["done"] = moved.total()
        inc["upstream_calls"] = entry.get("calls", 0)
        update: Document = {"$inc": inc, "$pull": {"journal": {"token": entry["token"]}}}
        if changes:
            update["$set"] = changes
        await self._jobs.update_one({"job_id": job_id, "journal.token": entry["token"]}, update)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.purge_s

    async def _purge(self, job_id: str, deadline: float) -> None:
        """Remove a hidden job's items in bounded chunks, then the job; what is left at
        `deadline` (past at least one chunk) waits for the next sweep."""
        hidden = {"job_id": job_id, "status": {"$in": list(HIDDEN)}}
        while True:
            async with self._guard():
                cursor = self._items.find({"job_id": job_id}, {"_id": 0, "seq": 1})
                docs = await cursor.sort("seq", ASCENDING).limit(DELETE_CHUNK).to_list(None)
                if not docs:
                    await self._jobs.delete_one(hidden)
                    return
                last = docs[-1]["seq"]
                await self._items.delete_many({"job_id": job_id, "seq": {"$lte": last}})
            if asyncio.get_running_loop().time() >= deadline:
                return

    async def _find(self, query: Document, key: str, direction: int, limit: int) -> list[Job]:
        """Jobs matching `query` sorted on `key`; `limit` 0 means all."""
        async with self._guard():
            cursor = self._jobs.find(query, JOB_PROJECTION).sort(key, direction).limit(limit)
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
