-- RESERVE: grant a lease of min(want, spendable + overdraft), refusing below `min`.
-- Idempotent by lease id: an existing lease is returned unchanged.
-- KEYS: wallet, lease, leases, settled
-- ARGV: lease_id, min, want, ttl_ms, session_id, model, unit
-- Returns {status, granted, remaining, spendable, epoch}; status is 'ok', 'insufficient',
-- 'nowallet' (caller seeds from Postgres and retries) or 'settled' (lease id already used).
local lease_id = ARGV[1]
local min = int(ARGV[2], 'min')
local want = int(ARGV[3], 'want')
local ttl_ms = int(ARGV[4], 'ttl_ms')

if redis.call('EXISTS', KEYS[4]) == 1 then
  return { 'settled', 0, 0, 0, '' }
end
local wallet = load_wallet(KEYS[1])
local lease = load_lease(KEYS[2])
if lease ~= nil then
  if not lease_is_stale(wallet, lease) then
    return { 'ok', lease.granted, lease.granted - lease.charged, wallet.spendable, wallet.epoch }
  end
  drop_lease(KEYS[2], KEYS[3], lease_id)
end
if wallet == nil then
  return { 'nowallet', 0, 0, 0, '' }
end

local g = math.min(want, wallet.spendable + wallet.overdraft)
if g < min then
  return { 'insufficient', 0, 0, wallet.spendable, wallet.epoch }
end
local spendable = redis.call('HINCRBY', KEYS[1], 'spendable', fmt(-g))
redis.call('HSET', KEYS[2], 'granted', fmt(g), 'charged', '0', 'units', '0', 'seq', '0',
  'session_id', ARGV[5], 'model', ARGV[6], 'unit', ARGV[7], 'ttl_ms', fmt(ttl_ms),
  'epoch', wallet.epoch)
redis.call('ZADD', KEYS[3], fmt(now_ms() + ttl_ms), lease_id)
return { 'ok', g, g, spendable, wallet.epoch }
