"""What one process remembers: users (LRU), ids that do not exist, ids that keep failing.

Synchronous and free of I/O on purpose: the gateway reads and updates it in the stretches
that must not await, and its rules (newer copies win, a failure never hides a good
copy) are tested without an event loop.

A user read from the store enters a full memory only if it is asked for more than the
user it would evict (TinyLFU's admission, on the decaying counts refresh-ahead keeps):
otherwise it is answered and not held. Admitting every store hit made the long tail
(a scan, a crawl of old ids, uniform traffic over more users than fit) evict as many
users as it read, each put and eviction a third of the store path's own work, and
pushed the most asked users out for users asked once. A fetch's user is always held
(`learn`): the rule is for store hits only, and without counts (refresh-ahead off)
every store hit is admitted as before.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping, Sequence
from operator import itemgetter

from app.config import Settings
from app.domain import StoredUser, UserRecord
from app.gateway.cache import LRU, CachedUser, ExpiringMap, fetched_at, record_of
from app.gateway.popularity import Popularity
from app.gateway.results import NOT_FOUND, SHUTDOWN, Failure, Outcome, Source

Answers = dict[int, tuple[Source, Outcome]]
EVICTED_KEPT_S = 300.0
"""How long an eviction is remembered: longer than a batch takes from answer to save."""
_FETCHED = itemgetter(1)


class Memory:
    """Users by id (bounded, with freshness rules), and the two negative caches."""

    def __init__(self, settings: Settings) -> None:
        self.users: LRU[CachedUser] = LRU(settings.memory_cache_size)
        self.not_found: ExpiringMap[bool] = ExpiringMap(settings.negative_cache_size)
        self.failing: ExpiringMap[Failure] = ExpiringMap(settings.negative_cache_size)
        self.evicted: ExpiringMap[float] = ExpiringMap(settings.negative_cache_size)
        """Ids evicted lately, with when: a copy fetched before is not saved after."""
        self.ttl_s = settings.cache_ttl_s
        self.stale_if_error_s = settings.stale_if_error_s
        self.not_found_ttl_s = settings.not_found_ttl_s
        self.error_ttl_s = settings.error_ttl_s
        self.popularity: Popularity | None = None
        """The counts store hits are admitted by (see the module docstring); None: all are."""

    def __len__(self) -> int:
        return len(self.users)

    def fresh(
        self, user_ids: Sequence[int], now: float
    ) -> tuple[Sequence[CachedUser], list[int]] | None:
        """The users and the ids known not to exist, if memory answers every id freshly.

        None as soon as one id needs more (a miss, a stale copy). The users found are
        marked as just used.
        """
        users = self.users
        fresh_after = now - self.ttl_s
        if len(user_ids) > 1:
            # The common case, every id in the recent generation and fresh, in C: one
            # `itemgetter` call and one `min`, no bytecode per id. Under load each entry
            # read is a likely cache miss; a C loop overlaps them where bytecode cannot.
            try:
                found: tuple[CachedUser, ...] = itemgetter(*user_ids)(users.recent)
            except KeyError:
                pass  # one is elsewhere, or a miss: the loop below says which
            else:
                if min(map(_FETCHED, found)) > fresh_after:
                    return found, []
                return None
        get = users.recent.get
        entries: list[CachedUser] = []
        missing: list[int] = []
        for uid in user_ids:
            entry = get(uid)
            if entry is None:
                entry = users.get(uid)  # from the older generation, if there
                if entry is None:
                    if self.not_found.get(uid, now) is None:
                        return None
                    missing.append(uid)
                    continue
            if entry[1] > fresh_after:
                entries.append(entry)
            else:
                return None
        return entries, missing

    def answer(
        self,
        user_ids: Iterable[int],
        now: float,
        answers: Answers,
        previous: dict[int, UserRecord],
        stored: Mapping[int, StoredUser] | None = None,
    ) -> tuple[list[int], list[UserRecord]]:
        """Answer what memory can: fresh users, stale ones (to refresh), ids known missing.

        `stored` are users just read from the store: each is held (unless memory holds a
        newer copy) and answered as it is, its JSON already rendered. Returns the ids still
        to look up, and the stale users served, which need a refresh. A user too stale to
        serve is a miss whose record goes in `previous` (its refresh keeps `created_at`).
        """
        fresh_after = now - self.ttl_s
        servable_after = fresh_after - self.stale_if_error_s
        users = self.users
        # The common cases without a method call: held in the recent generation, or in
        # neither generation nor the not-found cache (the store path's ids).
        recent_get, older, not_found = users.recent.get, users.older, self.not_found
        stored_get = stored.get if stored else _NOTHING.get
        evicted = self.evicted.data
        admission = _Admission(users, self.popularity)
        pending: list[int] = []
        stale: list[UserRecord] = []
        for uid in user_ids:
            entry = recent_get(uid)
            if entry is None and uid in older:
                entry = users.get(uid)  # moved to the recent generation
                admission.bar = None  # it may have been the victim
            found = stored_get(uid)
            if (
                found is not None
                and (entry is None or entry[1] < found[1])
                and not (evicted and self.evicted_after(uid, found[1]))
            ):
                held = entry is not None
                entry = (found[0][:-1], found[1])  # from_store's, inline: once an id
                if held or admission.admits(uid):
                    users.put(uid, entry)
                    # A put may flip the generations (new dicts): read them again, or
                    # the ids after it are looked up in the old `recent`, now `older`,
                    # and found without being marked used.
                    recent_get, older = users.recent.get, users.older
            if entry is not None:
                fetched = entry[1]
                if fetched > fresh_after:
                    answers[uid] = ("cache", entry)
                    continue
                if fetched > servable_after:
                    answers[uid] = ("stale", entry)
                    stale.append(record_of(entry))
                    continue
                previous[uid] = record_of(entry)
            if uid in not_found.data and not_found.get(uid, now) is not None:
                answers[uid] = ("cache", NOT_FOUND)
                continue
            pending.append(uid)
        return pending, stale

    def learn(self, user_id: int, outcome: Outcome, now: float, *, hold: bool = True) -> Outcome:
        """Record a fetch's outcome; returns what to answer (a newer held copy wins).

        `hold=False` (a crawl job's fetch no client waits for) updates a user held already
        but adds none: a crawl of millions must not push the clients' users out of the LRU.
        """
        if not isinstance(outcome, Failure):
            held = self.users.get(user_id)
            if held is not None and fetched_at(held) > fetched_at(outcome):
                outcome = held
            if self.evicted_after(user_id, fetched_at(outcome)):
                return outcome  # answered, but a copy from before an eviction is not held
            if hold or held is not None:
                self.users.put(user_id, outcome)
            self.failing.pop(user_id)
            self.not_found.pop(user_id)
        elif outcome.reason == NOT_FOUND.reason:
            self.not_found.put(user_id, True, now + self.not_found_ttl_s)
            self.users.pop(user_id)
        elif outcome is not SHUTDOWN:
            self.failing.put(user_id, outcome, now + self.error_ttl_s)
        return outcome

    def learn_elsewhere(
        self, outcomes: Mapping[int, Outcome], skip: Container[int], now: float
    ) -> None:
        """Outcomes another process fetched, for ids not in `skip` (those waited for here):
        users and not-found update what is held, and add nothing (a crawl elsewhere must
        not fill this memory); failures are ignored (they hide nothing held here)."""
        for uid, outcome in outcomes.items():
            if uid in skip or (isinstance(outcome, Failure) and outcome != NOT_FOUND):
                continue
            if uid in self.users or self.not_found.get(uid, now) is not None:
                self.learn(uid, outcome, now, hold=False)

    def forget(self, user_id: int, now: float) -> bool:
        """Drop every trace of an id (evicted at `now`); True if there was one."""
        self.evicted.put(user_id, now, now + EVICTED_KEPT_S)
        held = self.users.pop(user_id) is not None
        return held | self.not_found.pop(user_id) | self.failing.pop(user_id)

    def evicted_after(self, user_id: int, fetched: float) -> bool:
        """Whether `user_id` was evicted after a copy fetched at `fetched` (a store read or
        a fetch that was under way when the eviction came): that copy must not be held."""
        evicted = self.evicted.data
        return bool(evicted) and evicted.get(user_id, (0, 0.0))[1] > fetched

    def unevicted(self, records: list[UserRecord]) -> list[UserRecord]:
        """`records` but those fetched before their id was evicted: the eviction asked
        for a copy fetched after it, so they are not saved."""
        gone = self.evicted_since_fetch(records)
        return [r for r in records if r not in gone] if gone else records

    def evicted_since_fetch(self, records: list[UserRecord]) -> list[UserRecord]:
        """`records` whose id was evicted after they were fetched (a save that was under
        way when the eviction arrived must be undone)."""
        return [r for r in records if self.evicted_after(r.user_id, r.fetched_at)]

    def expire_before(self, cutoff: float) -> int:
        """Drop users fetched before `cutoff`; how many were dropped. An infinite cutoff
        forgets everything, the negative caches too: after a gap in what this process
        heard (its subscription lost, a 'drop your memory'), an eviction of an id known
        not to exist may have been missed as well."""
        old = [uid for uid, entry in self.users.items() if fetched_at(entry) < cutoff]
        for uid in old:
            self.users.pop(uid)
        if math.isinf(cutoff):
            self.not_found.data.clear()
            self.failing.data.clear()
        return len(old)


_NOTHING: dict[int, StoredUser] = {}


class _Admission:
    """Whether store hits not held enter memory (one lookup's worth; see the module
    docstring): yes while there is room, else if asked for more than the user each would
    evict. The victim's count is looked up once and again only after an admission (which
    evicts it): a lookup's 50 store hits were 50 victim searches, a fifth of the store
    path's Python."""

    __slots__ = ("bar", "counts", "users")

    def __init__(self, users: LRU[CachedUser], popularity: Popularity | None) -> None:
        self.users = users
        self.counts = None if popularity is None else popularity.counts
        self.bar: int | None = None
        """The victim's count, while known."""

    def admits(self, user_id: int) -> bool:
        users, counts = self.users, self.counts
        # `len(users)` spelled out: LRU.__len__ is a Python call, once per store hit.
        if counts is None or len(users.recent) + len(users.older) < users.maxsize:
            return True
        bar = self.bar
        if bar is None:
            victim = users.victim()
            bar = counts.get(victim, 0) if victim is not None else 0
        if counts.get(user_id, 0) > bar:
            self.bar = None  # it is about to be evicted: the next victim is another
            return True
        self.bar = bar
        return False
