-- REPORT: apply cumulative usage to a lease, top it up under the low-water mark, append the
-- usage event and refresh the expiry. Idempotent by seq: seq <= lease.seq is a no-op.
-- KEYS: wallet, lease, leases, settled, usage
-- ARGV: lease_id, seq, cum_units, cum_cost, topup_want, low_water, ttl_ms
-- Returns {status, remaining, spendable, granted, topped_up}; status is 'ok', 'duplicate',
-- 'unknown' (Redis lost the lease: reserve again and replay) or 'settled' (tombstoned).
local lease_id = ARGV[1]
local seq = int(ARGV[2], 'seq')
local cum_units = int(ARGV[3], 'cum_units')
local cum_cost = int(ARGV[4], 'cum_cost')
local topup_want = int(ARGV[5], 'topup_want')
local low_water = int(ARGV[6], 'low_water')
local ttl_ms = int(ARGV[7], 'ttl_ms')

local wallet, lease, spendable, status = open_lease(KEYS[1], KEYS[2], KEYS[3], KEYS[4], lease_id)
if status ~= nil then
  return { status, 0, spendable, 0, 0 }
end
if seq <= lease.seq then
  return { 'duplicate', lease.granted - lease.charged, spendable, lease.granted, 0 }
end

local now = now_ms()
spendable = charge_cumulative(KEYS[1], KEYS[5], wallet, lease, seq, cum_units, cum_cost, now)
local topped_up = 0
if lease.granted - lease.charged < low_water then
  topped_up = math.min(topup_want, spendable + wallet.overdraft)
  if topped_up > 0 then
    spendable = redis.call('HINCRBY', KEYS[1], 'spendable', fmt(-topped_up))
    lease.granted = lease.granted + topped_up
  else
    topped_up = 0
  end
end
refresh_lease(KEYS[2], KEYS[3], lease_id, lease, ttl_ms, now)
return { 'ok', lease.granted - lease.charged, spendable, lease.granted, topped_up }
