-- Renews (ARGV[2] ms) or, with ARGV[2] = 0, releases the lease KEYS[1],
-- only while it is still held by ARGV[1]. Every lease botline keeps uses
-- this: consumer names, partition ownership, connection leases.
-- Returns 1 if it was ours (renewed or released), 0 if not.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if ARGV[2] == '0' then
  return redis.call('DEL', KEYS[1])
end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
