//! The companion's configuration: command-line flags, each also readable from a
//! `TOKENGATE_…` environment variable, and the checks that stop a bad start-up.

use clap::Parser;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default `--redis-url`.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default `--lock-ttl-ms`.
pub const DEFAULT_LOCK_TTL_MS: u64 = 30_000;
/// Default `--lease-wait-ms`.
pub const DEFAULT_LEASE_WAIT_MS: u64 = 35_000;
/// Default `--recheck-interval-ms`.
pub const DEFAULT_RECHECK_INTERVAL_MS: u64 = 200;
/// Default `--redis-timeout-ms`.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 1_000;
/// Default `--health-interval-ms`.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1_000;
/// Default `--health-failure-threshold`.
pub const DEFAULT_HEALTH_FAILURE_THRESHOLD: u32 = 3;
/// Default `--degraded-fetches-per-minute`.
pub const DEFAULT_DEGRADED_FETCHES_PER_MINUTE: u32 = 6;
/// Largest `--degraded-fetches-per-minute`: the limiter keeps one timestamp per
/// admitted fetch and key, so the limit bounds its memory.
pub const MAX_DEGRADED_FETCHES_PER_MINUTE: u32 = 10_000;

/// tokengate companion: collapses token fetches cluster-wide for the tokengate Envoy filter.
///
/// It owns the Redis token cache and the per-(provider, tenant) fetch lock, and serves
/// the filter's lease / commit / abort / invalidate API. While Redis is unhealthy it
/// serves leases in degraded mode (no cache, no lock, an in-memory limit per key).
#[derive(Clone, PartialEq, Eq, Parser)]
#[command(name = "tokengate-companion", version)]
pub struct Config {
    /// Address the HTTP API listens on.
    #[arg(long, env = "TOKENGATE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Redis holding the cluster-wide token cache and fetch locks
    /// (`redis://[:password@]host:port[/db]`; `rediss://` is not supported by this build).
    #[arg(long, env = "TOKENGATE_REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,

    /// How long a fetch lock lives, in milliseconds, if its holder neither commits nor
    /// aborts. Must outlive the filter's whole fetch deadline (Tenant Service plus OAuth,
    /// retries included), or a slow fetch loses its lock and a second fetch starts.
    #[arg(long, env = "TOKENGATE_LOCK_TTL_MS", default_value_t = DEFAULT_LOCK_TTL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lock_ttl_ms: u64,

    /// How long a lease waits, in milliseconds, for another instance's fetch to finish
    /// before it is answered 503 LOCK_ACQUISITION_FAILED. Keep it greater than
    /// --lock-ttl-ms, so that a waiter outlives a dead holder's lock and takes over
    /// instead of failing; the filter's call timeout to the companion must exceed it.
    #[arg(long, env = "TOKENGATE_LEASE_WAIT_MS", default_value_t = DEFAULT_LEASE_WAIT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_wait_ms: u64,

    /// While a lease waits, how often it re-reads the token and the lock from Redis, in
    /// milliseconds. Waiters are woken by Redis pub/sub as soon as the holder commits or
    /// aborts; this re-check only catches expired locks and missed messages.
    #[arg(long, env = "TOKENGATE_RECHECK_INTERVAL_MS", default_value_t = DEFAULT_RECHECK_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recheck_interval_ms: u64,

    /// Longest time one Redis operation (connect included) may take, in milliseconds,
    /// before the request is answered 503 CACHE_UNAVAILABLE.
    #[arg(long, env = "TOKENGATE_REDIS_TIMEOUT_MS", default_value_t = DEFAULT_REDIS_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

    /// How often the health monitor PINGs Redis, in milliseconds.
    #[arg(long, env = "TOKENGATE_HEALTH_INTERVAL_MS", default_value_t = DEFAULT_HEALTH_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub health_interval_ms: u64,

    /// How many Redis failures in a row (monitor PINGs, and connection failures or
    /// timeouts of requests' own operations) make Redis unhealthy, which switches leases
    /// to degraded mode. One success makes it healthy again.
    #[arg(long, env = "TOKENGATE_HEALTH_FAILURE_THRESHOLD", default_value_t = DEFAULT_HEALTH_FAILURE_THRESHOLD,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failure_threshold: u32,

    /// In degraded mode, how many fetches per (provider, tenant) this process grants in
    /// any rolling minute (a sliding window); further leases get 503 CACHE_UNAVAILABLE.
    /// 0 refuses every lease while Redis is unhealthy.
    #[arg(long, env = "TOKENGATE_DEGRADED_FETCHES_PER_MINUTE", default_value_t = DEFAULT_DEGRADED_FETCHES_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_DEGRADED_FETCHES_PER_MINUTE)))]
    pub degraded_fetches_per_minute: u32,
}

impl Config {
    /// Checks the rules a single flag cannot express. The message names the flags.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("--lock-ttl-ms", self.lock_ttl_ms),
            ("--lease-wait-ms", self.lease_wait_ms),
            ("--recheck-interval-ms", self.recheck_interval_ms),
            ("--redis-timeout-ms", self.redis_timeout_ms),
            ("--health-interval-ms", self.health_interval_ms),
            (
                "--health-failure-threshold",
                u64::from(self.health_failure_threshold),
            ),
        ];
        for (flag, value) in nonzero {
            if value == 0 {
                return Err(format!("{flag} must be greater than 0"));
            }
        }
        if self.recheck_interval_ms > self.lease_wait_ms {
            return Err(format!(
                "--recheck-interval-ms ({}) must not exceed --lease-wait-ms ({})",
                self.recheck_interval_ms, self.lease_wait_ms
            ));
        }
        if self.degraded_fetches_per_minute > MAX_DEGRADED_FETCHES_PER_MINUTE {
            return Err(format!(
                "--degraded-fetches-per-minute ({}) must be at most {MAX_DEGRADED_FETCHES_PER_MINUTE}",
                self.degraded_fetches_per_minute
            ));
        }
        if !self.redis_url.starts_with("redis://") && !self.redis_url.starts_with("redis+unix://") {
            return Err(format!(
                "--redis-url must start with redis:// or redis+unix:// (got {})",
                self.redacted_redis_url()
            ));
        }
        Ok(())
    }

    /// The lock TTL as a duration.
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// The lease wait budget as a duration.
    pub fn lease_wait(&self) -> Duration {
        Duration::from_millis(self.lease_wait_ms)
    }

    /// The waiters' safety-net re-check interval as a duration.
    pub fn recheck_interval(&self) -> Duration {
        Duration::from_millis(self.recheck_interval_ms)
    }

    /// The per-operation Redis timeout as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// The health monitor's PING interval as a duration.
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    /// The Redis URL with any user and password replaced, safe to log.
    pub fn redacted_redis_url(&self) -> String {
        redact_url(&self.redis_url)
    }
}

impl Default for Config {
    /// The same values the command line defaults to.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            lock_ttl_ms: DEFAULT_LOCK_TTL_MS,
            lease_wait_ms: DEFAULT_LEASE_WAIT_MS,
            recheck_interval_ms: DEFAULT_RECHECK_INTERVAL_MS,
            redis_timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            health_interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            health_failure_threshold: DEFAULT_HEALTH_FAILURE_THRESHOLD,
            degraded_fetches_per_minute: DEFAULT_DEGRADED_FETCHES_PER_MINUTE,
        }
    }
}

impl fmt::Debug for Config {
    /// Like a derived `Debug`, but the Redis URL's credentials are redacted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("redis_url", &self.redacted_redis_url())
            .field("lock_ttl_ms", &self.lock_ttl_ms)
            .field("lease_wait_ms", &self.lease_wait_ms)
            .field("recheck_interval_ms", &self.recheck_interval_ms)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("health_interval_ms", &self.health_interval_ms)
            .field("health_failure_threshold", &self.health_failure_threshold)
            .field(
                "degraded_fetches_per_minute",
                &self.degraded_fetches_per_minute,
            )
            .finish()
    }
}

/// Replaces the user-info part of a URL (`scheme://user:pass@host`) with `[redacted]`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("tokengate-companion").chain(args.iter().copied()))
    }

    #[test]
    fn command_line_defaults_match_the_default_impl() {
        assert_eq!(parse(&[]).unwrap(), Config::default());
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn zero_durations_are_rejected_by_the_parser() {
        for flag in [
            "--lock-ttl-ms",
            "--lease-wait-ms",
            "--recheck-interval-ms",
            "--redis-timeout-ms",
            "--health-interval-ms",
            "--health-failure-threshold",
        ] {
            assert!(parse(&[flag, "0"]).is_err(), "{flag} 0 was accepted");
        }
    }

    #[test]
    fn the_degraded_limit_may_be_zero_but_is_bounded() {
        assert_eq!(
            parse(&["--degraded-fetches-per-minute", "0"])
                .unwrap()
                .degraded_fetches_per_minute,
            0
        );
        assert!(parse(&["--degraded-fetches-per-minute", "10001"]).is_err());
        let config = Config {
            degraded_fetches_per_minute: 10_001,
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("--degraded-fetches-per-minute")
        );
    }

    #[test]
    fn recheck_interval_may_not_exceed_the_wait() {
        let config = Config {
            lease_wait_ms: 100,
            recheck_interval_ms: 101,
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("--recheck-interval-ms")
        );
    }

    #[test]
    fn other_url_schemes_are_rejected_without_echoing_credentials() {
        let config = Config {
            redis_url: "rediss://:s3cret@host:6380".into(),
            ..Config::default()
        };
        let message = config.validate().unwrap_err();
        assert!(
            message.contains("rediss://[redacted]@host:6380"),
            "{message}"
        );
        assert!(!message.contains("s3cret"));
    }

    #[test]
    fn debug_redacts_redis_credentials() {
        let config = Config {
            redis_url: "redis://user:s3cret@redis:6379/0".into(),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("redis://[redacted]@redis:6379/0"), "{shown}");
        assert!(!shown.contains("s3cret"));
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
