-- TOPUP: credit a top-up (already committed in Postgres) once per topup id. A missing wallet is
-- left alone: the next SEED reads the balance, this top-up included, from Postgres.
-- KEYS: wallet, topups
-- ARGV: topup_id, amount
-- Returns {status, spendable}; status is 'ok', 'duplicate' or 'nowallet'.
local amount = int(ARGV[2], 'amount')
if amount <= 0 then
  error('ERR billing: top-up amount must be > 0')
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return { 'nowallet', 0 }
end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  redis.call('PEXPIRE', KEYS[2], '172800000')
  return { 'duplicate', tonumber(redis.call('HGET', KEYS[1], 'spendable')) }
end
redis.call('PEXPIRE', KEYS[2], '172800000')
return { 'ok', redis.call('HINCRBY', KEYS[1], 'spendable', fmt(amount)) }
