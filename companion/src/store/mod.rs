//! The Redis side: key names, the cached-token value, the fetch lock and its Lua scripts.
//!
//! For one token key (provider `p`, tenant `t`) Redis holds:
//!
//! - `tokengate:{p:t}:token`: the cached token, JSON `{"accessToken","expiresAtMs"}`
//!   or, with `--encryption-key-file`, encrypted (see [`crate::codec`]); set with
//!   `PXAT expiresAtMs` so Redis drops it when it expires;
//! - `tokengate:{p:t}:lock`: the fetch lock: a random lease id, set only if absent
//!   (`NX`, inside the acquire script) with `PX <lock ttl>`;
//! - `tokengate:{p:t}:failure`: the error of a fetch that failed with rejected or
//!   missing credentials, JSON `{"code","message"}`, set with `PX --negative-cache-ms`:
//!   while it lasts, leases are answered that error instead of a lock (negative caching);
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
//!
//! - [`keys`]: the key and channel names;
//! - [`scripts`]: the Lua scripts;
//! - [`backend`]: one server or a cluster, and the shared connection;
//! - [`ops`]: [`Store`], the operations;
//! - [`shards`]: a cluster's slot ranges and primaries, probed node by node by the
//!   health monitor.

pub mod backend;
pub mod keys;
pub mod ops;
pub mod scripts;
pub mod shards;

pub use backend::{Backend, Connection};
pub use keys::{
    INVALIDATED_MESSAGE, READY_PATTERN, failure_key, key_tag, lock_key, ready_channel,
    tag_of_ready_channel, token_key,
};
pub use ops::{Acquire, CommitOutcome, Invalidated, Peek, Store};
pub use shards::{NodeProber, Shard, ShardProbe, slot_of_tag};

use redis::RedisError;
use std::time::Duration;
use tokengate_core::CachedToken;

use crate::codec::CodecError;

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

/// Whether `token` may still be handed out at `now_ms` (it outlives [`USABLE_MARGIN_MS`]).
pub fn is_usable(token: &CachedToken, now_ms: u64) -> bool {
    token.is_fresh(now_ms, USABLE_MARGIN_MS)
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
    /// Whether this failure says Redis (or, on a cluster, the key's shard) cannot be
    /// reached or used (connection refused or lost, timeout, loading, no master, a
    /// replica answering for a primary, a cluster that is down, failing over or still
    /// redirecting after the client's retries, a script still unknown to a promoted
    /// replica), as opposed to an error reply to one
    /// command. Only these count towards the unhealthy verdict, and only these send a
    /// lease to degraded mode.
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
                        ErrorKind::ClusterConnectionNotFound
                            | ErrorKind::Server(
                                ServerErrorKind::BusyLoading
                                    | ServerErrorKind::MasterDown
                                    | ServerErrorKind::ClusterDown
                                    | ServerErrorKind::TryAgain
                                    | ServerErrorKind::Moved
                                    | ServerErrorKind::Ask
                                    | ServerErrorKind::ReadOnly
                                    | ServerErrorKind::NoScript
                            )
                    )
            }
        }
    }
}

/// Told whether Redis could be used, after every operation: the health verdict
/// ([`crate::health::Health`]) listens, so real traffic feeds it. `slot` is the cluster
/// slot of the key the operation touched ([`slot_of_tag`]; `None` for an operation on
/// no key), so a cluster's verdict is kept per shard.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// Redis answered.
    fn answered(&self, slot: Option<u16>);
    /// Redis could not be reached or used: an unavailability failure of a request's
    /// operation ([`StoreError::is_unavailability`]), or any failure of the monitor's
    /// `PING`.
    fn unavailable(&self, slot: Option<u16>, error: &StoreError);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailability_counts_against_health() {
        let reply: RedisError = (redis::ErrorKind::UnexpectedReturnType, "bad").into();
        assert!(!StoreError::Redis(reply).is_unavailability());
        assert!(!StoreError::Encode(CodecError::Encrypt).is_unavailability());
        assert!(StoreError::Timeout(Duration::from_millis(5)).is_unavailability());
        let no_node: RedisError = (redis::ErrorKind::ClusterConnectionNotFound, "gone").into();
        assert!(StoreError::Redis(no_node).is_unavailability());
        use redis::ServerErrorKind::{ClusterDown, Moved, NoScript, ReadOnly, TryAgain};
        for kind in [ClusterDown, TryAgain, Moved, ReadOnly, NoScript] {
            let reply: RedisError = (redis::ErrorKind::Server(kind), "cluster").into();
            assert!(StoreError::Redis(reply).is_unavailability(), "{kind:?}");
        }
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
