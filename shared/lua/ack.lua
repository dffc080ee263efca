-- Acknowledges a batch of one partition's entries, each with its writes.
--
-- KEYS[1]: the partition's owner key; KEYS[2..]: every other key written.
-- ARGV: group, consumer, entry count, then per entry:
--   input key index, entry id, write count, then per write one of
--     add <key index> <cap> <expire ms> <field count> <field> <value> ...
--     set <key index> <value> <expire ms>
--     pub <channel> <message>
--     del <key index>
-- Nothing at all happens unless the owner key names `consumer`: a consumer
-- that lost the partition writes nothing for it (returns 'lost').
-- An entry's writes happen only if XACK acknowledged it (a takeover of an
-- entry that was merely slow is not forwarded twice); a stream's expiry is
-- set, and each distinct message published, once, after the batch.
-- Returns 1/0 per entry.
local group, consumer = ARGV[1], ARGV[2]
if redis.call('GET', KEYS[1]) ~= consumer then
  return 'lost'
end
local count = tonumber(ARGV[3])
local p = 4
local acked = {}
local expires = {}
local publish = {}
for i = 1, count do
  local stream = KEYS[tonumber(ARGV[p])]
  local ok = redis.call('XACK', stream, group, ARGV[p + 1])
  local writes = tonumber(ARGV[p + 2])
  p = p + 3
  acked[i] = ok
  for _ = 1, writes do
    local op = ARGV[p]
    if op == 'add' then
      local key = KEYS[tonumber(ARGV[p + 1])]
      -- cap and expire stay strings: Redis would print numbers back to text.
      local cap = ARGV[p + 2]
      local expire = ARGV[p + 3]
      local last = p + 4 + tonumber(ARGV[p + 4]) * 2
      if ok == 1 then
        if cap ~= '0' then
          redis.call('XADD', key, 'MAXLEN', '~', cap, '*', unpack(ARGV, p + 5, last))
        else
          redis.call('XADD', key, '*', unpack(ARGV, p + 5, last))
        end
        if expire ~= '0' then
          expires[key] = expire
        end
      end
      p = last + 1
    elseif op == 'set' then
      if ok == 1 then
        redis.call('SET', KEYS[tonumber(ARGV[p + 1])], ARGV[p + 2], 'PX', ARGV[p + 3])
      end
      p = p + 4
    elseif op == 'del' then
      if ok == 1 then
        redis.call('DEL', KEYS[tonumber(ARGV[p + 1])])
      end
      p = p + 2
    elseif op == 'pub' then
      if ok == 1 then
        publish[ARGV[p + 1] .. '\n' .. ARGV[p + 2]] = {ARGV[p + 1], ARGV[p + 2]}
      end
      p = p + 3
    else
      return redis.error_reply('unknown write ' .. tostring(op))
    end
  end
end
for key, expire in pairs(expires) do
  redis.call('PEXPIRE', key, expire)
end
for _, message in pairs(publish) do
  redis.call('PUBLISH', message[1], message[2])
end
return acked
