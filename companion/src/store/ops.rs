//! The operations on Redis: what a lease, a commit, an abort, an invalidation, a waiter
//! and the health monitor ask of it, each bounded by the Redis timeout and reported to
//! the store's [`Observer`].

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterConfig;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ErrorKind, RedisError, ServerErrorKind};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokengate_core::lease::{FetchFailure, LeaseId};
use tokengate_core::{CachedToken, SecretBytes, SecretString};

use super::backend::{Backend, Connection};
use super::keys::{failure_key, lock_key, ready_channel, token_key};
use super::scripts::{
    ACQUIRE_SCRIPT, COMMIT_SCRIPT, DELETE_IF_UNCHANGED_SCRIPT, DELETE_SCRIPT, RELEASE_SCRIPT,
};
use super::shards::slot_of_tag;
use super::{Observer, StoreError};
use crate::codec::Codec;

/// What the first step of a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// A usable token is cached.
    Hit(CachedToken),
    /// No usable token, and the key's last fetch failed in a way asking again cannot
    /// fix, recently (negative caching): answer its error.
    Failed(FetchFailure),
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
    /// The expiry of the token cached before the commit (stored over or kept), if any.
    pub previous_expires_at_ms: Option<u64>,
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
                self.observer.answered(None);
                Ok(())
            }
            Err(error) => {
                self.observer.unavailable(None, &error);
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
            .query(None, |conn| {
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
                .key(failure_key(tag))
                .arg(&lease_id.0)
                .arg(self.lock_ttl_ms)
                .arg(usable_after_ms.unwrap_or(0))
                .arg(if usable_after_ms.is_some() { "0" } else { "1" });
            let (outcome, raw, expiry): (String, Option<Vec<u8>>, i64) = self
                .query(Some(tag), |mut conn| {
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
                "failed" => match raw.and_then(|raw| serde_json::from_slice(&raw).ok()) {
                    Some(failure) => return Ok(Acquire::Failed(failure)),
                    // Unreadable (another version wrote it): skip the cache, which
                    // deletes it, and fetch.
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
            .query(Some(tag), |mut conn| {
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
        let (held, stored, previous): (i64, i64, i64) = self
            .query(Some(tag), |mut conn| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut conn).await }
            })
            .await?;
        Ok(CommitOutcome {
            lock_was_held: held == 1,
            stored: stored == 1,
            // PEXPIRETIME: -2 without a key, -1 for a key without expiry (never written).
            previous_expires_at_ms: u64::try_from(previous).ok(),
        })
    }

    /// Remembers `failure` as the key's for `ttl_ms` (negative caching), before the lock
    /// is released, so the waiters it wakes find it.
    pub async fn record_failure(
        &self,
        tag: &str,
        failure: &FetchFailure,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(failure).unwrap_or_default();
        let mut set = redis::cmd("SET");
        set.arg(failure_key(tag)).arg(value).arg("PX").arg(ttl_ms);
        self.query(Some(tag), |mut conn| {
            let set = &set;
            async move { set.query_async::<()>(&mut conn).await }
        })
        .await
    }

    /// Forgets the key's failure (an invalidation: its credentials may have changed).
    pub async fn forget_failure(&self, tag: &str) -> Result<(), StoreError> {
        let mut del = redis::cmd("DEL");
        del.arg(failure_key(tag));
        self.query(Some(tag), |mut conn| {
            let del = &del;
            async move { del.query_async::<()>(&mut conn).await }
        })
        .await
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
            .query(Some(tag), |mut conn| {
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
                .query(Some(tag), |mut conn| {
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
            .query(Some(tag), |mut conn| {
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
            .query(Some(tag), |mut conn| {
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
    /// nothing; with the slot of the key (hash tag `tag`) the operation touched.
    async fn query<T, F, Fut>(&self, tag: Option<&str>, operation: F) -> Result<T, StoreError>
    where
        F: Fn(Connection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let result = self.attempt(operation).await;
        let slot = tag.map(slot_of_tag);
        match &result {
            Ok(_) => self.observer.answered(slot),
            Err(error) if error.is_unavailability() => self.observer.unavailable(slot, error),
            Err(_) => {}
        }
        result
    }

    /// Runs one Redis operation under the store's timeout. If the connection turns out
    /// to be dead (Redis restarted, a proxy dropped it), the operation runs once more on
    /// the connection the manager re-establishes, so a restart costs no failed request.
    /// So does a script that is still unknown where its key lives after the client
    /// loaded it (`NOSCRIPT`: a replica just promoted, while the client's view of the
    /// cluster catches up). Every operation here is safe to repeat: reads, and scripts that recognise their
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
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    tracing::debug!(%error, "script unknown where its key lives; retrying once");
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
