"""How often each id is asked for: a bounded, decaying count, kept off the hot path.

Not a count-min sketch, on purpose: in pure Python a sketch costs a few hashes and array
writes per id on every lookup, where counting may cost the hot path at most 3 %, and even
`Counter.update` (a loop in C) costs about two thirds of a memory hit's own work per id
(`python -m bench.popularity`). So the hot path only compares its request counter with
`sample_at` (the gateway inlines that) and, for a sampled lookup, appends its id list to
`seen`; the ids are counted later, off the hot path, when the refresh-ahead loop folds
them (or every `FOLD_AT` sampled lookups, so `seen` stays bounded):

- While fewer than `COUNT_IDS_PER_S` ids and `SAMPLE_LOOKUPS_PER_S` lookups a second come,
  every lookup is sampled and the counts are exact until a decay. Above, one lookup in
  `every` is, each of its ids counted `every` times: a popular id's estimate stays near
  its true count, and counting costs a bounded slice of a second whatever the load.
- Every `decay_s` (CACHE_TTL_S) every count is halved and zeros dropped, as TinyLFU's
  reset does: an id asked for k times per TTL holds between k and 2k.
- Past `max_ids` ids only the most asked are kept (at most `max_ids`), their counts
  untouched, the least asked dropped whole from 1 up: a
  long tail of ids asked once costs the least asked their place, never the popular their
  counts (halving them too, as a reset, let a stream of distinct ids, 20 000 a second at
  the defaults, halve every count each fold and empty the popular set in seconds).

`PopularityShare` is the seam that merges the counts of every process of a deployment
(`app.coordination.popularity_sync` over Redis); `LocalShare` is a single process's.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Protocol

FOLD_AT = 1024
"""Sampled lookups kept unfolded at most: past it the lookup that adds one folds them."""
COUNT_IDS_PER_S = 50_000
"""Ids counted a second at most (about 4 ms of a core); above it lookups are sampled."""
SAMPLE_LOOKUPS_PER_S = 5_000
"""Lookups sampled a second at most (each costs an append and a call, whatever its size)."""


class Popularity:
    """This process's counts of asked ids, halved every `decay_s` (see the module docstring)."""

    def __init__(
        self,
        *,
        min_hits: int,
        max_ids: int,
        decay_s: float,
        now: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_hits = min_hits
        self.max_ids = max_ids
        self.decay_s = decay_s
        self.counts: Counter[int] = Counter()
        self.seen: list[Sequence[int]] = []
        """Id lists of sampled lookups not counted yet (`fold` counts them)."""
        self.every = 1
        """One lookup in `every` is sampled (1 until the load passes COUNT_IDS_PER_S)."""
        self.popular: frozenset[int] = frozenset()
        """Ids asked for at least `min_hits` times (as of the last `rank`)."""
        self._clock = clock
        self._folded_at = clock()
        self._next_decay = now + decay_s

    def saw(self, user_ids: Sequence[int]) -> None:
        """Note a sampled lookup's ids (the gateway samples one lookup in `every`)."""
        seen = self.seen
        seen.append(user_ids)
        if len(seen) >= FOLD_AT:
            self.fold()

    def fold(self, now: float | None = None) -> None:
        """Count the lookups sampled since the last fold, each id `every` times; set the
        next `every` from the rate seen; halve if a decay is due at `now` (wall time)."""
        seen, self.seen = self.seen, []
        weight = self.every
        sample: Counter[int] = Counter(chain.from_iterable(seen))
        if weight == 1:
            self.counts.update(sample)
        else:
            counts = self.counts
            for uid, hits in sample.items():
                counts[uid] += hits * weight
        mono = self._clock()
        elapsed, self._folded_at = mono - self._folded_at, mono
        elapsed = max(elapsed, 1e-3)
        ids_per_s = sample.total() * weight / elapsed
        lookups_per_s = len(seen) * weight / elapsed
        self.every = max(
            1,
            math.ceil(ids_per_s / COUNT_IDS_PER_S),
            math.ceil(lookups_per_s / SAMPLE_LOOKUPS_PER_S),
        )
        if now is not None and now >= self._next_decay:
            # A gateway idle for several periods decays once per period it missed.
            periods = min(64, int((now - self._next_decay) // self.decay_s) + 1)
            self._next_decay += periods * self.decay_s
            self.halve(periods)
        if len(self.counts) > self.max_ids:
            self.trim()

    def trim(self) -> None:
        """Keep at most `max_ids` ids, the most asked, with their exact counts: the least
        asked counts are dropped whole (ties are not split), from 1 up. Sorting every id
        (`most_common`) stalled the event loop 160 ms a fold under a stream of distinct ids
        at the defaults; counting the counts is a pass in C and one filter."""
        counts = self.counts
        excess = len(counts) - self.max_ids
        levels = Counter(counts.values())
        cut = 0
        for level in sorted(levels):
            if excess <= 0:
                break
            excess -= levels[level]
            cut = level
        self.counts = Counter({u: c for u, c in counts.items() if c > cut})

    def rank(self) -> frozenset[int]:
        """The popular set: ids counted at least `min_hits` times (kept in `popular`)."""
        threshold = self.min_hits
        self.popular = frozenset(u for u, c in self.counts.items() if c >= threshold)
        return self.popular

    def halve(self, times: int = 1) -> None:
        """Every count shifted right `times` (halved, rounded down); zeros dropped."""
        self.counts = Counter({u: c >> times for u, c in self.counts.items() if c >> times})

    def estimate(self, user_id: int) -> int:
        """The id's count as of the last fold."""
        return self.counts.get(user_id, 0)

    def top(self, limit: int) -> dict[int, int]:
        """The `limit` most asked ids with their counts (what a process shares)."""
        return dict(self.counts.most_common(limit))


class PopularityShare(Protocol):
    """Merges the counts of every process of the deployment."""

    async def merge(self, mine: Mapping[int, int], *, min_hits: int) -> dict[int, int]:
        """Share this process's counts; the deployment's counts of at least `min_hits`."""


class LocalShare:
    """One process: its own counts are the deployment's."""

    async def merge(self, mine: Mapping[int, int], *, min_hits: int) -> dict[int, int]:
        return {u: c for u, c in mine.items() if c >= min_hits}
