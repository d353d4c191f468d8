//! The Lua scripts that make each lease step atomic on Redis: acquire (cache read or
//! lock), commit (store, release, wake), release, and the two deletions of an
//! invalidation. Each touches only keys of one hash tag, so it runs on one Redis and on
//! a Redis Cluster alike.

use redis::Script;
use std::sync::LazyLock;

/// Answers the cached token if it expires after `ARGV[3]` (unless `ARGV[4]` is `1`: skip
/// the cache), else the cached failure of the key's last fetch (negative caching; a lease
/// that skips the cache deletes it instead), else takes the lock if free. A lock this
/// lease already holds counts as taken, so a retried call answers the same.
///
/// The token key expires at the token's `expiresAtMs` (it was stored with `PXAT`), so
/// `PEXPIRETIME` is the token's expiry without decoding the JSON.
/// KEYS: token, lock, failure. ARGV: lease id, lock TTL ms, usable-after ms, skip-cache
/// flag. Returns `{'hit', value, 0}`, `{'failed', failure, 0}`, `{'locked', nil, 0}` or
/// `{'held', nil, expiry}` where expiry is the cached token's (negative if none).
pub(super) static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local expiry = redis.call('pexpiretime', KEYS[1])
if ARGV[4] ~= '1' and expiry > tonumber(ARGV[3]) then
  return {'hit', redis.call('get', KEYS[1]), 0}
end
if ARGV[4] == '1' then
  redis.call('del', KEYS[3])
else
  local failure = redis.call('get', KEYS[3])
  if failure then
    return {'failed', failure, 0}
  end
end
local holder = redis.call('get', KEYS[2])
if not holder then
  redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return {'locked', false, 0}
end
if holder == ARGV[1] then
  return {'locked', false, 0}
end
return {'held', false, expiry}
",
    )
});

/// Stores a token, releases the lock if the committing lease still holds it, and
/// wakes the waiters. A lease that lost its lock still stores its (valid) token, unless
/// a longer-lived token is already cached.
///
/// KEYS: token, lock. ARGV: lease id, token JSON, expiresAtMs, ready channel.
/// Returns `{lock_was_held, stored, previous}`: 0/1, 0/1, and the `PEXPIRETIME` of the
/// token cached before (-2 when there was none).
pub(super) static COMMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = 0
if redis.call('get', KEYS[2]) == ARGV[1] then
  held = 1
end
local previous = redis.call('pexpiretime', KEYS[1])
local stored = 0
if held == 1 or previous < tonumber(ARGV[3]) then
  redis.call('set', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
  stored = 1
end
if held == 1 then
  redis.call('del', KEYS[2])
end
redis.call('publish', ARGV[4], 'committed')
return {held, stored, previous}
",
    )
});

/// Compare-and-delete of the lock; wakes the waiters when it released it.
///
/// Sent with its source (`EVAL`), not its digest like the other scripts: a release may be
/// sent without waiting for its answer (after an acquire whose answer never came), so it
/// must work on its first attempt, also on a Redis that has not loaded it yet; an
/// `EVALSHA` would fail there with `NOSCRIPT` and be retried only by a caller still waiting.
///
/// KEYS: lock. ARGV: lease id, ready channel. Returns 1 if released, 0 if not held.
pub(super) const RELEASE_SCRIPT: &str = r"
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('publish', ARGV[2], 'released')
  return 1
end
return 0
";

/// Deletes the cached value only if it is still exactly `ARGV[1]`: the second half of
/// an invalidation that named a token. The value was read and decoded (decrypted) in
/// the companion, which found the named token in it; a value replaced meanwhile (a fresh
/// token) is kept. A deletion is announced on the ready channel.
///
/// KEYS: token. ARGV: the raw value read, ready channel. Returns 1 if deleted, 2 if the
/// value changed, 0 if no value is cached any more.
pub(super) static DELETE_IF_UNCHANGED_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local raw = redis.call('get', KEYS[1])
if not raw then
  return 0
end
if raw ~= ARGV[1] then
  return 2
end
redis.call('del', KEYS[1])
redis.call('publish', ARGV[2], 'invalidated')
return 1
",
    )
});

/// Deletes the cached value, whatever it is, and announces it on the ready channel.
///
/// KEYS: token. ARGV: ready channel. Returns 1 if deleted, 0 if nothing was cached.
pub(super) static DELETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local deleted = redis.call('del', KEYS[1])
if deleted == 1 then
  redis.call('publish', ARGV[1], 'invalidated')
end
return deleted
",
    )
});
