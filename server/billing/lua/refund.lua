-- REFUND: the flusher's answer to a replayed event that Postgres already had (the cache charged
-- it twice, Postgres once): spendable += cost, once per event id. A missing wallet is left
-- alone: SEED reads the correct balance from Postgres.
-- KEYS: wallet, refunds
-- ARGV: event_id, cost
-- Returns {status, spendable}; status is 'ok', 'duplicate' or 'nowallet'.
local cost = int(ARGV[2], 'cost')
if cost < 0 then
  error('ERR billing: refund cost must be >= 0')
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return { 'nowallet', 0 }
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return { 'duplicate', tonumber(redis.call('HGET', KEYS[1], 'spendable')) }
end
redis.call('PEXPIRE', KEYS[2], '172800000')
return { 'ok', redis.call('HINCRBY', KEYS[1], 'spendable', fmt(cost)) }
