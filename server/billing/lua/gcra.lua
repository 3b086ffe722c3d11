-- GCRA (generic cell rate algorithm) per API key: one stored number, the theoretical arrival
-- time (TAT) in microseconds of Redis TIME. A request of `cost` cells is allowed if, after it,
-- TAT is at most `burst` emission intervals ahead of now.
-- KEYS: gcra key
-- ARGV: interval_us (1 / rate), burst (cells), cost (cells)
-- Returns {allowed (1/0), retry_after_us}.
local interval = int(ARGV[1], 'interval_us')
local burst = int(ARGV[2], 'burst')
local cost = int(ARGV[3], 'cost')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) -- ~2^51: still exact in a double
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end
local new_tat = tat + cost * interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return { 0, fmt(allow_at - now) }
end
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', fmt(math.floor((new_tat - now) / 1000) + 1))
return { 1, 0 }
