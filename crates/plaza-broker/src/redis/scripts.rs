//! The Lua scripts Redis runs for Plaza. Each runs atomically, which is what registers every
//! publication exactly once with its `(epoch, offset)`.
//!
//! Key layout under the configured prefix `P` (a stream is a channel or an internal stream):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P m:<stream>` | hash | `e` epoch, `t` top offset, `ttl` in ms (0: none) |
//! | `P l:<stream>` | list | the kept publications, oldest first, each `<ms> <payload>`; the last one has offset `t` |
//! | `P ttl` | set | streams with a `ttl`, for the expiry sweep |
//! | `P kv` / `P kvk` | hash / sorted set | the key-value table and its keys in lexical order (prefix scans) |
//! | `P c:<stream>` | pub/sub channel | `h <epoch> <offset> <payload>`, `n <payload>` (no history), `e <except> <frame>` (ephemeral) |
//! | `P pz:<channel>` / `P pzx:<channel>` | hash / sorted set | presence: connection id → client JSON; connection id → expiry (ms) |
//! | `P nodes` | sorted set | node id → expiry (ms) |
//! | `P node-seq` | counter | hands each starting node a number for its connection ids |
//!
//! Offsets in a list are consecutive, so the first kept publication has offset `t - LLEN + 1`.

/// Stores a [`plaza_store::WriteBatch`] atomically. ARGV: prefix, now (ms), an epoch for streams
/// it creates, the `unless_exists` key (empty: none), the number of appends and 4 values each
/// (stream, payload, max_len or -1, ttl ms or 0), the number of key-value writes and 3 values
/// each (key, `s`et or `d`elete, value), the number of offset records and for each the key, a
/// count and that many append indexes (0-based).
///
/// Returns `{0, value}` when `unless_exists` was found, else `{1, epoch1, offset1, ...}`. Each
/// append is published on the stream's pub/sub channel from inside the script, so every node
/// hears of it exactly once and in offset order.
pub const WRITE_BATCH: &str = r#"
local p = ARGV[1]
local now = tonumber(ARGV[2])
local new_epoch = ARGV[3]
local unless = ARGV[4]
if unless ~= '' then
  local v = redis.call('HGET', p .. 'kv', unless)
  if v then return {0, v} end
end
local i = 5
local n = tonumber(ARGV[i]); i = i + 1
local result = {1}
local offsets = {}
for a = 1, n do
  local s, payload, max_len, ttl = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  local m, l = p .. 'm:' .. s, p .. 'l:' .. s
  local e = redis.call('HGET', m, 'e')
  if not e then
    e = new_epoch
    redis.call('HSET', m, 'e', e, 't', 0)
    redis.call('DEL', l)
  end
  local t = redis.call('HINCRBY', m, 't', 1)
  redis.call('HSET', m, 'ttl', ttl)
  if ttl > 0 then redis.call('SADD', p .. 'ttl', s) end
  if max_len == 0 then
    redis.call('DEL', l)
  else
    -- Stamps never decrease along a stream, so the expiry sweep can stop at the first young one.
    local stamp = now
    local last = redis.call('LINDEX', l, -1)
    if last then
      local last_ms = tonumber(string.match(last, '^(%d+) '))
      if last_ms and last_ms > stamp then stamp = last_ms end
    end
    redis.call('RPUSH', l, string.format('%d', stamp) .. ' ' .. payload)
    if max_len > 0 then redis.call('LTRIM', l, -max_len, -1) end
  end
  redis.call('PUBLISH', p .. 'c:' .. s, 'h ' .. e .. ' ' .. t .. ' ' .. payload)
  result[#result + 1] = e
  result[#result + 1] = t
  offsets[a] = t
end
n = tonumber(ARGV[i]); i = i + 1
for k = 1, n do
  local key, op, v = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if op == 's' then
    redis.call('HSET', p .. 'kv', key, v)
    redis.call('ZADD', p .. 'kvk', 0, key)
  else
    redis.call('HDEL', p .. 'kv', key)
    redis.call('ZREM', p .. 'kvk', key)
  end
end
n = tonumber(ARGV[i]); i = i + 1
for k = 1, n do
  local key, count = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local parts = {}
  for j = 1, count do
    parts[j] = string.format('%d', offsets[tonumber(ARGV[i]) + 1] or 0)
    i = i + 1
  end
  redis.call('HSET', p .. 'kv', key, '[' .. table.concat(parts, ',') .. ']')
  redis.call('ZADD', p .. 'kvk', 0, key)
end
return result
"#;

/// Reads a stream. ARGV: prefix, stream, an epoch in case the stream must be created, the
/// `since` epoch (empty: none), the `since` offset, the limit.
///
/// Returns `{epoch, top, first_offset, complete (0/1), payload...}`; payloads have consecutive
/// offsets from `first_offset`. Creates an empty stream when there is none, so the position handed
/// to a subscriber of a quiet channel stays valid when its first publication arrives.
pub const READ: &str = r#"
local p, s, new_epoch, since_epoch = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local since = tonumber(ARGV[5])
local limit = tonumber(ARGV[6])
local m, l = p .. 'm:' .. s, p .. 'l:' .. s
local e = redis.call('HGET', m, 'e')
local t = 0
if not e then
  e = new_epoch
  redis.call('HSET', m, 'e', e, 't', 0)
else
  t = tonumber(redis.call('HGET', m, 't'))
end
local len = redis.call('LLEN', l)
local first = t - len + 1
local from, count, complete
if since_epoch ~= '' then
  if since_epoch ~= e or since > t then
    return {e, t, t + 1, 0}
  end
  from = since + 1
  complete = 1
  if from < first then
    from = first
    complete = 0
  end
  count = t - from + 1
  if count > limit then
    count = limit
    complete = 0
  end
else
  count = len
  complete = 1
  if count > limit then
    count = limit
    complete = 0
  end
  from = t - count + 1
end
local result = {e, t, from, complete}
if count > 0 then
  local start = from - first
  local entries = redis.call('LRANGE', l, start, start + count - 1)
  for j = 1, #entries do
    result[#result + 1] = string.sub(entries[j], (string.find(entries[j], ' ', 1, true) or 0) + 1)
  end
end
return result
"#;

/// Drops publications older than their stream's ttl. ARGV: prefix, now (ms). Returns how many.
pub const TRIM_EXPIRED: &str = r#"
local p = ARGV[1]
local now = tonumber(ARGV[2])
local dropped = 0
for _, s in ipairs(redis.call('SMEMBERS', p .. 'ttl')) do
  local m, l = p .. 'm:' .. s, p .. 'l:' .. s
  local ttl = tonumber(redis.call('HGET', m, 'ttl') or '0')
  if ttl <= 0 then
    redis.call('SREM', p .. 'ttl', s)
  else
    while true do
      local head = redis.call('LINDEX', l, 0)
      if not head then break end
      local ms = tonumber(string.match(head, '^(%d+) '))
      if not ms or ms + ttl > now then break end
      redis.call('LPOP', l)
      dropped = dropped + 1
    end
  end
end
return dropped
"#;

/// The live presence of a channel, dropping entries whose node stopped refreshing them.
/// ARGV: prefix, channel, now (ms). Returns the client JSON values.
pub const PRESENCE_LIST: &str = r#"
local p, c, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local h, x = p .. 'pz:' .. c, p .. 'pzx:' .. c
local expired = redis.call('ZRANGEBYSCORE', x, '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', h, id) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', x, '-inf', now) end
return redis.call('HVALS', h)
"#;
