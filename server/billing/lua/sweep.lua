-- SWEEP: settle expired leases at their last reported usage (no new usage event). Each lease is
-- re-checked against Redis TIME here: a REPORT may have refreshed it since expired.lua listed it.
-- KEYS: wallet, leases, then (lease, settled) per lease id
-- ARGV: lease_id...
-- Returns the number of leases settled.
local now = now_ms()
local wallet = load_wallet(KEYS[1])
local swept = 0
for i = 1, #ARGV do
  local lease_id = ARGV[i]
  local lease_key = KEYS[1 + 2 * i]
  local settled_key = KEYS[2 + 2 * i]
  local expiry = redis.call('ZSCORE', KEYS[2], lease_id)
  if expiry and tonumber(expiry) <= now then
    local lease = load_lease(lease_key)
    if lease == nil then
      redis.call('ZREM', KEYS[2], lease_id)
    elseif lease_is_stale(wallet, lease) then
      drop_lease(lease_key, KEYS[2], lease_id)
    else
      close_lease(KEYS[1], lease_key, KEYS[2], settled_key, lease_id, wallet, lease)
      swept = swept + 1
    end
  end
end
return swept
