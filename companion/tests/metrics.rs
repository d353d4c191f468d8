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

#[tokio::test]
async fn a_token_replaced_with_most_of_its_life_left_counts_as_an_early_replacement() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let early = "tokengate_companion_early_replacements_total";

    // A forced lease fetches past the cached token; its commit replaces that token.
    let replace = async |token: &str, expires_in_ms: u64| {
        let lease_id = match companion.lease_forced("acme").await {
            tokengate_core::lease::LeaseResponse::Fetch { lease_id, .. } => lease_id,
            other => panic!("expected fetch, got {other:?}"),
        };
        let expires_at_ms = now_ms() + expires_in_ms;
        companion
            .commit("acme", &lease_id, token, expires_at_ms)
            .await
    };

    // A first token, and its successor fetched with 20 s of its life left (the refresh
    // window): not early.
    let lease_id = companion.lease_fetch("acme").await;
    let first_expiry = now_ms() + 20_000;
    let first = companion.commit("acme", &lease_id, "first", first_expiry);
    assert_eq!(first.await, 204);
    assert_eq!(replace("second", 3_600_000).await, 204);
    assert_eq!(companion.metrics().await.value(early), 0.0);

    // A third token while the second has nearly all its hour left: early.
    assert_eq!(replace("third", 3_600_000).await, 204);
    let metrics = companion.metrics().await;
    assert_eq!(metrics.value(early), 1.0);
    assert_eq!(
        metrics.value("tokengate_companion_commits_total{result=\"stored\"}"),
        3.0
    );
}
