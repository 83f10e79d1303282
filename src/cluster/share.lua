-- tcplb: one instance's share of a [[client]] rule's group-wide limits,
-- taken atomically (a script runs alone in Redis).
--
-- KEYS[1]  the identity's token bucket: a hash {tokens, at} (at in ms,
--          Redis's clock); no key means a full bucket
-- KEYS[2]  the identity's connection counts: a hash of
--          instance -> "count expiry_ms"
-- ARGV[1]  rate, tokens per second        ARGV[2] burst
-- ARGV[3]  tokens wanted (0: none)        ARGV[4] this instance's name
-- ARGV[5]  its open connections           ARGV[6] the places it wants held
-- ARGV[7]  max_connections (0: no cap)    ARGV[8] count expiry, ms
--
-- Returns {tokens granted, ms until the next token when fewer were
-- granted than wanted (else 0), places held for this instance}.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local granted, wait = 0, 0
local want = tonumber(ARGV[3])
if want > 0 then
  local rate = tonumber(ARGV[1]) / 1000
  local burst = tonumber(ARGV[2])
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens, at = tonumber(bucket[1]), tonumber(bucket[2])
  if tokens == nil or at == nil then
    tokens, at = burst, now
  end
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate)
    at = now
  end
  granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
  if granted < want then
    wait = math.ceil((1 - tokens) / rate)
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
  -- Gone once full again, which is what no key means.
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1000)
end

local held = 0
local max = tonumber(ARGV[7])
if max > 0 then
  local me, active = ARGV[4], tonumber(ARGV[5])
  local desired, expiry = tonumber(ARGV[6]), tonumber(ARGV[8])
  local others = 0
  local counts = redis.call('HGETALL', KEYS[2])
  for i = 1, #counts, 2 do
    if counts[i] ~= me then
      local n, expires = string.match(counts[i + 1], '^(%d+) (%d+)$')
      if n and tonumber(expires) > now then
        others = others + tonumber(n)
      else
        -- An instance that stopped refreshing (crashed, or cut off).
        redis.call('HDEL', KEYS[2], counts[i])
      end
    end
  end
  -- Open connections always count; new places only within the cap.
  held = math.max(active, math.min(desired, max - others))
  if held > 0 then
    redis.call('HSET', KEYS[2], me, string.format('%d %d', held, now + expiry))
    if redis.call('PTTL', KEYS[2]) < expiry then
      redis.call('PEXPIRE', KEYS[2], expiry)
    end
  else
    redis.call('HDEL', KEYS[2], me)
  end
end

return {granted, wait, held}
