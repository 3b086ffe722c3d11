-- Shared prelude: wallet_cache.py prepends this file to every billing script before loading it.
-- Lua numbers are doubles: every value is checked to stay within +-2^50 (exact, with headroom for
-- sums) and written back with string.format('%d'), because tostring() switches to exponent
-- notation above 14 digits and a number argument to redis.call is sent as '%.17g'.
local MAX = 1125899906842624 -- 2^50

local function int(v, name)
  local n = tonumber(v)
  if n == nil or n ~= math.floor(n) or n < -MAX or n > MAX then
    error('ERR billing: bad integer for ' .. name .. ': ' .. tostring(v))
  end
  return n
end

local function fmt(n)
  return string.format('%d', n)
end

-- Milliseconds from the Redis clock: never a client clock (clients on many hosts drift).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function load_wallet(key)
  local w = redis.call('HMGET', key, 'spendable', 'overdraft', 'epoch')
  if not w[1] then
    return nil
  end
  return { spendable = tonumber(w[1]), overdraft = tonumber(w[2]), epoch = w[3] }
end

local function load_lease(key)
  local f = redis.call('HMGET', key, 'granted', 'charged', 'units', 'seq', 'session_id', 'model',
    'unit', 'ttl_ms', 'epoch')
  if not f[1] then
    return nil
  end
  return {
    granted = tonumber(f[1]), charged = tonumber(f[2]), units = tonumber(f[3]),
    seq = tonumber(f[4]), session_id = f[5], model = f[6], unit = f[7],
    ttl_ms = tonumber(f[8]), epoch = f[9],
  }
end

-- A lease belongs to the wallet generation (epoch) that granted it. If the wallet is gone or was
-- re-seeded from Postgres since, the lease's money is not in this wallet: releasing it would
-- create money, so the lease is dropped without touching the wallet.
local function lease_is_stale(wallet, lease)
  return wallet == nil or wallet.epoch ~= lease.epoch
end

local function drop_lease(lease_key, leases_key, lease_id)
  redis.call('DEL', lease_key)
  redis.call('ZREM', leases_key, lease_id)
end

-- Apply one usage delta to `lease` and the wallet, and append the usage event. Usage beyond the
-- grant is taken from spendable (it was already consumed; refusing it would lose the record), so
-- granted grows to charged. Returns the wallet's new spendable.
local function charge(wallet_key, stream_key, wallet, lease, seq, units, cost, replay, now)
  lease.charged = lease.charged + cost
  lease.units = lease.units + units
  lease.seq = seq
  if lease.charged > lease.granted then
    wallet.spendable = redis.call('HINCRBY', wallet_key, 'spendable',
      fmt(lease.granted - lease.charged))
    lease.granted = lease.charged
  end
  redis.call('XADD', stream_key, '*',
    'event_id', lease.session_id .. ':' .. fmt(seq),
    'session_id', lease.session_id, 'model', lease.model, 'unit', lease.unit,
    'units', fmt(units), 'cost', fmt(cost), 'replay', replay, 'ts', fmt(now))
  return wallet.spendable
end

local function save_lease(lease_key, lease)
  redis.call('HSET', lease_key, 'granted', fmt(lease.granted), 'charged', fmt(lease.charged),
    'units', fmt(lease.units), 'seq', fmt(lease.seq), 'ttl_ms', fmt(lease.ttl_ms))
end

-- Release the unused grant, remove the lease and leave a tombstone recording the outcome, so a
-- retried SETTLE returns the same answer and a late REPORT is refused.
local function close_lease(wallet_key, lease_key, leases_key, settled_key, lease_id, wallet, lease)
  local released = lease.granted - lease.charged
  if released ~= 0 then
    wallet.spendable = redis.call('HINCRBY', wallet_key, 'spendable', fmt(released))
  end
  drop_lease(lease_key, leases_key, lease_id)
  redis.call('SET', settled_key, fmt(released) .. ' ' .. fmt(lease.charged), 'PX', '86400000')
  return released
end

-- REPORT, SETTLE: charge cumulative usage as the delta since the lease's last report. Cumulative
-- values only grow; a smaller one is a client bug that would credit the tenant.
local function charge_cumulative(wallet_key, stream_key, wallet, lease, seq, cum_units, cum_cost,
                                 now)
  if cum_cost < lease.charged or cum_units < lease.units then
    error('ERR billing: cumulative usage went backwards')
  end
  return charge(wallet_key, stream_key, wallet, lease, seq, cum_units - lease.units,
    cum_cost - lease.charged, '0', now)
end

-- REPORT, REPLAY: the wallet and the lease to charge. Returns wallet, lease, spendable, status:
-- status is nil when the lease is live, else 'settled' (tombstoned) or 'unknown' (Redis lost the
-- lease, or it was stale and is dropped here); spendable is the wallet's, 0 without a wallet.
local function open_lease(wallet_key, lease_key, leases_key, settled_key, lease_id)
  local wallet = load_wallet(wallet_key)
  local spendable = 0
  if wallet ~= nil then
    spendable = wallet.spendable
  end
  if redis.call('EXISTS', settled_key) == 1 then
    return wallet, nil, spendable, 'settled'
  end
  local lease = load_lease(lease_key)
  if lease == nil then
    return wallet, nil, spendable, 'unknown'
  end
  if lease_is_stale(wallet, lease) then
    drop_lease(lease_key, leases_key, lease_id)
    return wallet, nil, spendable, 'unknown'
  end
  return wallet, lease, spendable, nil
end

-- REPORT, REPLAY: save the charged lease with its new ttl and push its expiry to now + ttl_ms.
local function refresh_lease(lease_key, leases_key, lease_id, lease, ttl_ms, now)
  lease.ttl_ms = ttl_ms
  save_lease(lease_key, lease)
  redis.call('ZADD', leases_key, fmt(now + ttl_ms), lease_id)
end
