//! The Lua scripts that make every queue operation one atomic step on the server.
//!
//! Every script gets the same `KEYS` (see [`KEY_NAMES`]) and the same first two
//! `ARGV` entries: the wake-up channel and the prefix of the per-key parking
//! lists. Item ids travel as decimal strings.

use std::sync::LazyLock;

use redis::Script;

/// The suffixes of the queue's keys, in `KEYS` order (`KEYS[1]` is `ready`).
pub(super) const KEY_NAMES: [&str; 11] = [
    "ready",     // 1 LIST  ids ready to be handed out, oldest first
    "delayed",   // 2 ZSET  ids waiting for a back-off, scored by due time (ms)
    "leased",    // 3 ZSET  ids handed out, scored by lease deadline (ms)
    "payload",   // 4 HASH  id -> payload; HLEN is the number of items held
    "key",       // 5 HASH  id -> ordering key
    "attempts",  // 6 HASH  id -> earlier deliveries (absent = 0)
    "dedup",     // 7 HASH  payload -> id (unique queues only)
    "keyholder", // 8 HASH  ordering key -> the id that holds it
    "seq",       // 9 STRING the id counter (INCR)
    "popwait",   // 10 STRING set while some pop waits: pushes then publish a wake-up
    "pushwait",  // 11 STRING set while some push waits for room: acks then publish
];

/// Shared helpers, prepended to every script.
const PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Keep the later of the flag's current expiry and `px`.
local function flag(key, px)
  if redis.call('PTTL', key) < px then
    redis.call('SET', key, '1', 'PX', px)
  end
end
-- Wake waiting pops (of every process) only when one registered as waiting.
local function wake_pops()
  if redis.call('DEL', KEYS[10]) == 1 then
    redis.call('PUBLISH', ARGV[1], 'r')
  end
end
local function wake_pushes()
  if redis.call('DEL', KEYS[11]) == 1 then
    redis.call('PUBLISH', ARGV[1], 's')
  end
end
-- Up to 256 members of ZSET `key` due by `now`, by due time then id (a ZSET
-- breaks score ties by comparing the members as strings: "10" < "9").
local function due_ids(key, now)
  local r = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 256)
  local items = {}
  for i = 1, #r, 2 do
    items[#items + 1] = {tonumber(r[i + 1]), tonumber(r[i]), r[i]}
  end
  table.sort(items, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  local ids = {}
  for i = 1, #items do ids[i] = items[i][3] end
  return ids
end
-- The holder `id` of ordering key `k` is done: hand the key to the next parked
-- item, if any, and return that item's id.
local function release(k, id)
  if redis.call('HGET', KEYS[8], k) ~= id then
    return false
  end
  local nx = redis.call('LPOP', ARGV[2] .. k)
  if nx then
    redis.call('HSET', KEYS[8], k, nx)
  else
    redis.call('HDEL', KEYS[8], k)
  end
  return nx
end
"#;

/// `ARGV[3]` capacity (-1 = none), `ARGV[4]` unique ('1'/'0'), then four
/// entries per item: how long its caller will wait for room (ms, 0 = not at
/// all), payload, has-key ('1'/'0'), key. Items are stored in argument order.
/// Returns one entry per item: the new id, -1 when full, -2 for a duplicate.
const PUSH: &str = r#"
local cap = tonumber(ARGV[3])
local unique = ARGV[4] == '1'
local total = redis.call('HLEN', KEYS[4])
local out = {}
local accepted = {}
local seen = {}
for i = 5, #ARGV, 4 do
  local p = ARGV[i + 1]
  if unique and (seen[p] or redis.call('HEXISTS', KEYS[7], p) == 1) then
    out[#out + 1] = -2
  elseif cap >= 0 and total >= cap then
    local px = tonumber(ARGV[i])
    if px > 0 then flag(KEYS[11], px) end
    out[#out + 1] = -1
  else
    out[#out + 1] = 0
    accepted[#accepted + 1] = {i, #out}
    total = total + 1
    if unique then seen[p] = true end
  end
end
if #accepted == 0 then return out end
local id = redis.call('INCRBY', KEYS[9], #accepted) - #accepted
local pays, keys, dedup, ready = {}, {}, {}, {}
for j = 1, #accepted do
  local i, o = accepted[j][1], accepted[j][2]
  id = id + 1
  out[o] = id
  pays[#pays + 1] = id
  pays[#pays + 1] = ARGV[i + 1]
  if ARGV[i + 2] == '1' then
    keys[#keys + 1] = id
    keys[#keys + 1] = ARGV[i + 3]
  end
  if unique then
    dedup[#dedup + 1] = ARGV[i + 1]
    dedup[#dedup + 1] = id
  end
  ready[#ready + 1] = id
end
redis.call('HSET', KEYS[4], unpack(pays))
if #keys > 0 then redis.call('HSET', KEYS[5], unpack(keys)) end
if #dedup > 0 then redis.call('HSET', KEYS[7], unpack(dedup)) end
redis.call('RPUSH', KEYS[1], unpack(ready))
wake_pops()
return out
"#;

/// `ARGV[3]` max items, `ARGV[4]` lease length (ms), `ARGV[5]` how long the
/// caller will wait if nothing is ready (ms, 0 = not at all), `ARGV[6]` how many
/// extra blocked (parked) items one call may step over.
///
/// Returns `{next_due_ms, id, payload, key|nil, attempts, ...}` where
/// `next_due_ms` is how long until a delayed item or a lease comes due (-1 =
/// none, 0 = call again now).
const POP: &str = r#"
local now = now_ms()
local due = due_ids(KEYS[2], now)
for i = 1, #due do
  redis.call('ZREM', KEYS[2], due[i])
  redis.call('RPUSH', KEYS[1], due[i])
end
local expired = due_ids(KEYS[3], now)
for i = 1, #expired do
  redis.call('ZREM', KEYS[3], expired[i])
  redis.call('HINCRBY', KEYS[6], expired[i], 1)
  redis.call('RPUSH', KEYS[1], expired[i])
end
local max = tonumber(ARGV[3])
local budget = max + tonumber(ARGV[6])
local had_leases = redis.call('ZCARD', KEYS[3]) > 0
local deadline = now + tonumber(ARGV[4])
local out = {0}
local n = 0
while n < max and budget > 0 do
  local want = math.min(max - n, budget)
  local ids = redis.call('LPOP', KEYS[1], want)
  if not ids then break end
  budget = budget - #ids
  local pays = redis.call('HMGET', KEYS[4], unpack(ids))
  local keys = redis.call('HMGET', KEYS[5], unpack(ids))
  local atts = redis.call('HMGET', KEYS[6], unpack(ids))
  local leases = {}
  for j = 1, #ids do
    local id, p, k = ids[j], pays[j], keys[j]
    if p then
      local take = true
      if k then
        local h = redis.call('HGET', KEYS[8], k)
        if not h then
          redis.call('HSET', KEYS[8], k, id)
        elseif h ~= id then
          -- an earlier item of this key is out: park behind it
          redis.call('RPUSH', ARGV[2] .. k, id)
          take = false
        end
      end
      if take then
        leases[#leases + 1] = deadline
        leases[#leases + 1] = id
        out[#out + 1] = id
        out[#out + 1] = p
        out[#out + 1] = k
        out[#out + 1] = tonumber(atts[j] or '0')
        n = n + 1
      end
    end
  end
  if #leases > 0 then redis.call('ZADD', KEYS[3], unpack(leases)) end
  if #ids < want then break end
end
-- A first lease is a new earliest deadline: waiting pops re-arm their timers.
if n > 0 and not had_leases then wake_pops() end
local nd = -1
local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #d > 0 then nd = tonumber(d[2]) end
local l = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #l > 0 and (nd < 0 or tonumber(l[2]) < nd) then nd = tonumber(l[2]) end
if nd >= 0 then nd = math.max(0, nd - now) end
if n < max and redis.call('LLEN', KEYS[1]) > 0 then nd = 0 end
out[1] = nd
if n == 0 then
  local px = tonumber(ARGV[5])
  if px > 0 then flag(KEYS[10], px) end
end
return out
"#;

/// `ARGV[3..]` ids handed out by a pop whose caller went away: back to the
/// front of `ready`, attempts unchanged. Returns how many went back.
const UNPOP: &str = r#"
local back = 0
for i = #ARGV, 3, -1 do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then
    redis.call('LPUSH', KEYS[1], ARGV[i])
    back = back + 1
  end
end
if back > 0 then wake_pops() end
return back
"#;

/// `ARGV[3..]` ids to delete; only leased ids are deleted. Returns how many.
const ACK: &str = r#"
local ids = {}
for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
local scores = redis.call('ZMSCORE', KEYS[3], unpack(ids))
local live = {}
for j = 1, #ids do
  if scores[j] then live[#live + 1] = ids[j] end
end
if #live == 0 then return 0 end
redis.call('ZREM', KEYS[3], unpack(live))
if redis.call('EXISTS', KEYS[7]) == 1 then
  local pays = redis.call('HMGET', KEYS[4], unpack(live))
  for j = 1, #live do
    local p = pays[j]
    if p and redis.call('HGET', KEYS[7], p) == live[j] then
      redis.call('HDEL', KEYS[7], p)
    end
  end
end
local keys = redis.call('HMGET', KEYS[5], unpack(live))
local released = {}
local keyed = false
for j = 1, #live do
  if keys[j] then
    keyed = true
    local nx = release(keys[j], live[j])
    if nx then released[#released + 1] = nx end
  end
end
redis.call('HDEL', KEYS[4], unpack(live))
redis.call('HDEL', KEYS[6], unpack(live))
if keyed then redis.call('HDEL', KEYS[5], unpack(live)) end
-- Released items were pushed before everything else that is ready.
for i = #released, 1, -1 do
  redis.call('LPUSH', KEYS[1], released[i])
end
if #released > 0 then wake_pops() end
wake_pushes()
return #live
"#;

/// `ARGV[3]` delay (ms), `ARGV[4..]` leased ids to hand back. Returns how many.
const NACK: &str = r#"
local now = now_ms()
local delay = tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', KEYS[3], id) == 1 then
    redis.call('HINCRBY', KEYS[6], id, 1)
    if delay <= 0 then
      redis.call('RPUSH', KEYS[1], id)
    else
      redis.call('ZADD', KEYS[2], now + delay, id)
    end
    n = n + 1
  end
end
if n > 0 then wake_pops() end
return n
"#;

/// Returns `{ready (incl. parked), delayed, leased}`.
const LEN: &str = r#"
local total = redis.call('HLEN', KEYS[4])
local d = redis.call('ZCARD', KEYS[2])
local l = redis.call('ZCARD', KEYS[3])
return {total - d - l, d, l}
"#;

/// `ARGV[3]` '1' to delete the id counter and wait flags too. Returns how many
/// items were deleted.
const REMOVE_ALL: &str = r#"
local n = redis.call('HLEN', KEYS[4])
local held = redis.call('HKEYS', KEYS[8])
for i = 1, #held do
  redis.call('UNLINK', ARGV[2] .. held[i])
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
if ARGV[3] == '1' then
  redis.call('UNLINK', KEYS[9])
  if redis.call('DEL', KEYS[10]) == 1 then redis.call('PUBLISH', ARGV[1], 'r') end
end
wake_pushes()
return n
"#;

/// The compiled scripts (their SHA1 computed once per process).
pub(super) struct Scripts {
    pub(super) push: Script,
    pub(super) pop: Script,
    pub(super) unpop: Script,
    pub(super) ack: Script,
    pub(super) nack: Script,
    pub(super) len: Script,
    pub(super) remove_all: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
    Scripts {
        push: s(PUSH),
        pop: s(POP),
        unpop: s(UNPOP),
        ack: s(ACK),
        nack: s(NACK),
        len: s(LEN),
        remove_all: s(REMOVE_ALL),
    }
});
