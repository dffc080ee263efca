-- Deletes each sending lock in KEYS that is still ours (ARGV[1]), so another
-- try can start at once rather than when the lock runs out.
-- Returns how many were deleted.
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    released = released + redis.call('DEL', key)
  end
end
return released
