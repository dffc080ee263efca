-- A stage's live consumers. KEYS[1]: the group's member set (consumer ->
-- when its membership runs out, ms by Redis's clock). ARGV[1]: this
-- consumer; ARGV[2]: its membership's length in ms, or 0 to leave.
-- Drops members whose time ran out and returns the live ones, sorted.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if ARGV[2] == '0' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
