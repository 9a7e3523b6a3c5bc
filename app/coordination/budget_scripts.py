"""The shared budget's Lua scripts: each runs alone in Redis, on Redis' clock, in whole ms.

`RedisBudget` (app/coordination/redis_budget.py) calls them; the arithmetic is the same as
`app.gateway.windows.CallLog`'s, on sorted sets (score: a call's time in ms, member: its
ticket). Replies are integers only: Redis truncates a Lua number, so no float is sent back.
"""

# KEYS: paused, log, one log per lane (LANES order), epoch. ARGV: now rounded down and up
# in ms (-1: Redis' TIME, so the processes' clocks never matter; tests pass their own),
# spend (1/0), ticket, window count n, n x (span ms, limit), ask count, per ask: its lane's
# index (1-based) and n ceilings; then the epoch the caller last saw (0: none) and one to
# set if there is none. Returns integers only: {granted ask (0: none), now, pause left,
# n x used, n x ms until a miss may call, per ask its wait and what holds it (0 nothing,
# -1 the pause, i window i), per lane its calls in the longest window, the epoch}; or
# {-1, now, epoch} without looking at the log when the epoch is not the caller's: the log
# was lost (a restart with nothing on disk, a failover) and the callers must charge theirs.
BUDGET = """
local now, at = tonumber(ARGV[1]), tonumber(ARGV[2])
if now < 0 then
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  now = s * 1000 + math.floor(us / 1000)
  at = s * 1000 + math.ceil(us / 1000)
end
local epoch = redis.call('GET', KEYS[#KEYS])
if not epoch then
  epoch = ARGV[#ARGV]
  redis.call('SET', KEYS[#KEYS], epoch)
end
epoch = tonumber(epoch)
local seen = tonumber(ARGV[#ARGV - 1])
if seen ~= 0 and seen ~= epoch then return {-1, now, epoch} end
local spend, ticket, nwin = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local periods, limits, keep = {}, {}, 0
for i = 1, nwin do
  periods[i], limits[i] = tonumber(ARGV[4 + i * 2]), tonumber(ARGV[5 + i * 2])
  if periods[i] > keep then keep = periods[i] end
end
local expired = string.format('%d', now - keep)
for k = 2, #KEYS - 1 do redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', expired) end
local total = redis.call('ZCARD', KEYS[2])
local used = {}
local function count_windows()
  for i = 1, nwin do
    used[i] = redis.call('ZCOUNT', KEYS[2], string.format('(%d', now - periods[i]), '+inf')
  end
end
count_windows()
local paused = math.max(0, tonumber(redis.call('GET', KEYS[1]) or '0') - now)
local function window_wait(i, ceiling)
  if used[i] < ceiling then return 0 end
  if ceiling <= 0 then return periods[i] end
  local oldest = redis.call('ZRANGE', KEYS[2], total - ceiling, total - ceiling, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + periods[i] - now)
end
local pos = 7 + nwin * 2
local nask = tonumber(ARGV[pos - 1])
local granted, waits, holders = 0, {}, {}
for a = 1, nask do
  local lane = tonumber(ARGV[pos])
  local wait, holder = paused, 0
  if paused > 0 then holder = -1 end
  for i = 1, nwin do
    local w = window_wait(i, tonumber(ARGV[pos + i]))
    if w > wait then wait, holder = w, i end
  end
  pos = pos + 1 + nwin
  waits[a], holders[a] = wait, holder
  if wait == 0 and spend == 1 then
    granted = a
    for _, key in ipairs({KEYS[2], KEYS[2 + lane]}) do
      redis.call('ZADD', key, at, ticket)
      redis.call('PEXPIRE', key, keep + 1000)
    end
    total = total + 1
    count_windows()
    for b = a + 1, nask do waits[b], holders[b] = 0, 0 end
    break
  end
end
local reply = {granted, now, paused}
for i = 1, nwin do reply[#reply + 1] = used[i] end
for i = 1, nwin do reply[#reply + 1] = math.max(paused, window_wait(i, limits[i])) end
for a = 1, nask do reply[#reply + 1] = waits[a] end
for a = 1, nask do reply[#reply + 1] = holders[a] end
for k = 3, #KEYS - 1 do reply[#reply + 1] = redis.call('ZCARD', KEYS[k]) end
reply[#reply + 1] = epoch
return reply
"""
# KEYS: log, then the lane logs. ARGV: ticket. A granted call that was not made.
REFUND = """
for k = 1, #KEYS do redis.call('ZREM', KEYS[k], ARGV[1]) end
return 1
"""
# KEYS: log, then the lane logs. ARGV: ticket, now rounded up in ms (-1: Redis' TIME), its
# lane's index (1-based). The call is being sent: it moves to now if that is later (GT), or
# is logged again if it was granted so long ago that it left the log.
STAMP = """
local at = tonumber(ARGV[2])
if at < 0 then
  local t = redis.call('TIME')
  at = tonumber(t[1]) * 1000 + math.ceil(tonumber(t[2]) / 1000)
end
for _, key in ipairs({KEYS[1], KEYS[1 + tonumber(ARGV[3])]}) do
  redis.call('ZADD', key, 'GT', at, ARGV[1])
end
return at
"""
# KEYS: paused, log, lane logs. ARGV: keep ms, pause until (ms, 0: none), now in ms (-1:
# Redis' TIME), the count r of tickets to take out, r tickets, then triples of (time ms,
# lane index, ticket). The calls a process made while Redis was away (or all its calls
# of the longest window, after the log was lost) go in under their tickets, so charging
# twice changes nothing; the tickets taken out are its spends whose answer never came
# (Redis frozen): Redis ran them when it woke, for calls that were never made.
CHARGE = """
local keep, until_ms, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local gone = tonumber(ARGV[4])
for i = 5, 4 + gone do
  for k = 2, #KEYS do redis.call('ZREM', KEYS[k], ARGV[i]) end
end
for i = 5 + gone, #ARGV, 3 do
  for _, key in ipairs({KEYS[2], KEYS[2 + tonumber(ARGV[i + 1])]}) do
    redis.call('ZADD', key, ARGV[i], ARGV[i + 2])
    redis.call('PEXPIRE', key, keep + 1000)
  end
end
if until_ms > now and until_ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%d', until_ms), 'PX', until_ms - now + 1000)
end
return 1
"""
# KEYS: pause. ARGV: ms, now in ms (-1: the server's). Nobody calls before now + ms; a
# later pause wins.
PAUSE = """
local now = tonumber(ARGV[2])
if now < 0 then local t = redis.call('TIME') now = t[1] * 1000 + math.floor(t[2] / 1000) end
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%d', until_ms), 'PX', tonumber(ARGV[1]) + 1000)
end
return until_ms
"""
