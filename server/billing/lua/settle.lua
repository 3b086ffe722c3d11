-- SETTLE: apply the final report if its seq is new, release granted - charged to spendable,
-- delete the lease and write a tombstone holding the outcome. Idempotent by the tombstone.
-- KEYS: wallet, lease, leases, settled, usage
-- ARGV: lease_id, seq, cum_units, cum_cost
-- Returns {status, released, charged}; status is 'ok', 'settled' (already settled: the first
-- outcome is returned again) or 'unknown' (Redis lost the lease).
local lease_id = ARGV[1]
local seq = int(ARGV[2], 'seq')
local cum_units = int(ARGV[3], 'cum_units')
local cum_cost = int(ARGV[4], 'cum_cost')

local tomb = redis.call('GET', KEYS[4])
if tomb then
  local released, charged = string.match(tomb, '^(%-?%d+) (%d+)$')
  return { 'settled', int(released, 'released'), int(charged, 'charged') }
end
local wallet = load_wallet(KEYS[1])
local lease = load_lease(KEYS[2])
if lease == nil then
  return { 'unknown', 0, 0 }
end
if lease_is_stale(wallet, lease) then
  drop_lease(KEYS[2], KEYS[3], lease_id)
  return { 'unknown', 0, 0 }
end
if seq > lease.seq then
  charge_cumulative(KEYS[1], KEYS[5], wallet, lease, seq, cum_units, cum_cost, now_ms())
end
local released = close_lease(KEYS[1], KEYS[2], KEYS[3], KEYS[4], lease_id, wallet, lease)
return { 'ok', released, lease.charged }
