//! The Lua scripts the store runs. Each touches the keys of one bucket only, which share a hash
//! tag and so a slot: Redis Cluster runs a script on the one primary that owns that slot.
//!
//! Record keys are built inside the scripts from the bucket's record prefix (an argument) and a
//! name; they are in the declared keys' slot, which Redis allows.

/// Insert-if-absent.
///
/// `KEYS[1]` record key, `KEYS[2]` names set, `KEYS[3]` expiry set; `ARGV[1]` record bytes,
/// `ARGV[2]` name (16 bytes), `ARGV[3]` expiry (unix ms, decimal), `ARGV[4]` `"1"` to set the
/// record with `PXAT expiry` (`"0"` past `i64::MAX`, which Redis cannot take), `ARGV[5]` the
/// bucket's channel, `ARGV[6]` the writer's id.
///
/// A chunk newly stored is also published on the bucket's sharded channel, `ARGV[5]`, as
/// `ARGV[6]` (the writing store's 16-byte id) ‖ name ‖ record, in the same atomic step: every
/// front-end subscribed to the bucket hears of exactly the chunks stored in it.
///
/// Returns 0 Inserted, 1 Duplicate, 2 Conflict, 3 already expired on the server's clock
/// (nothing written).
pub(crate) const INSERT: &str = r#"
local old = redis.call('GET', KEYS[1])
if old then
  if old == ARGV[1] then return 1 end
  return 2
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[3]) <= now then return 3 end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('ZADD', KEYS[2], 0, ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('SPUBLISH', ARGV[5], ARGV[6] .. ARGV[2] .. ARGV[1])
return 0
"#;

/// One page of a bucket's names in a lexicographic range, each followed by its record.
///
/// `KEYS[1]` names set; `ARGV[1]` and `ARGV[2]` the `BYLEX` bounds where the page starts and
/// where it may end (`[`/`(` + 16 bytes), `ARGV[3]` page size, `ARGV[4]` the bucket's record
/// prefix, `ARGV[5]` `"1"` to read downwards (`REV`: `ARGV[1]` is then the upper bound).
///
/// Returns `[name, record-or-nil, name, record-or-nil, …]`, in the order read. A missing record
/// is one Redis has already expired (its index entries wait for `sweep_expired`).
pub(crate) const SCAN: &str = r#"
local names
if ARGV[5] == '1' then
  names = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'BYLEX', 'REV', 'LIMIT', 0, tonumber(ARGV[3]))
else
  names = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
end
local out = {}
for i, name in ipairs(names) do
  out[2 * i - 1] = name
  out[2 * i] = redis.call('GET', ARGV[4] .. name)
end
return out
"#;

/// Removes up to `ARGV[2]` names expired at `ARGV[1]` (score ≤ now) from both index sets and
/// deletes their records.
///
/// `KEYS[1]` names set, `KEYS[2]` expiry set; `ARGV[3]` the bucket's record prefix.
/// Returns how many names it removed.
pub(crate) const SWEEP: &str = r#"
local names = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #names == 0 then return 0 end
redis.call('ZREM', KEYS[1], unpack(names))
redis.call('ZREM', KEYS[2], unpack(names))
for _, name in ipairs(names) do
  redis.call('DEL', ARGV[3] .. name)
end
return #names
"#;
