-- Deletes consumer ARGV[2] of group ARGV[1] on stream KEYS[1] only if it
-- has nothing pending (XGROUP DELCONSUMER would drop its pending entries).
-- Returns what DELCONSUMER returns, or -1 when entries are still pending.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
