//! Degraded mode against a real Redis that goes away and comes back: the health
//! verdict, `/readyz`, the in-memory limiter, the in-process single flight, deferred
//! invalidations and the way back to Redis.

mod common;

use common::{Companion, RedisServer, assert_hit, config, error_of, now_ms};
use std::sync::Arc;
use std::time::Duration;
use tokengate_companion::Config;
use tokengate_core::ErrorCode;
use tokengate_core::lease::{LeaseId, LeaseResponse};

const LOCK: &str = "tokengate:{genesys:acme}:lock";
const TOKEN: &str = "tokengate:{genesys:acme}:token";

/// A PING every 50 ms, unhealthy after 3 failures, `per_minute` degraded fetches.
fn degraded_config(redis: &RedisServer, per_minute: u32) -> Config {
    Config {
        health_interval_ms: 50,
        health_failure_threshold: 3,
        degraded_fetches_per_minute: per_minute,
        redis_timeout_ms: 200,
        ..config(redis)
    }
}

/// Leases `tenant`, expecting a degraded-mode fetch; returns its lease id.
async fn local_fetch(companion: &Companion, tenant: &str) -> LeaseId {
    let lease_id = companion.lease_fetch(tenant).await;
    assert!(lease_id.0.starts_with("local-"), "{lease_id:?}");
    lease_id
}

#[tokio::test]
async fn redis_down_serves_leases_within_the_limit_then_redis_is_used_again() {
    let mut redis = RedisServer::start();
    let companion = Companion::start(degraded_config(&redis, 2)).await;
    let (status, body) = companion.readiness().await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"status":"ready","redis":"healthy"})
    );

    redis.kill();
    companion.wait_until_ready_is(503).await;
    let (_, body) = companion.readiness().await;
    assert_eq!(
        body,
        serde_json::json!({"status":"degraded","redis":"unhealthy"})
    );

    // Two fetches of acme within the minute: both granted, ended without Redis
    // (which is dead: a commit or abort that needed it would fail).
    let first = local_fetch(&companion, "acme").await;
    assert_eq!(companion.abort("acme", &first).await, 204);
    let second = local_fetch(&companion, "acme").await;
    assert_ne!(second, first);
    let local_expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &second, "tok-local", local_expires_at_ms)
            .await,
        204
    );
    // The committed token answers acme's next leases from memory, without a fetch.
    assert_hit(
        &companion.lease("acme").await,
        "tok-local",
        local_expires_at_ms,
    );

    // A forced lease skips it, and is over the limit.
    let response = companion.lease_raw_owned("acme", true).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code), (503, ErrorCode::CacheUnavailable));
    assert!(
        error.message.contains("Redis is unavailable")
            && error.message.contains("degraded-mode limit of 2"),
        "{}",
        error.message
    );
    assert_eq!(error.tenant_id.as_deref(), Some("acme"));
    // The limit is per key.
    local_fetch(&companion, "globex").await;

    let metrics = companion.metrics().await;
    assert_eq!(metrics.leases("degraded_fetch"), 3.0);
    assert_eq!(metrics.leases("degraded_hit"), 1.0);
    assert_eq!(metrics.leases("degraded_refused"), 1.0);
    assert_eq!(metrics.value("tokengate_companion_redis_healthy"), 0.0);
    assert_eq!(
        metrics.value("tokengate_companion_redis_health_transitions_total{to=\"unhealthy\"}"),
        1.0
    );
    assert_eq!(
        metrics.value("tokengate_companion_commits_total{result=\"local\"}"),
        1.0
    );
    assert_eq!(
        metrics.value("tokengate_companion_aborts_total{result=\"local\"}"),
        1.0
    );

    // Redis comes back on the same port (empty).
    let redis = RedisServer::start_on(redis.port).expect("redis restarts on its port");
    companion.wait_until_ready_is(200).await;

    // Leases take the Redis lock again, commits land in Redis, the next lease hits.
    let lease_id = companion.lease_fetch("acme").await;
    assert!(!lease_id.0.starts_with("local-"), "{lease_id:?}");
    assert_eq!(redis.query::<String>(&["GET", LOCK]).await, lease_id.0);
    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-redis", expires_at_ms)
            .await,
        204
    );
    let stored: serde_json::Value =
        serde_json::from_str(&redis.query::<String>(&["GET", TOKEN]).await).unwrap();
    assert_eq!(stored["accessToken"], "tok-redis");
    assert_hit(&companion.lease("acme").await, "tok-redis", expires_at_ms);

    let metrics = companion.metrics().await;
    assert_eq!(metrics.value("tokengate_companion_redis_healthy"), 1.0);
    assert_eq!(
        metrics.value("tokengate_companion_redis_health_transitions_total{to=\"healthy\"}"),
        1.0
    );
    assert_eq!(metrics.leases("fetch"), 1.0);
    assert_eq!(metrics.leases("hit"), 1.0);
}

#[tokio::test]
async fn degraded_leases_of_one_key_share_one_fetch_in_process() {
    let mut redis = RedisServer::start();
    let companion = Arc::new(Companion::start(degraded_config(&redis, 2)).await);
    redis.kill();
    companion.wait_until_ready_is(503).await;

    // acme: one holder, four waiters answered by its commit.
    let holder = local_fetch(&companion, "acme").await;
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let companion = Arc::clone(&companion);
        waiters.spawn(async move { companion.lease("acme").await });
    }
    companion
        .wait_until_metric("tokengate_companion_leases_waiting", 4.0)
        .await;
    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &holder, "tok-shared", expires_at_ms)
            .await,
        204
    );
    while let Some(answer) = waiters.join_next().await {
        assert_hit(&answer.unwrap(), "tok-shared", expires_at_ms);
    }

    // globex: the holder aborts, so its waiter takes over the fetch.
    let holder = local_fetch(&companion, "globex").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease_fetch("globex").await }
    });
    companion
        .wait_until_metric("tokengate_companion_leases_waiting", 1.0)
        .await;
    assert_eq!(companion.abort("globex", &holder).await, 204);
    let taken_over = waiter.await.unwrap();
    assert!(taken_over.0.starts_with("local-") && taken_over != holder);

    let metrics = companion.metrics().await;
    assert_eq!(metrics.leases("degraded_waited_hit"), 4.0);
    // acme: one fetch for five leases; globex: two (the holder's and the taker's).
    assert_eq!(metrics.leases("degraded_fetch"), 3.0);
    assert_eq!(metrics.leases("degraded_refused"), 0.0);
}

/// A lease whose Redis operation fails for want of Redis is served in degraded mode at
/// once, and such failures count towards the threshold.
#[tokio::test]
async fn failing_requests_count_towards_the_threshold() {
    let mut redis = RedisServer::start();
    // The monitor stays out of the way: only the requests' own failures count.
    let config = Config {
        health_interval_ms: 600_000,
        health_failure_threshold: 2,
        ..config(&redis)
    };
    let companion = Companion::start(config).await;
    // Answered once serving, i.e. after the start-up check of Redis succeeded.
    assert_eq!(companion.readiness().await.0, 200);
    redis.kill();

    assert_eq!(companion.readiness().await.0, 200);
    local_fetch(&companion, "acme").await;
    local_fetch(&companion, "globex").await;
    assert_eq!(companion.readiness().await.0, 503);
}

#[tokio::test]
async fn an_invalidation_while_redis_is_unhealthy_is_applied_when_it_is_back() {
    let redis = RedisServer::start();
    let companion = Companion::start(degraded_config(&redis, 6)).await;
    let lease_id = companion.lease_fetch("acme").await;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-rejected", now_ms() + 60_000)
            .await,
        204
    );

    // A frozen Redis keeps its data but answers nothing.
    redis.pause();
    companion.wait_until_ready_is(503).await;
    assert_eq!(
        companion.invalidate("acme", Some("tok-rejected")).await,
        204
    );
    assert_eq!(
        companion
            .metrics()
            .await
            .value("tokengate_companion_invalidations_total{result=\"deferred\"}"),
        1.0
    );

    redis.resume();
    companion.wait_until_ready_is(200).await;
    redis
        .wait_until(
            "the deferred invalidation is applied",
            Duration::from_secs(10),
            || async { redis.query::<i64>(&["EXISTS", TOKEN]).await == 0 },
        )
        .await;
    assert!(matches!(
        companion.lease("acme").await,
        LeaseResponse::Fetch { lease_id, .. } if !lease_id.0.starts_with("local-")
    ));
}

/// Stale-if-error: a token this companion served answers its leases from memory while
/// Redis is down, unless an invalidation purged it first, also one made at another
/// companion (heard through pub/sub).
#[tokio::test]
async fn tokens_served_before_redis_died_answer_from_memory_unless_purged_elsewhere() {
    let mut redis = RedisServer::start();
    let patient = |redis: &RedisServer| Config {
        recheck_interval_ms: 10_000,
        lease_wait_ms: 20_000,
        lock_ttl_ms: 30_000,
        ..degraded_config(redis, 6)
    };
    let this = Arc::new(Companion::start(patient(&redis)).await);
    common::wait_until_subscribed(&redis).await;
    let other = Companion::start(patient(&redis)).await;
    let expires_at_ms = now_ms() + 60_000;
    for tenant in ["acme", "globex"] {
        let lease_id = this.lease_fetch(tenant).await;
        let token = format!("tok-{tenant}");
        assert_eq!(
            this.commit(tenant, &lease_id, &token, expires_at_ms).await,
            204
        );
    }
    assert_eq!(other.invalidate("globex", None).await, 204);

    // A commit at the other companion wakes this one's waiter through pub/sub, after
    // the invalidation's message, which it has therefore heard.
    let holder = other.lease_fetch("marker").await;
    let waiter = tokio::spawn({
        let this = Arc::clone(&this);
        async move { this.lease("marker").await }
    });
    this.wait_until_metric("tokengate_companion_leases_waiting", 1.0)
        .await;
    assert_eq!(
        other
            .commit("marker", &holder, "tok-marker", expires_at_ms)
            .await,
        204
    );
    assert_hit(&waiter.await.unwrap(), "tok-marker", expires_at_ms);

    redis.kill();
    this.wait_until_ready_is(503).await;
    assert_hit(&this.lease("acme").await, "tok-acme", expires_at_ms);
    local_fetch(&this, "globex").await;
    let metrics = this.metrics().await;
    assert_eq!(metrics.leases("degraded_hit"), 1.0);
    assert_eq!(metrics.leases("degraded_fetch"), 1.0);
}
