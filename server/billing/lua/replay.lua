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

local wallet, lease, spendable, status = open_lease(KEYS[1], KEYS[2], KEYS[3], KEYS[4], lease_id)
if status ~= nil then
  return { status, 0, spendable, 0, 0 }
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
refresh_lease(KEYS[2], KEYS[3], lease_id, lease, ttl_ms, now)
return { 'ok', lease.granted - lease.charged, spendable, lease.granted, applied }
