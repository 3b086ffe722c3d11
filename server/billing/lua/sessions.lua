-- Concurrent sessions per tenant: a sorted set of session ids scored by expiry (ms, Redis TIME).
-- Expired members are removed first, so the sessions of a crashed node age out on their own.
-- 'acquire' admits a new session under `limit` (an id already present is refreshed: retries are
-- harmless); 'refresh' extends a live session unconditionally, because it was admitted already
-- and may only have aged out during a Redis blip.
-- KEYS: sessions
-- ARGV: op ('acquire' | 'refresh'), session_id, limit, ttl_ms
-- Returns {allowed (1/0), retry_after_ms}.
local op = ARGV[1]
local sid = ARGV[2]
local limit = int(ARGV[3], 'limit')
local ttl_ms = int(ARGV[4], 'ttl_ms')
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if op ~= 'refresh' and not redis.call('ZSCORE', KEYS[1], sid)
    and redis.call('ZCARD', KEYS[1]) >= limit then
  -- Earliest moment a slot can free up without a release: the first expiry.
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = 1000
  if first[2] then
    wait = tonumber(first[2]) - now
  end
  return { 0, fmt(wait) }
end
redis.call('ZADD', KEYS[1], fmt(now + ttl_ms), sid)
if redis.call('PTTL', KEYS[1]) < ttl_ms then
  redis.call('PEXPIRE', KEYS[1], fmt(ttl_ms))
end
return { 1, 0 }
