//! Bad requests, unknown routes and a Redis that goes away: every failure is a JSON
//! error body with the status of its code.

mod common;

use common::{Companion, RedisServer, assert_hit, config, config_for, error_of, free_port, now_ms};
use std::time::{Duration, Instant};
use tokengate_companion::Config;
use tokengate_core::ErrorCode;
use tokengate_core::lease::{ABORT_PATH, LEASE_PATH, LeaseId};

#[tokio::test]
async fn malformed_lease_bodies_answer_invalid_request_json() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let url = format!("{}{LEASE_PATH}", companion.base);

    let cases: [(&str, Option<&str>, &str); 5] = [
        ("not json", Some("application/json"), "JSON"),
        // Any provider name leases (the filter fetches for its own providers), but only
        // a name.
        (
            r#"{"provider":"Slack Bot","tenantId":"acme"}"#,
            Some("application/json"),
            "Slack Bot",
        ),
        (
            r#"{"provider":"genesys","tenantId":"a:b"}"#,
            Some("application/json"),
            "tenant id",
        ),
        (
            r#"{"provider":"genesys"}"#,
            Some("application/json"),
            "tenantId",
        ),
        (
            r#"{"provider":"genesys","tenantId":"acme"}"#,
            None,
            "Content-Type",
        ),
    ];
    for (body, content_type, mentions) in cases {
        let mut request = companion.http.post(&url).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let (status, error) = error_of(request.send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(error.code, ErrorCode::InvalidRequest, "{body}");
        assert!(
            error.message.contains(mentions),
            "{body}: {}",
            error.message
        );
    }
}

#[tokio::test]
async fn an_empty_token_is_not_committed() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let lease_id = companion.lease_fetch("acme").await;

    assert_eq!(
        companion
            .commit("acme", &lease_id, "", now_ms() + 60_000)
            .await,
        400
    );
}

#[tokio::test]
async fn an_expiry_beyond_what_redis_scripts_hold_exactly_is_refused() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let lease_id = companion.lease_fetch("acme").await;

    assert_eq!(
        companion.commit("acme", &lease_id, "tok", u64::MAX).await,
        400
    );
    assert_eq!(
        companion.commit("acme", &lease_id, "tok", 1 << 53).await,
        204
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json_and_health_is_ok() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;

    let response = companion
        .http
        .get(format!("{}/nope", companion.base))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code), (404, ErrorCode::NotFound));

    let response = companion
        .http
        .get(format!("{}{LEASE_PATH}", companion.base))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!((status, error.code), (400, ErrorCode::InvalidRequest));
    assert!(error.message.contains("GET"), "{}", error.message);

    let response = companion
        .http
        .get(format!("{}/healthz", companion.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, serde_json::json!({"status":"ok"}));
}

/// A configuration whose health verdict never turns unhealthy in these tests, so they
/// see what callers get before the failure threshold is reached (degraded mode is
/// tested in `degraded.rs`).
fn without_degraded_mode(config: Config) -> Config {
    Config {
        health_failure_threshold: 1_000,
        ..config
    }
}

/// Redis dies under a lease: the next leases are served without it at once (before the
/// health verdict turns), the lease's commit keeps its token in memory for the key's
/// leases, and only what cannot do without Redis (releasing its lock) answers 503.
#[tokio::test]
async fn redis_going_down_serves_leases_without_it_at_once_and_recovers() {
    let mut redis = RedisServer::start();
    let companion = Companion::start(without_degraded_mode(config(&redis))).await;
    let lease_id = companion.lease_fetch("acme").await;

    redis.kill();
    let started = Instant::now();
    let local = companion.lease_fetch("globex").await;
    assert!(local.0.starts_with("local-"), "{local:?}");
    // Bounded by the 500 ms Redis timeout (plus slack), not by reconnect retries.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok", expires_at_ms)
            .await,
        204
    );
    assert_hit(&companion.lease("acme").await, "tok", expires_at_ms);
    let abort = serde_json::json!({"provider": "genesys", "tenantId": "acme", "leaseId": lease_id});
    let (status, error) = error_of(companion.post(ABORT_PATH, &abort).await).await;
    assert_eq!((status, error.code), (503, ErrorCode::CacheUnavailable));
    assert_eq!(error.tenant_id.as_deref(), Some("acme"));
    assert!(
        !error.message.to_lowercase().contains("io error"),
        "{}",
        error.message
    );
    let metrics = companion.metrics().await;
    assert_eq!(metrics.leases("degraded_hit"), 1.0);
    assert_eq!(metrics.value("tokengate_companion_redis_healthy"), 1.0);

    // Redis comes back on the same port (empty): the companion reconnects by itself.
    let _redis = RedisServer::start_on(redis.port).expect("redis restarts on its port");
    lease_until_redis_answers(&companion, "initech").await;
}

#[tokio::test]
async fn the_companion_starts_without_redis_and_serves_once_it_is_up() {
    let port = free_port();
    let config = config_for(format!("redis://127.0.0.1:{port}"));
    let companion = Companion::start(without_degraded_mode(config)).await;

    let local = companion.lease_fetch("acme").await;
    assert!(local.0.starts_with("local-"), "{local:?}");
    assert_eq!(companion.abort("acme", &local).await, 204);

    let _redis = RedisServer::start_on(port).expect("redis starts on the free port");
    let lease_id = lease_until_redis_answers(&companion, "acme").await;
    assert_eq!(companion.abort("acme", &lease_id).await, 204);
}

#[tokio::test]
async fn an_invalid_configuration_stops_run_with_a_message() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        lease_wait_ms: 2_000,
        recheck_interval_ms: 3_000,
        ..Config::default()
    };
    let error = tokengate_companion::run(listener, config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("--recheck-interval-ms"),
        "{error}"
    );
}

/// Leases `tenant` until Redis answers (a fetch holding the Redis lock, not a
/// degraded-mode one) while it reconnects, for up to 10 s; the Redis lease id.
async fn lease_until_redis_answers(companion: &Companion, tenant: &str) -> LeaseId {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lease_id = companion.lease_fetch(tenant).await;
        if !lease_id.0.starts_with("local-") {
            return lease_id;
        }
        assert_eq!(companion.abort(tenant, &lease_id).await, 204);
        assert!(
            Instant::now() < deadline,
            "redis never came back for the companion"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
