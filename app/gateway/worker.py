"""The fetch worker: takes each batch the planner paid for, claims it across processes,
calls Freelancer, completes it in one synchronous step, announces it, then saves it.

The other half of the one-fetch-per-id guarantee is `Gateway.complete`, which this calls
(read it beside `Gateway._join_or_register`). The worker is supervised: if it ever dies,
what it held is failed, it restarts, and health says degraded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from app.domain import UserRecord
from app.errors import UpstreamError
from app.gateway.planner import Turn
from app.gateway.resilient import Slot
from app.gateway.results import INTERNAL, SHUTDOWN, Failure, Outcome, batch_outcomes
from app.logs import request_id
from app.upstream.base import UpstreamBatch

if TYPE_CHECKING:
    from app.gateway.gateway import Gateway

log = logging.getLogger("app.gateway")


class FetchWorker:
    """Runs up to UPSTREAM_CONCURRENCY batches at once, each a call the planner paid for."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.slots = asyncio.Semaphore(gateway.settings.upstream_concurrency)
        self.batches: set[asyncio.Task[None]] = set()
        """Batches being fetched, announced or saved."""
        self.restarted_at: float | None = None
        """When the worker last died and was restarted (health shows it for a while)."""
        self.calling = 0
        """Batches granted a call that have not given their slot back yet (refresh-ahead
        leaves a slot free for a client beside them)."""
        self._in_hand: list[int] = []
        self._batch_no = 0

    async def supervise(self) -> None:
        """Run the worker; if it ever dies, fail what it held, restart it and say degraded."""
        gateway = self.gateway
        while not gateway.closing:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetch worker crashed; restarting it")
            gateway.stats.worker_restarts += 1
            self.restarted_at = gateway.clock()
            gateway.complete(self._in_hand, {}, INTERNAL)
            self._in_hand.clear()
            await asyncio.sleep(0.1)

    async def _work(self) -> None:
        while True:
            await self.gateway.writes.room()  # the store keeps up, or is down
            await self.slots.acquire()
            batch = self._in_hand = []
            self._batch_no += 1
            try:
                # Budget first: no id is claimed (no lease held) while a call waits for it.
                turn = await self.gateway.planner.next_batch(batch, self._take)
            except BaseException:
                self.slots.release()
                raise
            self.calling += 1  # until its slot is given back (`_run_batch`)
            task = asyncio.create_task(self._run_batch(batch, turn), name="fetch-batch")
            self.batches.add(task)
            task.add_done_callback(self.batches.discard)
            self._in_hand = []

    def _take(self, uid: int) -> bool:
        """Whether a queued id still needs fetching (not answered meanwhile, not taken)."""
        inflight = self.gateway.inflight
        fetch = inflight.get(uid)
        if fetch is None or fetch.taken:
            return False
        if fetch.leader_only and not fetch.waiters and not self.gateway.coordinator.leads():
            # Queued while this process led (a background refresh may wait a minute to
            # fill): the lead moved, and the new leader does that duty now. Fetched here
            # too it cost a second call, which the claim cannot stop when this process's
            # link to Redis is down, the usual reason it lost the lead. Its copy is
            # still served; a job that joined it tries again, as after a shutdown.
            del inflight[uid]
            fetch.future.set_result(SHUTDOWN)
            return False
        fetch.taken = self._batch_no
        return True

    async def _run_batch(self, ids: list[int], turn: Turn) -> None:
        """Claim, call, complete (one synchronous step), announce, then save."""
        gateway = self.gateway
        inflight = gateway.inflight
        claimed = ids
        batch: UpstreamBatch | None = None
        outcomes: dict[int, Outcome] = {}
        default = INTERNAL
        records: list[UserRecord] = []
        gone: list[int] = []
        slot = Slot(self.slots)
        # Its log lines name the requests it serves (the first few, where cheap).
        waiting = {f.request_id for u in ids[:20] if (f := inflight.get(u)) and f.request_id}
        request_id.set(",".join(sorted(waiting)) or None)
        try:
            try:
                claimed = await gateway.coordinator.claim(ids)
                fetches = [f for u in claimed if (f := inflight.get(u))]
                gateway.stats.batches += bool(fetches)
                gateway.stats.job_batches += bool(fetches) and all(f.background for f in fetches)
                ahead = sum(f.ahead for f in fetches)
                gateway.stats.refresh_ahead_calls += ahead > 0
                gateway.stats.refresh_ahead_ids += ahead
                batch = await gateway.upstream.fetch_users(claimed, turn.lane, turn.ticket, slot)
            finally:
                slot.release()
                self.calling -= 1
            if batch is not None:
                previous = {u: f.previous for u in claimed if (f := inflight.get(u))}
                outcomes, records, gone = batch_outcomes(claimed, batch.users, previous)
                gateway.stats.upstream_users_fetched += len(records)
        except UpstreamError as exc:
            outcomes = dict.fromkeys(claimed, Failure(exc.reason, exc.message))
            log.warning("batch of %d ids failed: %s", len(claimed), exc.message)
        except asyncio.CancelledError:
            default = SHUTDOWN
            raise
        except Exception:
            log.exception("batch of %d ids failed unexpectedly", len(claimed))
        finally:
            gateway.complete(claimed, outcomes, default)
        try:  # announced before it is saved: a slow or failing store holds no one up
            await gateway.coordinator.announce({u: outcomes.get(u, default) for u in claimed})
            if records or gateway.writes.pending:
                await gateway.writes.save(gateway.memory.unevicted(records))
            for uid in gone:
                await gateway.writes.delete(uid)
            for record in gateway.memory.evicted_since_fetch(records):
                await gateway.writes.undo(record)
        except Exception:
            log.exception("announcing or saving a batch of %d ids failed", len(claimed))
