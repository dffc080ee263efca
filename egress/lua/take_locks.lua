-- Takes each reply's sending lock unless it is already sent, for replies of
-- one partition, and only while this consumer still owns that partition.
--
-- KEYS[1]: the partition's owner key; then per reply its sent key and its
-- sending key. ARGV: consumer, lock token, lock ms, then per reply 1 (lock)
-- or 0 (only check `sent`).
-- Returns 'lost' if the partition is no longer this consumer's (nothing is
-- taken), else per reply 2 sent, 1 taken, 0 held by another.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 'lost'
end
local taken = {}
for i = 2, #KEYS, 2 do
  local n = i / 2
  if redis.call('EXISTS', KEYS[i]) == 1 then
    taken[n] = 2
  elseif ARGV[3 + n] == '0' or redis.call('SET', KEYS[i + 1], ARGV[2], 'NX', 'PX', ARGV[3]) then
    taken[n] = 1
  else
    taken[n] = 0
  end
end
return taken
