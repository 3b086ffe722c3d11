-- Audio milliseconds per window per tenant, sliding-window estimate from two fixed buckets: the
-- previous window's total weighted by how much of it still overlaps the sliding window, plus the
-- current window's total. One hash, so the key is known before Redis TIME is read.
-- KEYS: audio hash (fields w = window index, cur, prev)
-- ARGV: audio_ms, limit_ms (per window), window_ms
-- Returns {allowed (1/0), retry_after_ms, estimate_ms (including this audio if allowed)}.
local audio = int(ARGV[1], 'audio_ms')
local limit = int(ARGV[2], 'limit_ms')
local window = int(ARGV[3], 'window_ms')
local now = now_ms()
local w = math.floor(now / window)
local elapsed = now - w * window
local h = redis.call('HMGET', KEYS[1], 'w', 'cur', 'prev')
local cur, prev = 0, 0
if h[1] then
  local w0 = tonumber(h[1])
  if w0 == w then
    cur, prev = tonumber(h[2]), tonumber(h[3])
  elseif w0 == w - 1 then
    prev = tonumber(h[2])
  end
end
local est = math.floor(prev * (window - elapsed) / window) + cur
if est + audio > limit then
  local room = limit - cur - audio
  local wait
  if room >= 0 and prev > 0 then
    -- later in this window, once less of the previous window overlaps
    wait = math.ceil(window * (prev - room) / prev) - elapsed
  elseif cur > 0 and limit - audio >= 0 then
    -- in the next window, once enough of this one has slid out
    wait = window - elapsed + math.max(0, math.ceil(window * (cur - (limit - audio)) / cur))
  else
    wait = 2 * window - elapsed
  end
  return { 0, fmt(math.max(1, wait)), fmt(est) }
end
redis.call('HSET', KEYS[1], 'w', fmt(w), 'cur', fmt(cur + audio), 'prev', fmt(prev))
redis.call('PEXPIRE', KEYS[1], fmt(2 * window))
return { 1, 0, fmt(est + audio) }
