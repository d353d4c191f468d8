//! `/metrics` and `/readyz` while Redis is healthy: counters by outcome, the wait
//! histogram, bounded labels.

mod common;

use common::{Companion, RedisServer, config, now_ms};
use std::sync::Arc;
use tokengate_companion::Config;

#[tokio::test]
async fn metrics_count_lease_outcomes_commits_aborts_and_invalidations() {
    let redis = RedisServer::start();
    let config = Config {
        lock_ttl_ms: 30_000,
        lease_wait_ms: 20_000,
        ..config(&redis)
    };
    let companion = Arc::new(Companion::start(config).await);
    let (status, body) = companion.readiness().await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"status":"ready","redis":"healthy"}))
    );

    // acme: fetch, a waiter answered by the commit, then a hit.
    let lease_id = companion.lease_fetch("acme").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease("acme").await }
    });
    companion
        .wait_until_metric("tokengate_companion_leases_waiting", 1.0)
        .await;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok", now_ms() + 60_000)
            .await,
        204
    );
    waiter.await.unwrap();
    companion.lease("acme").await;
    // globex: fetch, abort, and an abort of a lock no longer held.
    let lease_id = companion.lease_fetch("globex").await;
    assert_eq!(companion.abort("globex", &lease_id).await, 204);
    assert_eq!(companion.abort("globex", &lease_id).await, 204);
    assert_eq!(companion.invalidate("acme", Some("other")).await, 204);

    let metrics = companion.metrics().await;
    assert_eq!(metrics.leases("fetch"), 2.0);
    assert_eq!(metrics.leases("waited_hit"), 1.0);
    assert_eq!(metrics.leases("hit"), 1.0);
    for outcome in [
        "waited_fetch",
        "lock_timeout",
        "degraded_fetch",
        "degraded_waited_hit",
        "degraded_refused",
        "error",
    ] {
        assert_eq!(metrics.leases(outcome), 0.0, "{outcome}");
    }
    let count = |family: &str, result: &str| {
        metrics.value(&format!(
            "tokengate_companion_{family}_total{{result=\"{result}\"}}"
        ))
    };
    assert_eq!(count("commits", "stored"), 1.0);
    assert_eq!(count("aborts", "released"), 1.0);
    assert_eq!(count("aborts", "not_held"), 1.0);
    assert_eq!(count("invalidations", "mismatch"), 1.0);
    assert_eq!(metrics.value("tokengate_companion_redis_healthy"), 1.0);
    assert_eq!(metrics.value("tokengate_companion_leases_waiting"), 0.0);

    // Four leases timed; the waiter's wait is in the sum.
    let histogram = "tokengate_companion_lease_wait_seconds";
    assert_eq!(metrics.value(&format!("{histogram}_count")), 4.0);
    assert_eq!(
        metrics.value(&format!("{histogram}_bucket{{le=\"+Inf\"}}")),
        4.0
    );
    assert!(metrics.value(&format!("{histogram}_sum")) > 0.0);

    // No tenant id, lease id or token in any series.
    for secret in ["acme", "globex", &lease_id.0, "tok\""] {
        assert!(!metrics.text.contains(secret), "{secret} in /metrics");
    }
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text_0_0_4() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let response = companion
        .http
        .get(format!("{}/metrics", companion.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = response.text().await.unwrap();
    assert!(text.contains("# TYPE tokengate_companion_leases_total counter\n"));
    assert!(text.contains("\ntokengate_companion_redis_healthy 1\n"));
}
