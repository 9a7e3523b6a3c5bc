"""The popularity count against a reference `Counter`: exact until a decay, halving halves,
bounded, and sampled counts stay near the truth."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from app.gateway.popularity import Popularity

lookups = st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=5), max_size=60)


def fresh(max_ids: int = 1000) -> Popularity:
    return Popularity(min_hits=3, max_ids=max_ids, decay_s=100.0, now=0.0, clock=lambda: 0.0)


@given(lookups, lookups)
def test_counts_are_exact_until_a_decay_and_a_decay_halves(
    before: list[list[int]], after: list[list[int]]
) -> None:
    popularity = fresh()
    reference: Counter[int] = Counter()
    for ids in before:
        popularity.saw(ids)
        reference.update(ids)
    popularity.fold(now=50.0)  # no decay due yet
    assert popularity.counts == reference
    assert popularity.rank() == {u for u, c in reference.items() if c >= 3}
    popularity.fold(now=100.0)  # one period: every count halved, zeros dropped
    halved = Counter({u: c // 2 for u, c in reference.items() if c // 2})
    assert popularity.counts == halved
    for ids in after:
        popularity.saw(ids)
        halved.update(ids)
    popularity.fold(now=150.0)
    assert popularity.counts == halved


@given(lookups)
def test_never_more_than_max_ids_and_the_most_asked_are_kept(seen: list[list[int]]) -> None:
    popularity = fresh(max_ids=5)
    reference: Counter[int] = Counter()
    for ids in seen:
        popularity.saw(ids)
        reference.update(ids)
    popularity.fold()
    assert len(popularity.counts) <= 5
    if popularity.counts:
        kept = min(reference[u] for u in popularity.counts)
        dropped = [reference[u] for u in reference if u not in popularity.counts]
        assert all(c <= kept for c in dropped), "an id is dropped only below every kept one"


def test_under_load_lookups_are_sampled_and_weighted() -> None:
    now = [0.0]
    popularity = Popularity(min_hits=3, max_ids=1000, decay_s=1e9, now=0.0, clock=lambda: now[0])
    for _ in range(1000):  # 1 000 lookups of 10 ids in 0.1 s: 100 000 ids a second
        popularity.saw(list(range(10)))
    now[0] = 0.1
    popularity.fold()
    assert popularity.counts[0] == 1000, "exact so far"
    assert popularity.every == 2, "above COUNT_IDS_PER_S one lookup in `every` is sampled"
    for _ in range(100):  # the gateway samples 100 of the next 200 lookups
        popularity.saw(list(range(10)))
    now[0] = 0.2
    popularity.fold()
    assert popularity.counts[0] == 1000 + 100 * 2, "each sampled id counts `every` times"
