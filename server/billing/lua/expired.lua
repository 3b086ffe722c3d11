-- EXPIRED: first half of SWEEP. Lists leases whose expiry (Redis TIME) has passed, so that the
-- client can name their keys in KEYS for sweep.lua (Redis Cluster: every key declared).
-- KEYS: leases
-- ARGV: limit
local limit = int(ARGV[1], 'limit')
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now_ms()), 'LIMIT', '0', fmt(limit))
