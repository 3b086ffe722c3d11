-- REPLAY: after Redis lost a lease (REPORT answered 'unknown') the session reserves again and
-- replays its usage events as deltas. Each new seq is charged like REPORT charges it and appended
-- with replay=1, so the flusher can dedupe it against Postgres (and REFUND the cache on a
-- conflict). Idempotent by seq. No top-up: the session's next REPORT does that.
-- KEYS: wallet, lease, leases, settled, usage
-- ARGV: lease_id, ttl_ms, then (seq, units, cost) per event in ascending seq
-- Returns {status, remaining, spendable, granted, applied}; status as for REPORT.
local lease_id = ARGV[1]
local ttl_ms = int(ARGV[2], 'ttl_ms')
local n = (#ARGV - 2) / 3
if n ~= math.floor(n) then
  error('ERR billing: replay takes (seq, units, cost) triples')
end
local events = {}
local last = -1
for i = 1, n do
  local b = 2 + 3 * (i - 1)
  local ev = { seq = int(ARGV[b + 1], 'seq'), units = int(ARGV[b + 2], 'units'),
    cost = int(ARGV[b + 3], 'cost') }
  if ev.seq <= last or ev.units < 0 or ev.cost < 0 then
    error('ERR billing: replay events need ascending seq and deltas >= 0')
  end
  last = ev.seq
  events[i] = ev
end

local wallet = load_wallet(KEYS[1])
local spendable = 0
if wallet ~= nil then
  spendable = wallet.spendable
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return { 'settled', 0, spendable, 0, 0 }
end
local lease = load_lease(KEYS[2])
if lease == nil then
  return { 'unknown', 0, spendable, 0, 0 }
end
if lease_is_stale(wallet, lease) then
  drop_lease(KEYS[2], KEYS[3], lease_id)
  return { 'unknown', 0, spendable, 0, 0 }
end

local now = now_ms()
local applied = 0
for i = 1, n do
  local ev = events[i]
  if ev.seq > lease.seq then
    spendable = charge(KEYS[1], KEYS[5], wallet, lease, ev.seq, ev.units, ev.cost, '1', now)
    applied = applied + 1
  end
end
if applied == 0 then
  return { 'duplicate', lease.granted - lease.charged, spendable, lease.granted, 0 }
end
lease.ttl_ms = ttl_ms
save_lease(KEYS[2], lease)
redis.call('ZADD', KEYS[3], fmt(now + ttl_ms), lease_id)
return { 'ok', lease.granted - lease.charged, spendable, lease.granted, applied }
