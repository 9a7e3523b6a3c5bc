"""The planner: which lane spends the next upstream call, and how the background lanes pace.

The windows are caps (`app.gateway.budget`); how fast each lane spends under them is
this module's policy:

- **misses** (a client waits) may fill every window to its limit, at once.
- **jobs** (crawls) leave `UPSTREAM_RESERVE_PER_MIN` / `UPSTREAM_RESERVE_PER_HOUR` of
  each window to clients, and pace themselves to the sustained rate that leaves (the
  tightest of `(limit - reserve) / (period + margin)`; 800 an hour at the defaults), with
  at most `UPSTREAM_BURST` calls back to back: a crawl spreads over the hour instead of
  spending it in its first minutes.
- **refreshes** (stale hits, revalidation, the sweep) keep the same reserve and share the
  jobs' pace, and only get what misses and jobs leave: they ask last.
- **owed jobs**: while clients' misses wait and jobs had less than `JOB_SHARE` of the calls
  of the longest window (the whole deployment's, from the log), a waiting job asks first,
  unpaced, and may use the reserve, until it has its share again.

The gateway's worker calls `next()` BEFORE it gathers and claims a batch: the batch is
then made of the lane that may call at that moment, and no claim is held through a wait.
`waiting()` says which lane waits, for what, and how long (`GET /` shows it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from app.config import Settings
from app.gateway.batching import PRIORITY_REFRESH, PRIORITY_SWEEP, BatchQueue, loop_clock
from app.gateway.budget import JOBS, MISSES, REFRESHES, Ask, Budget, floor_ms

PACED = frozenset({JOBS, REFRESHES})
REFRESH_PATIENCE_S = 60.0
"""The longest a refresh waits for its call to fill once the pace binds (and at most a
twentieth of CACHE_TTL_S, half of STALE_IF_ERROR_S)."""
SCARCE_INTERVAL_S = 1.0
"""A background pace this slow (fewer than one call a second: 800 an hour at the defaults)
makes the refresh lane fill its calls before it spends them."""
READ_EVERY_S = 2.0
"""How often the budget is read while idle (`GET /` shows it without a round trip)."""
MAX_SLEEP_S = 60.0
"""The longest the planner sleeps before it looks again (the shared log may have moved)."""


@dataclass(frozen=True, slots=True)
class LaneWait:
    """A lane with work queued that is not calling now, and why."""

    lane: str
    waits_for: str
    """"pace", a window's name ("minute", "hour": its limit, or its reserve for a background
    lane), "pause" (a 429), or "behind <lane>" (another lane took the call)."""
    in_s: float


@dataclass(frozen=True, slots=True)
class Turn:
    """A call spent for a lane: the worker gathers that lane's ids first."""

    lane: str
    ticket: str


class Pacer:
    """GCRA in integers: `calls` per `period_ms` sustained, `burst` of them back to back.

    Times are scaled by `calls` (an emission interval of period_ms / calls ms becomes
    period_ms), so no rate is ever a float.
    """

    def __init__(self, calls: int, period_ms: int, burst: int) -> None:
        self.calls = max(1, calls)
        self.period_ms = period_ms
        self.tolerance = (max(1, burst) - 1) * period_ms
        self.tat = 0

    def wait_ms(self, now_ms: int) -> int:
        excess = self.tat - self.tolerance - now_ms * self.calls
        return 0 if excess <= 0 else -(-excess // self.calls)

    def credit(self, now_ms: int) -> int:
        """Calls it would allow back to back now."""
        room = self.tolerance + now_ms * self.calls - self.tat
        return 0 if room < 0 else room // self.period_ms + 1

    def spend(self, now_ms: int) -> None:
        self.tat = max(self.tat, now_ms * self.calls) + self.period_ms

    @property
    def interval_s(self) -> float:
        return self.period_ms / self.calls / 1000


class Planner:
    """Decides, for one process, which lane spends the next call (see the module docstring)."""

    def __init__(
        self,
        budget: Budget,
        queue: BatchQueue,
        settings: Settings,
        *,
        clock: Callable[[], float] = loop_clock,
    ) -> None:
        self.budget = budget
        self.queue = queue
        self._clock = clock
        self.batch_size = settings.batch_size
        self.window_s = settings.batch_window_ms / 1000
        reserves = {
            "minute": settings.upstream_reserve_per_min,
            "hour": settings.upstream_reserve_per_hour,
        }
        windows = budget.limits
        self.reserve = tuple(min(reserves.get(w.name, 0), w.limit - 1) for w in windows)
        self.share_ppm = round(settings.job_share * 1_000_000)
        # The tightest sustained rate the reserve leaves: min over windows of left / period.
        left, period = min(
            ((w.limit - r, w.span_ms) for w, r in zip(windows, self.reserve, strict=True)),
            key=lambda pair: pair[0] / pair[1],
        )
        self.pacer = Pacer(left, period, settings.upstream_burst)
        self.patience_s = min(
            REFRESH_PATIENCE_S, settings.cache_ttl_s / 20, settings.stale_if_error_s / 2
        )
        self._waiting: dict[str, LaneWait] = {}
        self._waiting_at = 0.0

    def ask(self, lane: str, *, owed: bool = False) -> Ask:
        """The lane's claim on the windows: misses (and an owed job) none held back."""
        return Ask(lane) if lane == MISSES or owed else Ask(lane, self.reserve)

    def owed(self) -> bool:
        """True while jobs had less than JOB_SHARE of the longest window's calls."""
        calls = self.budget.lane_calls()
        return calls[JOBS] * 1_000_000 < self.share_ppm * sum(calls.values())

    async def next(self) -> Turn:
        """Wait until a lane with queued ids may call, spend that call, and return it."""
        while True:
            self.queue.changed.clear()
            lanes = self.queue.lanes_waiting()
            if not lanes:
                self._note({})
                await self.queue.changed.wait()
                continue
            now_ms = floor_ms(self._clock())
            asks, paced, held = self._asks(lanes, now_ms)
            if asks:
                grant = await self.budget.try_spend(asks)
                if grant.lane is not None and grant.ticket is not None:
                    if paced[[a.lane for a in asks].index(grant.lane)]:
                        self.pacer.spend(now_ms)
                    later = {
                        lane: LaneWait(lane, f"behind {grant.lane}", 0.0)
                        for lane in lanes
                        if lane != grant.lane
                    }
                    self._note({**later, **{k: v for k, v in held.items() if k != grant.lane}})
                    return Turn(grant.lane, grant.ticket)
                for ask, wait, by in zip(asks, grant.waits_s, grant.held_by, strict=True):
                    previous = held.get(ask.lane)
                    if previous is None or wait > previous.in_s:
                        held[ask.lane] = LaneWait(ask.lane, by or "budget", wait)
            self._note(held)
            sleep = min((w.in_s for w in held.values()), default=MAX_SLEEP_S)
            try:
                async with asyncio.timeout(min(max(sleep, 0.001), MAX_SLEEP_S)):
                    await self.queue.changed.wait()
            except TimeoutError:
                pass

    async def next_batch(self, batch: list[int], accept: Callable[[int], bool]) -> Turn:
        """Spend the next call (`next`), then gather its batch: the lane's ids first, then
        the others'. A call whose ids were all answered meanwhile is given back."""
        while True:
            turn = await self.next()
            try:
                await self.queue.gather(batch, turn.lane, self.batch_size, self.window_s, accept)
            finally:
                if not batch:
                    await self.budget.refund(turn.ticket)
            if batch:
                return turn

    async def keep_reading(self) -> None:
        """Keep the budget's numbers current while idle (a shared log moves by itself)."""
        while True:
            await asyncio.sleep(READ_EVERY_S)
            await self.budget.refresh()

    async def acquire(self, lane: str) -> str:
        """Wait until `lane` may call (a retry of its batch), spend it; return the ticket."""
        ask = self.ask(lane)
        while True:
            grant = await self.budget.try_spend([ask])
            if grant.ticket is not None:
                if lane in PACED:  # a retry is part of its batch, but counts in the pace
                    self.pacer.spend(floor_ms(self._clock()))
                return grant.ticket
            await asyncio.sleep(min(max(grant.waits_s[0], 0.001), MAX_SLEEP_S))

    def waiting(self) -> list[LaneWait]:
        """Lanes with ids queued that are not calling, why, and for how long (as of now)."""
        elapsed = self._clock() - self._waiting_at
        return [
            LaneWait(w.lane, w.waits_for, round(max(0.0, w.in_s - elapsed), 3))
            for w in self._waiting.values()
        ]

    def spare_calls(self) -> int:
        """Calls the refresh lane could make now without waiting, from the windows as last
        read: what each window leaves above the reserve, within the pace; none while a
        client's miss or a job's ids wait (refresh-ahead spends only this)."""
        if self.queue.lanes_waiting() & {MISSES, JOBS}:
            return 0
        room = min(
            (
                max(0, w.limit - r - w.used)
                for w, r in zip(self.budget.windows(), self.reserve, strict=True)
            ),
            default=0,
        )
        return min(room, self.pacer.credit(floor_ms(self._clock())))

    def job_eta_s(self, calls: int) -> float:
        """Seconds until `calls` job calls have gone out at the jobs' rules, from the windows
        as last read: the calls they may make now, then one per pace interval."""
        if calls <= 0:
            return 0.0
        now_ms = floor_ms(self._clock())
        room = min(
            (
                max(0, w.limit - r - w.used)
                for w, r in zip(self.budget.windows(), self.reserve, strict=True)
            ),
            default=calls,
        )
        now = min(room, self.pacer.credit(now_ms))
        if now >= calls:
            return 0.0
        first = 0.0
        if now == 0:
            held = next((w for w in self.waiting() if w.lane == JOBS), None)
            first = max(self.pacer.wait_ms(now_ms) / 1000, held.in_s if held else 0.0)
        return round(first + (calls - max(now, 1)) * self.pacer.interval_s, 1)

    # ---- plumbing ---------------------------------------------------------------------

    def _asks(
        self, lanes: Collection[str], now_ms: int
    ) -> tuple[list[Ask], list[bool], dict[str, LaneWait]]:
        """The asks in the order the lanes go, whether each is paced, and the lanes the pace
        holds back (they are not asked)."""
        asks: list[Ask] = []
        paced: list[bool] = []
        held: dict[str, LaneWait] = {}
        owed = JOBS in lanes and MISSES in lanes and self.owed()
        order: Sequence[str] = (JOBS, MISSES, REFRESHES) if owed else (MISSES, JOBS, REFRESHES)
        pace_wait = self.pacer.wait_ms(now_ms)
        for lane in order:
            if lane not in lanes:
                continue
            if lane == JOBS and owed:
                asks.append(self.ask(JOBS, owed=True))
                paced.append(False)
            elif lane in PACED and pace_wait > 0:
                held[lane] = LaneWait(lane, "pace", pace_wait / 1000)
            elif lane == REFRESHES and (filling := self._filling_s(now_ms)) > 0:
                held[lane] = LaneWait(lane, "filling", filling)
            else:
                asks.append(self.ask(lane))
                paced.append(lane in PACED)
        return asks, paced, held

    def _filling_s(self, now_ms: int) -> float:
        """How long the refresh lane still waits for its call to fill: 0 with a full batch
        queued, or when background calls are plentiful (a pace under SCARCE_INTERVAL_S);
        else until its oldest id has waited `patience_s`. On a scarce budget, refreshes sent
        as they come (a few ids a call, one call a pace step) spent the whole background
        hour on near-empty calls and left nothing for refresh-ahead (`python -m
        bench.refresh_ahead`); the stale copies are served meanwhile."""
        queued = self.queue.qsize(PRIORITY_REFRESH) + self.queue.qsize(PRIORITY_SWEEP)
        if queued >= self.batch_size or self.pacer.interval_s < SCARCE_INTERVAL_S:
            return 0.0
        since = self.queue.oldest((PRIORITY_REFRESH, PRIORITY_SWEEP))
        return 0.0 if since is None else max(0.0, since + self.patience_s - now_ms / 1000)

    def _note(self, waiting: dict[str, LaneWait]) -> None:
        self._waiting = waiting
        self._waiting_at = self._clock()
