-- Adds messages of one partition to its `in`, each once per platform event.
--
-- KEYS per message: its dedup key, the partition's `in`, then its chat's
-- transcript when it has one. ARGV[1]: message count; per message: dedup
-- ttl ms (0: no dedup), field count, fields..., transcript flag (0/1), and
-- with a transcript: cap, ttl ms, channel, chat id, field count, fields...
-- Returns per message the new entry id of `in`, or '' for a duplicate.
local p = 2
local k = 1
local results = {}
for i = 1, tonumber(ARGV[1]) do
  local dedup = KEYS[k]
  local stream = KEYS[k + 1]
  local ttl = tonumber(ARGV[p])
  local count = tonumber(ARGV[p + 1])
  p = p + 2
  local fields = {}
  for j = 0, count * 2 - 1 do fields[#fields + 1] = ARGV[p + j] end
  p = p + count * 2
  local has_transcript = ARGV[p] == '1'
  p = p + 1
  local transcript, cap, transcript_ttl, channel, chat
  local turn = {}
  if has_transcript then
    transcript = KEYS[k + 2]
    k = k + 3
    cap = ARGV[p]
    transcript_ttl = ARGV[p + 1]
    channel = ARGV[p + 2]
    chat = ARGV[p + 3]
    local turn_count = tonumber(ARGV[p + 4])
    p = p + 5
    for j = 0, turn_count * 2 - 1 do turn[#turn + 1] = ARGV[p + j] end
    p = p + turn_count * 2
  else
    k = k + 2
  end
  if ttl > 0 and redis.call('EXISTS', dedup) == 1 then
    results[i] = ''
  else
    results[i] = redis.call('XADD', stream, '*', unpack(fields))
    if ttl > 0 then
      redis.call('SET', dedup, '1', 'PX', ttl)
    end
    if has_transcript then
      redis.call('XADD', transcript, 'MAXLEN', '~', cap, '*', unpack(turn))
      redis.call('PEXPIRE', transcript, transcript_ttl)
      redis.call('PUBLISH', channel, chat)
    end
  end
end
return results
