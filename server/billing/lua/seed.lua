-- SEED: create the wallet cache from a Postgres snapshot, only if it does not exist (SET NX
-- semantics). An existing wallet is never incremented: that would double-count money.
-- KEYS: wallet, topups
-- ARGV: balance, overdraft, epoch, topup_id...  (top-ups of the last 48 h included in balance)
-- Returns 1 if created, 0 if the wallet already existed.
local balance = int(ARGV[1], 'balance')
local overdraft = int(ARGV[2], 'overdraft')
if overdraft < 0 then
  error('ERR billing: overdraft must be >= 0')
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'spendable', fmt(balance), 'overdraft', fmt(overdraft),
  'epoch', ARGV[3])
-- The ids make a later TOPUP of a top-up already in `balance` a no-op. Ids left from an older
-- wallet generation are kept: TOPUP runs after the Postgres commit, so they are in `balance` too.
for i = 4, #ARGV do
  redis.call('SADD', KEYS[2], ARGV[i])
end
if #ARGV >= 4 then
  redis.call('PEXPIRE', KEYS[2], '172800000')
end
return 1
