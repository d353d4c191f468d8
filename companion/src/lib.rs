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
//! per process at a time, and an in-memory limit of fetches per key per minute. On a
//! Redis Cluster this holds per shard: only the keys of a shard that is down (or of an
//! operation that failed for want of Redis) go without it, and a token this companion
//! served recently answers them from memory while it is valid (stale-if-error).
//!
//! The companion also serves the original service's token API (`/auth/token`)
//! natively, for clients that are not behind Envoy: the same lease, with the companion
//! itself fetching through core's fetch flow ([`token_api`], [`fetch`]).
//!
//! Layout, from the outside in:
//!
//! - `main.rs`: thin binary: parses [`Config`], sets up logging, binds, runs until
//!   Ctrl-C or SIGTERM.
//! - [`run`] / [`serve`] (here): wires the pieces below together, serves until
//!   `shutdown`, then shuts down gracefully within `--shutdown-timeout-ms`.
//! - [`config`]: the command-line / environment configuration and its checks; fetch
//!   defaults come from core's `FetchConfig::default()`, limits from core's `limit`.
//! - [`keys`]: the internal API key and the encryption keys, read from their files.
//! - [`http`]: routes and handlers; the internal API's key check; JSON rejections
//!   become core's error body.
//! - [`correlation`]: the per-request span and `x-request-id`.
//! - [`token_api`]: `/auth/token`, on top of the lease logic, with the forced-refresh
//!   throttle (core's `RefreshThrottle`); [`fetch`] drives core's fetch flow with
//!   reqwest and tokio timers.
//! - [`error`]: [`ApiError`] (one request, mapped once to a response) and
//!   [`CompanionError`] (the process).
//! - [`lease`]: the lease / commit / abort / invalidate logic, choosing between Redis and
//!   degraded mode.
//! - [`waits`]: per-process shared waits on a held lock, woken by Redis pub/sub.
//! - [`hot`]: in-process copies of recently read tokens, dropped by the same pub/sub.
//! - [`stale`]: the last token served per key, answered while its key cannot use Redis.
//! - [`degraded`]: degraded mode's in-process single flight, limiter (core's
//!   `FetchLog`) and deferred invalidations.
//! - [`health`]: the Redis health verdict (per shard on a cluster), fed by the store
//!   through its [`store::Observer`] trait, and its monitor task.
//! - [`metrics`]: the `prometheus-client` registry and its Prometheus text exposition.
//! - [`store`]: everything Redis: [`store::keys`] (names), [`store::scripts`] (Lua),
//!   [`store::backend`] (one server or a cluster), [`store::ops`] (the operations);
//!   [`codec`]: the stored value, in clear or AES-256-GCM encrypted.
//! - [`clock`]: the wall clock, behind a trait.
//!
//! Dependencies point one way: `codec` <- `store` <- `health`; `metrics` depends on
//! none of them; this file wires the health verdict into the store.

pub mod clock;
pub mod codec;
pub mod config;
pub mod correlation;
pub mod degraded;
pub mod error;
pub mod fetch;
pub mod health;
pub mod hot;
pub mod http;
pub mod keys;
pub mod lease;
pub mod metrics;
pub mod stale;
pub mod store;
pub mod token_api;
pub mod waits;

pub use clock::{Clock, SystemClock};
pub use config::{Config, LogFormat};
pub use error::{ApiError, CompanionError};

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::codec::Codec;
use crate::keys::Secrets;
use crate::token_api::{ForcedRefreshes, TaskCounter, TokenApi};

/// How often the pub/sub connection is pinged, to notice one that died silently.
const SUBSCRIBER_KEEPALIVE: Duration = Duration::from_secs(15);

/// Extra time, beyond one Redis operation, kept at the end of the shutdown bound for
/// fetches to release their locks and for their 503s to reach the clients.
const RELEASE_MARGIN: Duration = Duration::from_millis(500);

/// The listeners the companion serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The internal API, probes and metrics (and the token API unless `token_api` is set).
    pub api: TcpListener,
    /// The token API's own listener (`--token-api-listen`).
    pub token_api: Option<TcpListener>,
}

/// Serves the companion on `listener` (and on `--token-api-listen` if set, bound here)
/// until `shutdown` completes, then shuts down gracefully.
///
/// Redis need not be up: the companion starts anyway and reconnects by itself. Until
/// the failure threshold is reached, requests that need Redis answer
/// `503 CACHE_UNAVAILABLE`; from then on leases are served in degraded mode until Redis
/// answers again. When `shutdown` completes, no connection is accepted any more, leases
/// still waiting are answered `503 COMPANION_UNAVAILABLE` at once, and in-flight
/// requests finish; token API fetches still running shortly before
/// `--shutdown-timeout-ms` release their locks and answer 503; this returns within
/// that bound.
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
    let token_api = match config.token_api_listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let listeners = Listeners {
        api: listener,
        token_api,
    };
    serve(listeners, config, clock, shutdown).await
}

/// [`run`] on listeners bound by the caller (tests bind the token API's on port 0).
pub async fn serve(
    listeners: Listeners,
    config: Config,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CompanionError> {
    config.validate().map_err(CompanionError::Config)?;
    if listeners.token_api.is_some() && !config.token_api_enabled() {
        return Err(CompanionError::Config(
            "a token API listener needs --tenant-service-url".to_owned(),
        ));
    }
    install_crypto_provider();
    let secrets = Secrets::load(&config)?;
    let backend = store::Backend::from_config(&config).map_err(CompanionError::Redis)?;
    let metrics = Arc::new(metrics::Metrics::new());
    let health = Arc::new(health::Health::new(
        config.health_failure_threshold,
        metrics.redis_health(),
    ));
    let codec = secrets
        .keyring
        .clone()
        .map_or(Codec::Plain, Codec::Encrypted);
    let encrypted = codec.encrypts();
    let store = store::Store::new(
        &backend,
        config.redis_timeout(),
        config.lock_ttl_ms,
        Arc::clone(&health) as Arc<dyn store::Observer>,
        codec,
    )
    .map_err(CompanionError::Redis)?;
    let waits = waits::Waits::new(store.clone(), Arc::clone(&clock), config.recheck_interval());
    let redis = config.redacted_redis_url();
    let cluster = backend.is_cluster();
    match store.server_version().await {
        Ok(version) => match store::is_supported_version(&version) {
            Some(true) => tracing::info!(%redis, cluster, %version, "redis is reachable"),
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
        Arc::clone(&health),
        Arc::clone(&waits),
        degraded,
        Arc::clone(&metrics),
        Arc::clone(&clock),
        config.lease_wait(),
        Duration::from_millis(config.negative_cache_ms),
        stopping_rx,
    ));
    let _subscriber = AbortOnDrop(tokio::spawn(waits::run_subscriber(
        backend.subscriber_clients(),
        waits,
        Arc::clone(service.hot()),
        Arc::clone(service.stale()),
        config.redis_timeout(),
        SUBSCRIBER_KEEPALIVE,
    )));
    let prober = match &backend {
        store::Backend::Cluster(_, nodes) => store::NodeProber::new(nodes, config.redis_timeout()),
        store::Backend::Single(_) => None,
    };
    let _monitor = AbortOnDrop(tokio::spawn(health::run_monitor(
        store,
        health,
        prober,
        config.health_interval(),
    )));
    let _replay = AbortOnDrop(tokio::spawn(lease::replay_on_recovery(Arc::clone(
        &service,
    ))));

    let (cancel_tx, cancel_rx) = watch::channel(false);
    let tasks = TaskCounter::new();
    let token_api = fetch::Fetcher::from_config(&config, Arc::clone(&metrics), Arc::clone(&clock))?
        .map(|fetcher| {
            Arc::new(TokenApi::new(
                Arc::clone(&service),
                fetcher,
                Arc::clone(&clock),
                metrics,
                cancel_rx,
                tasks.clone(),
                ForcedRefreshes::new(config.min_refresh_interval_ms),
            ))
        });
    let guarded = secrets.internal_api_key.is_some();
    if !guarded {
        tracing::warn!(
            "the internal API (/v1/*) is open: no --internal-api-key-file or \
             TOKENGATE_INTERNAL_API_KEY is set, so whoever reaches --listen can lease tokens"
        );
    }
    let internal = http::internal_router(Arc::clone(&service), secrets.internal_api_key);
    let token_api_addr = listeners
        .token_api
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let (app, token_app) = match (token_api, listeners.token_api) {
        (Some(api), Some(listener)) => (
            http::finish(internal),
            Some((listener, http::token_api_router(api))),
        ),
        (Some(api), None) => (http::finish(internal.merge(token_api::router(api))), None),
        (None, _) => (http::finish(internal), None),
    };

    tracing::info!(
        addr = %listeners.api.local_addr()?,
        token_api = config.token_api_enabled(),
        token_api_addr = token_api_addr.map(|addr| addr.to_string()),
        tenant_service = config.redacted_tenant_service_url(),
        providers = %config
            .fetch_config()
            .providers
            .iter()
            .map(|spec| spec.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        internal_api_key = guarded,
        encrypted_cache = encrypted,
        lock_ttl_ms = config.lock_ttl_ms,
        lease_wait_ms = config.lease_wait_ms,
        recheck_interval_ms = config.recheck_interval_ms,
        redis_timeout_ms = config.redis_timeout_ms,
        health_interval_ms = config.health_interval_ms,
        health_failure_threshold = config.health_failure_threshold,
        degraded_fetches_per_minute = config.degraded_fetches_per_minute,
        negative_cache_ms = config.negative_cache_ms,
        min_refresh_interval_ms = config.min_refresh_interval_ms,
        shutdown_timeout_ms = config.shutdown_timeout_ms,
        "tokengate companion listening"
    );

    // `shutdown` fires `began`; both servers stop accepting on it.
    let (began_tx, began_rx) = watch::channel(false);
    let _signal = AbortOnDrop(tokio::spawn(async move {
        shutdown.await;
        began_tx.send_replace(true);
    }));
    let stop_accepting = |mut began: watch::Receiver<bool>| async move {
        // Ignored error: the sender lives until `run` returns.
        let _ = began.wait_for(|began| *began).await;
    };
    let api_server = axum::serve(listeners.api, app)
        .with_graceful_shutdown(stop_accepting(began_rx.clone()))
        .into_future();
    let token_stop = stop_accepting(began_rx.clone());
    let token_server = async move {
        match token_app {
            Some((listener, app)) => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(token_stop)
                    .await
            }
            None => Ok(()),
        }
    };
    let servers = async { tokio::try_join!(api_server, token_server).map(|_| ()) };
    tokio::pin!(servers);

    let mut began = began_rx;
    let mut served: Option<std::io::Result<()>> = None;
    tokio::select! {
        result = &mut servers => served = Some(result),
        _ = began.wait_for(|began| *began) => {}
    }
    if !*began.borrow() {
        // The servers only end on their own when a listener fails.
        if let Some(result) = served {
            result?;
        }
        return Ok(());
    }

    let bound = config.shutdown_timeout();
    let started = Instant::now();
    let release_at = started + bound.saturating_sub(release_margin(bound, config.redis_timeout()));
    tracing::info!(
        timeout_ms = config.shutdown_timeout_ms,
        "shutting down: not accepting connections, answering waiting leases, finishing in-flight requests"
    );
    stopping_tx.send_replace(true);

    // Phase 1: in-flight requests and fetches finish by themselves.
    let finished = tokio::time::timeout_at(release_at, async {
        if served.is_none() {
            served = Some((&mut servers).await);
        }
        tasks.idle().await;
    })
    .await;
    if finished.is_err() {
        // Phase 2: fetches give up, release their locks and answer 503.
        tracing::warn!(
            fetches = tasks.running(),
            "in-flight requests are still running near the shutdown bound: token API fetches \
             release their locks and answer 503"
        );
        cancel_tx.send_replace(true);
        let finished = tokio::time::timeout_at(started + bound, async {
            if served.is_none() {
                served = Some((&mut servers).await);
            }
            tasks.idle().await;
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                fetches = tasks.running(),
                "shutdown bound reached with requests still open; closing them"
            );
        }
    }
    if let Some(result) = served {
        result?;
    }
    tracing::info!(
        took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "stopped"
    );
    Ok(())
}

/// How long before the shutdown bound running fetches are told to give up: one Redis
/// operation (the abort) plus [`RELEASE_MARGIN`], at most half the bound.
fn release_margin(bound: Duration, redis_timeout: Duration) -> Duration {
    (redis_timeout + RELEASE_MARGIN).min(bound / 2)
}

/// Makes ring rustls' process-wide crypto provider (for `rediss://`), once.
fn install_crypto_provider() {
    // Ignored error: a provider is already installed (a second `run` in one process).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Aborts a background task when the server that owns it stops.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
