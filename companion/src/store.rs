//! The Redis side: key names, the cached-token value, the fetch lock and its Lua scripts.
//!
//! For one token key (provider `p`, tenant `t`) Redis holds:
//!
//! - `tokengate:{p:t}:token`: the cached token, JSON `{"accessToken","expiresAtMs"}`
//!   or, with `--encryption-key-file`, encrypted (see [`crate::codec`]); set with
//!   `PXAT expiresAtMs` so Redis drops it when it expires;
//! - `tokengate:{p:t}:lock`: the fetch lock: a random lease id, set only if absent
//!   (`NX`, inside the acquire script) with `PX <lock ttl>`;
//! - channel `tokengate:{p:t}:ready`: published when the lock holder commits or aborts,
//!   so waiting companions re-check at once instead of at their next poll, and when a
//!   cached token is invalidated, so companions drop their copies of it
//!   ([`crate::hot`]).
//!
//! The `{p:t}` hash tag puts a key's token and lock in the same cluster slot, which a
//! script touching both requires: the same scripts run on one Redis and on a Redis
//! Cluster ([`Backend`]). Every operation is bounded by the configured Redis
//! timeout, so a hung Redis turns into [`StoreError::Timeout`], not a hung request, and
//! every operation's outcome is reported to an [`Observer`] (the health verdict).

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Client, Cmd, Pipeline, RedisError, RedisFuture, Script, Value};
use std::future::Future;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;
use tokengate_core::lease::LeaseId;
use tokengate_core::{CachedToken, SecretBytes, SecretString, TokenKey};

use crate::codec::{Codec, CodecError};
use crate::config::{Config, redact_url};

/// A cached token is only handed out if it stays valid at least this long, so a caller
/// does not receive a token that expires while its request is in flight.
pub const USABLE_MARGIN_MS: u64 = 1_000;

/// The oldest Redis major version whose commands the scripts use (`PXAT` needs 6.2,
/// `PEXPIRETIME` 7.0).
pub const MIN_REDIS_MAJOR: u32 = 7;

/// Whether a `redis_version` string is at least [`MIN_REDIS_MAJOR`]; `None` if unparseable.
pub fn is_supported_version(version: &str) -> Option<bool> {
    let major: u32 = version.split('.').next()?.parse().ok()?;
    Some(major >= MIN_REDIS_MAJOR)
}

/// The pattern matching every key's `ready` channel (see [`ready_channel`]).
pub const READY_PATTERN: &str = "tokengate:*:ready";

/// The hash tag naming a token key inside Redis names: `<provider>:<tenant>`.
///
/// Tenant ids cannot contain `:`, `{` or `}` ([`tokengate_core::TenantId`]), so the tag
/// is unambiguous and cannot break out of its braces.
pub fn key_tag(key: &TokenKey) -> String {
    format!("{}:{}", key.provider, key.tenant_id)
}

/// The Redis key of a cached token.
pub fn token_key(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:token")
}

/// The Redis key of a fetch lock.
pub fn lock_key(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:lock")
}

/// The pub/sub channel announcing that a key's lock holder committed or aborted.
pub fn ready_channel(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:ready")
}

/// The hash tag of a `ready` channel name, or `None` if the name is not one of ours.
pub fn tag_of_ready_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("tokengate:{")?.strip_suffix("}:ready")
}

/// Whether `token` may still be handed out at `now_ms` (it outlives [`USABLE_MARGIN_MS`]).
pub fn is_usable(token: &CachedToken, now_ms: u64) -> bool {
    token.is_fresh(now_ms, USABLE_MARGIN_MS)
}

/// What the first step of a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// A usable token is cached.
    Hit(CachedToken),
    /// No usable token, and the lease now holds the lock.
    Locked,
    /// No usable token, and another lease holds the lock.
    Held {
        /// When the token cached now expires (0: none). A lease that skips the cache
        /// waits for a token that expires later, i.e. one fetched after this one.
        cached_expires_at_ms: u64,
    },
}

/// What a waiter sees when it looks at a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    /// The cached token, if any (usable or not: the caller decides with its clock).
    pub token: Option<CachedToken>,
    /// Whether some lease holds the key's fetch lock.
    pub lock_held: bool,
}

/// What a commit found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The committing lease still held the lock (and released it). `false` means the
    /// lock expired or another lease took it; that lock was left alone.
    pub lock_was_held: bool,
    /// The token was stored. `false` only when the lease had lost its lock and Redis
    /// already held a token that lives longer, which a stale commit must not replace.
    pub stored: bool,
}

/// What an invalidation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidated {
    /// The cached token was deleted.
    Deleted,
    /// A different token is cached; it was kept.
    Mismatch,
    /// No token was cached.
    NotCached,
}

/// A failed Redis operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
    /// Redis did not answer in time (it may be down, overloaded or unreachable).
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A value could not be encoded for Redis.
    #[error("could not encode the cached value: {0}")]
    Encode(#[from] CodecError),
    /// The Redis client could not be set up from the configuration.
    #[error("{0}")]
    Setup(String),
}

impl StoreError {
    /// Whether this failure says Redis cannot be reached or used at all (connection
    /// refused or lost, timeout, loading, no master), as opposed to an error reply to
    /// one command. Only these count towards the unhealthy verdict.
    pub fn is_unavailability(&self) -> bool {
        use redis::{ErrorKind, ServerErrorKind};
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Encode(_) | StoreError::Setup(_) => false,
            StoreError::Redis(error) => {
                error.is_io_error()
                    || error.is_timeout()
                    || error.is_connection_refusal()
                    || error.is_connection_dropped()
                    || error.is_unrecoverable_error()
                    || matches!(
                        error.kind(),
                        ErrorKind::Server(
                            ServerErrorKind::BusyLoading
                                | ServerErrorKind::MasterDown
                                | ServerErrorKind::ClusterDown
                        )
                    )
            }
        }
    }
}

/// Answers the cached token if it expires after `ARGV[3]` (unless `ARGV[4]` is `1`: skip
/// the cache), else takes the lock if free. A lock this lease already holds counts as
/// taken, so a retried call answers the same.
///
/// The token key expires at the token's `expiresAtMs` (it was stored with `PXAT`), so
/// `PEXPIRETIME` is the token's expiry without decoding the JSON.
/// KEYS: token, lock. ARGV: lease id, lock TTL ms, usable-after ms, skip-cache flag.
/// Returns `{'hit', value, 0}`, `{'locked', nil, 0}` or `{'held', nil, expiry}` where
/// expiry is the cached token's (negative if none).
static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local expiry = redis.call('pexpiretime', KEYS[1])
if ARGV[4] ~= '1' and expiry > tonumber(ARGV[3]) then
  return {'hit', redis.call('get', KEYS[1]), 0}
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
/// Returns `{lock_was_held, stored}` as 0/1.
static COMMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local held = 0
if redis.call('get', KEYS[2]) == ARGV[1] then
  held = 1
end
local stored = 0
if held == 1 or redis.call('pexpiretime', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('set', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
  stored = 1
end
if held == 1 then
  redis.call('del', KEYS[2])
end
redis.call('publish', ARGV[4], 'committed')
return {held, stored}
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
const RELEASE_SCRIPT: &str = r"
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
static DELETE_IF_UNCHANGED_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
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
static DELETE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
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

/// Where Redis is: one server, or a Redis Cluster.
#[derive(Clone)]
pub enum Backend {
    /// One Redis server (or a proxy in front of several).
    Single(Client),
    /// A Redis Cluster: the cluster client, and one plain client per seed node for the
    /// pub/sub subscription (a `PUBLISH` reaches every node of a cluster, so any node
    /// serves the subscription).
    Cluster(ClusterClient, Vec<Client>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Single(_) => f.write_str("Backend::Single"),
            Backend::Cluster(_, nodes) => write!(f, "Backend::Cluster({} seed nodes)", nodes.len()),
        }
    }
}

impl Backend {
    /// The backend `config` names (`--redis-url`, `--redis-cluster`, `--redis-ca-file`),
    /// without connecting.
    pub fn from_config(config: &Config) -> Result<Self, StoreError> {
        let ca = match &config.redis_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                StoreError::Setup(format!("--redis-ca-file {}: {e}", path.display()))
            })?),
            None => None,
        };
        let client = |url: &str| -> Result<Client, StoreError> {
            let built = match &ca {
                Some(pem) => Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    },
                ),
                None => Client::open(url),
            };
            built.map_err(|e| StoreError::Setup(format!("--redis-url {}: {e}", redact_url(url))))
        };
        let urls = config.redis_urls();
        if !config.is_cluster() {
            let url = urls
                .first()
                .copied()
                .unwrap_or(crate::config::DEFAULT_REDIS_URL);
            return Ok(Backend::Single(client(url)?));
        }
        let nodes = urls
            .iter()
            .map(|url| client(url))
            .collect::<Result<Vec<_>, _>>()?;
        let mut builder = ClusterClient::builder(urls.iter().map(|url| (*url).to_owned()))
            .connection_timeout(config.redis_timeout())
            .response_timeout(config.redis_timeout())
            .retries(2);
        if let Some(pem) = &ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        let cluster = builder.build().map_err(|e| {
            StoreError::Setup(format!("--redis-url {}: {e}", config.redacted_redis_url()))
        })?;
        Ok(Backend::Cluster(cluster, nodes))
    }

    /// The plain clients the pub/sub subscriber may connect with, in order of preference.
    pub fn subscriber_clients(&self) -> Vec<Client> {
        match self {
            Backend::Single(client) => vec![client.clone()],
            Backend::Cluster(_, nodes) => nodes.clone(),
        }
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Backend::Cluster(..))
    }
}

/// The shared, reconnecting connection to a [`Backend`]; cheap to clone.
#[derive(Clone)]
pub enum Connection {
    /// One server, through a connection manager that reconnects after failures.
    Single(ConnectionManager),
    /// A cluster connection: routes each command by its key's slot, follows
    /// `MOVED`/`ASK` redirections and reconnects to nodes by itself.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Single(_) => "Connection::Single",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Told whether Redis could be used, after every operation: the health verdict
/// ([`crate::health::Health`]) listens, so real traffic feeds it.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Redis answered.
    fn answered(&self);
    /// Redis could not be reached or used: an unavailability failure of a request's
    /// operation ([`StoreError::is_unavailability`]), or any failure of the monitor's
    /// `PING`.
    fn unavailable(&self, error: &StoreError);
}

/// The companion's handle on Redis: cheap to clone, reconnects by itself.
#[derive(Clone)]
pub struct Store {
    /// Multiplexed connection shared by all requests; reconnects after failures.
    conn: Connection,
    /// Writes and reads the cached values (in clear or encrypted).
    codec: Arc<Codec>,
    /// Upper bound on one operation, so requests fail fast when Redis is down.
    timeout: Duration,
    /// The `PX` of every lock taken; also told to the lease holder.
    lock_ttl_ms: u64,
    /// Told the outcome of every operation, so real traffic feeds the health verdict.
    observer: Arc<dyn Observer>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .field("lock_ttl_ms", &self.lock_ttl_ms)
            .field("encrypted", &self.codec.encrypts())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Creates the store for `backend` without connecting yet: the first operation
    /// connects, so the companion starts while Redis is down. Every operation's outcome
    /// is reported to `observer`; values are written and read with `codec`.
    pub fn new(
        backend: &Backend,
        timeout: Duration,
        lock_ttl_ms: u64,
        observer: Arc<dyn Observer>,
        codec: Codec,
    ) -> Result<Self, StoreError> {
        let conn = match backend {
            Backend::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(timeout);
                Connection::Single(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?)
            }
            Backend::Cluster(client, _) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Connection::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        Ok(Self {
            conn,
            codec: Arc::new(codec),
            timeout,
            lock_ttl_ms,
            observer,
        })
    }

    /// The health monitor's probe: `PING`. Unlike a request's operation, any failure
    /// counts against Redis' health, error replies included (`NOAUTH`, `LOADING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("PING");
        let result: Result<String, StoreError> = self
            .attempt(|mut conn| {
                let cmd = &cmd;
                async move { cmd.query_async(&mut conn).await }
            })
            .await;
        match result {
            Ok(_) => {
                self.observer.answered();
                Ok(())
            }
            Err(error) => {
                self.observer.unavailable(&error);
                Err(error)
            }
        }
    }

    /// The TTL every lock is taken with, in milliseconds.
    pub fn lock_ttl_ms(&self) -> u64 {
        self.lock_ttl_ms
    }

    /// Asks Redis for its version (`INFO server`), which also checks that it answers.
    pub async fn server_version(&self) -> Result<String, StoreError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let info: String = self
            .query(|conn| {
                let cmd = cmd.clone();
                async move {
                    match conn {
                        // A cluster would ask every node and answer a map; one will do.
                        Connection::Cluster(mut conn) => {
                            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
                            let value = conn.route_command(cmd, routing).await?;
                            redis::from_redis_value(value).map_err(RedisError::from)
                        }
                        mut conn => cmd.query_async(&mut conn).await,
                    }
                }
            })
            .await?;
        let version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .unwrap_or("unknown");
        Ok(version.trim().to_owned())
    }

    /// The first step of every lease, in one atomic script: the cached token if it is
    /// usable after `usable_after_ms` (`None`: skip the cache), else the lock for
    /// `lease_id` if it is free.
    ///
    /// Atomic, because a separate "no token" check and `SET NX` would let a commit slip
    /// in between (the commit stores the token and frees the lock), and the lease would
    /// start a second fetch of a token that was just cached.
    pub async fn acquire(
        &self,
        tag: &str,
        lease_id: &LeaseId,
        mut usable_after_ms: Option<u64>,
    ) -> Result<Acquire, StoreError> {
        loop {
            let mut invocation = ACQUIRE_SCRIPT.prepare_invoke();
            invocation
                .key(token_key(tag))
                .key(lock_key(tag))
                .arg(&lease_id.0)
                .arg(self.lock_ttl_ms)
                .arg(usable_after_ms.unwrap_or(0))
                .arg(if usable_after_ms.is_some() { "0" } else { "1" });
            let (outcome, raw, expiry): (String, Option<Vec<u8>>, i64) = self
                .query(|mut conn| {
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut conn).await }
                })
                .await?;
            match outcome.as_str() {
                "hit" => match raw.and_then(|raw| self.codec.decode(tag, &SecretBytes::new(raw))) {
                    Some(token) => return Ok(Acquire::Hit(token)),
                    // Unreadable value: skip it, so this lease fetches a token that
                    // overwrites it. (Skipping the cache never answers "hit" again.)
                    None => usable_after_ms = None,
                },
                "locked" => return Ok(Acquire::Locked),
                _ => {
                    let cached_expires_at_ms = u64::try_from(expiry).unwrap_or(0);
                    return Ok(Acquire::Held {
                        cached_expires_at_ms,
                    });
                }
            }
        }
    }

    /// Reads the cached token and whether the lock is held, in one round trip.
    pub async fn peek(&self, tag: &str) -> Result<Peek, StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(token_key(tag))
            .cmd("EXISTS")
            .arg(lock_key(tag));
        let (raw, lock_held): (Option<Vec<u8>>, bool) = self
            .query(|mut conn| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut conn).await }
            })
            .await?;
        let token = raw.and_then(|raw| self.codec.decode(tag, &SecretBytes::new(raw)));
        Ok(Peek { token, lock_held })
    }

    /// Stores `token`, releases the lock if `lease_id` still holds it, and wakes waiters.
    pub async fn commit(
        &self,
        tag: &str,
        lease_id: &LeaseId,
        token: &CachedToken,
    ) -> Result<CommitOutcome, StoreError> {
        let value = self.codec.encode(tag, token)?;
        let mut invocation = COMMIT_SCRIPT.prepare_invoke();
        invocation
            .key(token_key(tag))
            .key(lock_key(tag))
            .arg(&lease_id.0)
            .arg(value.expose())
            .arg(token.expires_at_ms)
            .arg(ready_channel(tag));
        let (held, stored): (i64, i64) = self
            .query(|mut conn| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(CommitOutcome {
            lock_was_held: held == 1,
            stored: stored == 1,
        })
    }

    /// Releases the lock if `lease_id` holds it (then wakes waiters): `true` if released.
    pub async fn release(&self, tag: &str, lease_id: &LeaseId) -> Result<bool, StoreError> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(RELEASE_SCRIPT)
            .arg(1)
            .arg(lock_key(tag))
            .arg(&lease_id.0)
            .arg(ready_channel(tag));
        let released: i64 = self
            .query(|mut conn| {
                let eval = &eval;
                async move { eval.query_async(&mut conn).await }
            })
            .await?;
        Ok(released == 1)
    }

    /// Deletes the cached token of `tag`; with `access_token`, only if it is that token.
    ///
    /// The comparison needs the token in clear, which an encrypted value only yields in
    /// the companion: the value is read, decoded and compared here, then deleted only if
    /// Redis still holds that exact value (a script), so a token stored meanwhile is
    /// never dropped. A value that cannot be decoded never matches a named token.
    pub async fn invalidate(
        &self,
        tag: &str,
        access_token: Option<&SecretString>,
    ) -> Result<Invalidated, StoreError> {
        let key = token_key(tag);
        let Some(access_token) = access_token else {
            let mut invocation = DELETE_SCRIPT.prepare_invoke();
            invocation.key(&key).arg(ready_channel(tag));
            let deleted: i64 = self
                .query(|mut conn| {
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut conn).await }
                })
                .await?;
            return Ok(if deleted > 0 {
                Invalidated::Deleted
            } else {
                Invalidated::NotCached
            });
        };
        let mut get = redis::cmd("GET");
        get.arg(&key);
        let raw: Option<Vec<u8>> = self
            .query(|mut conn| {
                let get = &get;
                async move { get.query_async(&mut conn).await }
            })
            .await?;
        let Some(raw) = raw.map(SecretBytes::new) else {
            return Ok(Invalidated::NotCached);
        };
        let matches = self
            .codec
            .decode(tag, &raw)
            .is_some_and(|cached| cached.access_token == *access_token);
        if !matches {
            return Ok(Invalidated::Mismatch);
        }
        let mut invocation = DELETE_IF_UNCHANGED_SCRIPT.prepare_invoke();
        invocation
            .key(&key)
            .arg(raw.expose())
            .arg(ready_channel(tag));
        let found: i64 = self
            .query(|mut conn| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(match found {
            1 => Invalidated::Deleted,
            2 => Invalidated::Mismatch,
            _ => Invalidated::NotCached,
        })
    }

    /// [`Store::attempt`], with the outcome reported to the observer: a success, an
    /// unavailability failure, or (an error reply, which is no evidence either way)
    /// nothing.
    async fn query<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let result = self.attempt(operation).await;
        match &result {
            Ok(_) => self.observer.answered(),
            Err(error) if error.is_unavailability() => self.observer.unavailable(error),
            Err(_) => {}
        }
        result
    }

    /// Runs one Redis operation under the store's timeout. If the connection turns out
    /// to be dead (Redis restarted, a proxy dropped it), the operation runs once more on
    /// the connection the manager re-establishes, so a restart costs no failed request.
    /// Every operation here is safe to repeat: reads, and scripts that recognise their
    /// own earlier effect (the lock already held by this lease, the token already stored,
    /// the token already deleted).
    async fn attempt<T, F, Fut>(&self, operation: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let attempts = async {
            match operation(self.conn.clone()).await {
                Err(error) if error.is_unrecoverable_error() => {
                    tracing::debug!(%error, "redis connection lost; retrying once on a new connection");
                    operation(self.conn.clone()).await
                }
                result => result,
            }
        };
        match tokio::time::timeout(self.timeout, attempts).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::{Provider, TenantId};

    #[test]
    fn only_unavailability_counts_against_health() {
        let reply: RedisError = (redis::ErrorKind::UnexpectedReturnType, "bad").into();
        assert!(!StoreError::Redis(reply).is_unavailability());
        assert!(!StoreError::Encode(CodecError::Encrypt).is_unavailability());
        assert!(StoreError::Timeout(Duration::from_millis(5)).is_unavailability());
    }

    fn key() -> TokenKey {
        TokenKey::new(Provider::Genesys, TenantId::parse("acme").unwrap())
    }

    #[test]
    fn keys_share_one_hash_tag_per_token_key() {
        let tag = key_tag(&key());
        assert_eq!(token_key(&tag), "tokengate:{genesys:acme}:token");
        assert_eq!(lock_key(&tag), "tokengate:{genesys:acme}:lock");
        assert_eq!(ready_channel(&tag), "tokengate:{genesys:acme}:ready");
    }

    #[test]
    fn ready_channels_map_back_to_their_tag() {
        let tag = key_tag(&key());
        assert_eq!(
            tag_of_ready_channel(&ready_channel(&tag)),
            Some("genesys:acme")
        );
        assert_eq!(tag_of_ready_channel("tokengate:{genesys:acme}:token"), None);
        assert_eq!(tag_of_ready_channel("other:{x}:ready"), None);
    }

    #[test]
    fn a_token_is_usable_only_beyond_the_margin() {
        let token = CachedToken {
            access_token: "t".into(),
            expires_at_ms: 10_000,
        };
        assert!(is_usable(&token, 10_000 - USABLE_MARGIN_MS - 1));
        assert!(!is_usable(&token, 10_000 - USABLE_MARGIN_MS));
        assert!(!is_usable(&token, 20_000));
        assert!(!is_usable(&token, u64::MAX));
    }

    #[test]
    fn redis_7_or_later_is_required() {
        assert_eq!(is_supported_version("7.0.15"), Some(true));
        assert_eq!(is_supported_version("8.2.1"), Some(true));
        assert_eq!(is_supported_version("6.2.14"), Some(false));
        assert_eq!(is_supported_version("unknown"), None);
    }
}
