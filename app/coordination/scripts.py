"""The coordinator's keys, and its Lua scripts: loaded once, then sent by SHA (EVALSHA).

redis-py's `Script` objects, run in a pipeline, send `SCRIPT EXISTS` before every
pipeline: one more round trip per claim and per announcement, unseen by a round-trip
counter. Here each script is loaded once (`SCRIPT LOAD`, when the coordinator opens and
again after a `NOSCRIPT` answer, as after a Redis restart) and pipelines carry bare
EVALSHAs, so what the counter says is what goes over the wire.

Every script touches the keys of one id only (a lease and a `done` key share the id's
hash tag), so a Redis Cluster could spread them. Times are Unix seconds as decimal
strings (Lua compares them as doubles; nothing is returned as a fraction, which Redis
would truncate to an integer). A `done` value is "<time>|<json>"; its JSON is a user
object, "nf" (not found), [reason, detail] (a failure) or "ev" (evicted at <time>).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline


@dataclass(frozen=True, slots=True)
class Keys:
    """The names of a deployment's keys (every one under REDIS_PREFIX)."""

    prefix: str

    def lease(self, uid: int) -> str:
        return f"{self.prefix}:{{{uid}}}:lease"

    def done(self, uid: int) -> str:
        return f"{self.prefix}:{{{uid}}}:done"

    def lease_named(self, name: str) -> str:
        """A lease on some work that belongs to one process at a time (a job's callback)."""
        return f"{self.prefix}:lease:{name}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:events"

    @property
    def procs(self) -> str:
        return f"{self.prefix}:procs"

    @property
    def leader(self) -> str:
        return f"{self.prefix}:leader"


# KEYS: lease, done. ARGV: token, lease ms, this process's token prefix.
# {1}: the id is ours to fetch (a lease of an earlier claim of ours is taken over, so a
# claim whose answer was lost does not make us wait for ourselves); {2, done}: its outcome
# is known (an eviction's mark is no outcome); {0, pttl}: another process fetches it.
CLAIM = """
local done = redis.call('GET', KEYS[2])
if done and string.sub(done, -5) ~= '|"ev"' then return {2, done} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
local owner = redis.call('GET', KEYS[1])
if owner and string.sub(owner, 1, string.len(ARGV[3])) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS: lease, done. ARGV: token, done value, its time, done ms, "f" for a failure.
# Keeps the outcome unless a newer one (or a later eviction) is there: a late owner
# loses. A failure never hides an answer (a user or not-found). Releases our lease
# either way. Returns 1 when the outcome was kept (it may be published), 2 when an
# eviction after it refused it (the owner must not keep what it saved), else 0.
ANNOUNCE = """
local current = redis.call('GET', KEYS[2])
local keep = 1
if current then
  local sep = string.find(current, '|', 1, true)
  local body = string.sub(current, sep + 1)
  if tonumber(string.sub(current, 1, sep - 1)) > tonumber(ARGV[3]) then
    keep = 0
    if body == '"ev"' then keep = 2 end
  elseif ARGV[5] == 'f' and (string.sub(body, 1, 1) == '{' or body == '"nf"') then
    keep = 0
  end
end
if keep == 1 then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return keep
"""

# KEYS: done. ARGV: the eviction's mark, its time, done ms. Outcomes learnt before the
# eviction are no longer handed to claims (a newer outcome already there stays).
EVICT = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  if tonumber(string.sub(current, 1, sep - 1)) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""

# KEYS: a lease. ARGV: token, ms. Renews it only while we hold it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: a lease. ARGV: token. Deletes it only while we hold it (never a blind DEL).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: a lease. ARGV: token, ms. Takes it when free, renews it when ours. 1 if ours.
HOLD = """
local owner = redis.call('GET', KEYS[1])
if not owner then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if owner == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""

ALL = (CLAIM, ANNOUNCE, EVICT, RENEW, RELEASE, HOLD)
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in ALL}


async def load(redis: Redis) -> None:
    """Load every script (one pipeline): their SHAs are known in advance."""
    async with redis.pipeline(transaction=False) as pipe:
        for script in ALL:
            pipe.script_load(script)
        await pipe.execute()


def call(pipe: Pipeline, script: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue one run of a loaded `script` on `pipe`."""
    pipe.evalsha(_SHA[script], len(keys), *keys, *args)
