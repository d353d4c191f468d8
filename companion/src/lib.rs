//! tokengate-companion: the native service the tokengate Envoy filter calls so that one
//! token fetch happens per (provider, tenant) across the whole cluster.
//!
//! The filter asks for a *lease* on a token key. The companion answers from the Redis
//! cache (`hit`), or hands the caller the key's cluster-wide lock (`fetch`: the caller
//! fetches the token, then *commits* it or *aborts*), or holds the request until the
//! lock's holder finishes. A caller whose token an upstream rejected *invalidates* it.
//! The wire types live in [`tokengate_core::lease`].
//!
//! While Redis is unhealthy (a health monitor PINGs it; request failures count too),
//! leases are served in *degraded mode*: no cluster cache, no lock, one fetch per key
//! per process at a time, and an in-memory limit of fetches per key per minute.
//!
//! Layout, from the outside in:
//!
//! - `main.rs`: thin binary: parses [`Config`], sets up logging, binds, runs until
//!   Ctrl-C or SIGTERM.
//! - [`run`] (here): wires the pieces below together and serves until `shutdown`.
//! - [`config`]: the command-line / environment configuration and its checks.
//! - [`http`]: routes and handlers; JSON rejections become core's error body.
//! - [`error`]: [`ApiError`] (one request, mapped once to a response) and
//!   [`CompanionError`] (the process).
//! - [`lease`]: the lease / commit / abort / invalidate logic, choosing between Redis and
//!   degraded mode.
//! - [`waits`]: per-process shared waits on a held lock, woken by Redis pub/sub.
//! - [`degraded`]: degraded mode's in-process single flight, limiter and deferred
//!   invalidations.
//! - [`health`]: the Redis health verdict and its monitor task.
//! - [`metrics`]: counters and the Prometheus text exposition.
//! - [`store`]: everything Redis: key names, the cached value, lock, Lua scripts.
//! - [`clock`]: the wall clock, behind a trait.

pub mod clock;
pub mod config;
pub mod degraded;
pub mod error;
pub mod health;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod store;
pub mod waits;

pub use clock::{Clock, SystemClock};
pub use config::Config;
pub use error::{ApiError, CompanionError};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the pub/sub connection is pinged, to notice one that died silently.
const SUBSCRIBER_KEEPALIVE: Duration = Duration::from_secs(15);

/// Serves the companion's API on `listener` until `shutdown` completes.
///
/// Redis need not be up: the companion starts anyway and reconnects by itself. Until
/// the failure threshold is reached, requests that need Redis answer
/// `503 CACHE_UNAVAILABLE`; from then on leases are served in degraded mode until Redis
/// answers again. When `shutdown` completes, leases still waiting are answered
/// `503 COMPANION_UNAVAILABLE` at once and in-flight requests finish before this returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CompanionError> {
    run_with_clock(listener, config, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with the wall clock supplied, so tests can move time.
pub async fn run_with_clock(
    listener: TcpListener,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CompanionError> {
    config.validate().map_err(CompanionError::Config)?;
    let client = redis::Client::open(config.redis_url.as_str())
        .map_err(|e| CompanionError::Redis(e.into()))?;
    let health = Arc::new(health::Health::new(config.health_failure_threshold));
    let store = store::Store::new(
        client.clone(),
        config.redis_timeout(),
        config.lock_ttl_ms,
        Arc::clone(&health),
    )
    .map_err(CompanionError::Redis)?;
    let waits = waits::Waits::new(store.clone(), Arc::clone(&clock), config.recheck_interval());
    let _subscriber = AbortOnDrop(tokio::spawn(waits::run_subscriber(
        client,
        Arc::clone(&waits),
        config.redis_timeout(),
        SUBSCRIBER_KEEPALIVE,
    )));

    let redis = config.redacted_redis_url();
    match store.server_version().await {
        Ok(version) => match store::is_supported_version(&version) {
            Some(true) => tracing::info!(%redis, %version, "redis is reachable"),
            _ => tracing::warn!(
                %redis, %version,
                "redis is reachable but older than {}.0 or of unknown version: leases may fail \
                 (the scripts use PXAT and PEXPIRETIME)",
                store::MIN_REDIS_MAJOR
            ),
        },
        Err(error) => tracing::warn!(
            %redis, %error,
            "redis is not reachable yet; leases are served in degraded mode once the health \
             monitor declares it unhealthy, and use it as soon as it answers"
        ),
    }

    let (stopping_tx, stopping_rx) = watch::channel(false);
    let degraded = Arc::new(degraded::Degraded::new(
        config.degraded_fetches_per_minute,
        config.lock_ttl(),
    ));
    let service = Arc::new(lease::Service::new(
        store.clone(),
        waits,
        degraded,
        Arc::new(metrics::Metrics::new()),
        clock,
        config.lease_wait(),
        stopping_rx,
    ));
    let _monitor = AbortOnDrop(tokio::spawn(health::run_monitor(
        store,
        config.health_interval(),
    )));
    let _replay = AbortOnDrop(tokio::spawn(lease::replay_on_recovery(Arc::clone(
        &service,
    ))));
    let app = http::router(Arc::clone(&service));

    tracing::info!(
        addr = %listener.local_addr()?,
        lock_ttl_ms = config.lock_ttl_ms,
        lease_wait_ms = config.lease_wait_ms,
        recheck_interval_ms = config.recheck_interval_ms,
        redis_timeout_ms = config.redis_timeout_ms,
        health_interval_ms = config.health_interval_ms,
        health_failure_threshold = config.health_failure_threshold,
        degraded_fetches_per_minute = config.degraded_fetches_per_minute,
        "tokengate companion listening"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: answering waiting leases, finishing in-flight requests");
            // Ignored error: no receiver left means no lease is waiting.
            let _ = stopping_tx.send(true);
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// Aborts a background task when the server that owns it stops.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
