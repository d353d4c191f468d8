//! The native token API (`/auth/token`) against a real Redis and the stand-in Tenant
//! Service and Genesys login: the same lease, cache and lock as the filter's, with the
//! companion running core's fetch flow itself.

mod common;

use common::{
    Companion, ManualClock, RedisServer, error_of, now_ms, standins, token_api_config, token_of,
};
use std::sync::Arc;
use std::time::Duration;
use tokengate_companion::{Config, Listeners, SystemClock};
use tokengate_core::ErrorCode;
use tokengate_core::token_api::TokenSource;
use tokengate_tests::standins::{Endpoint, Fault};

const LOCK: &str = "tokengate:{genesys:acme}:lock";

#[tokio::test]
async fn a_post_is_fetched_fresh_then_served_from_the_cache() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let companion = Companion::start(token_api_config(&redis, &standins)).await;

    let response = companion
        .http
        .post(format!("{}/auth/token", companion.base))
        .header("x-request-id", "req-acme-1")
        .json(&serde_json::json!({"tenantId": "acme", "type": "genesys"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-acme-1");
    let first = token_of(response).await;
    assert_eq!(first.source, TokenSource::Fresh);
    assert_eq!(first.token_type, "Bearer");
    assert_eq!(
        standins.tokens_issued_to("acme"),
        vec![first.access_token.expose().to_owned()]
    );
    assert!(
        (86_390..=86_399).contains(&first.expires_in),
        "{}",
        first.expires_in
    );
    assert!(first.expires_at.ends_with('Z'), "{}", first.expires_at);
    // The login saw the region's login host, not the stand-in's address.
    assert_eq!(standins.wrong_host_calls(), 0);
    assert_eq!(standins.last_service_name().as_deref(), Some("tokengate"));

    let second = token_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!(second.source, TokenSource::Cache);
    assert_eq!(second.access_token, first.access_token);
    assert_eq!(standins.calls(Endpoint::Login), 1);
    assert_eq!(standins.calls(Endpoint::TenantService), 1);
    assert_eq!(redis.query::<i64>(&["EXISTS", LOCK]).await, 0);
}

#[tokio::test]
async fn force_refresh_fetches_a_new_token_that_replaces_the_cached_one() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let companion = Companion::start(token_api_config(&redis, &standins)).await;
    let first = token_of(companion.token("acme", "genesys", false).await).await;

    let forced = token_of(companion.token("acme", "genesys", true).await).await;
    assert_eq!(forced.source, TokenSource::Fresh);
    assert_ne!(forced.access_token, first.access_token);
    assert_eq!(standins.calls(Endpoint::Login), 2);

    let cached = token_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!(cached.source, TokenSource::Cache);
    assert_eq!(cached.access_token, forced.access_token);
}

#[tokio::test]
async fn a_client_looping_force_refresh_causes_one_login_call_per_interval() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let clock = ManualClock::at(now_ms());
    let config = Config {
        min_refresh_interval_ms: 10_000,
        ..token_api_config(&redis, &standins)
    };
    let companion = Companion::start_with(config, Some(clock.clone())).await;
    let first = token_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!(standins.calls(Endpoint::Login), 1);

    let mut answers = Vec::new();
    for _ in 0..10 {
        answers.push(token_of(companion.token("acme", "genesys", true).await).await);
        clock.advance(500);
    }
    assert_eq!(
        standins.calls(Endpoint::Login),
        2,
        "one fetch beyond the first"
    );
    assert_eq!(answers[0].source, TokenSource::Fresh);
    assert_ne!(answers[0].access_token, first.access_token);
    for answer in &answers[1..] {
        assert_eq!(
            answer.source,
            TokenSource::Cache,
            "served as a normal request"
        );
        assert_eq!(answer.access_token, answers[0].access_token);
    }
    // Another tenant has its own interval.
    let globex = token_of(companion.token("globex", "genesys", true).await).await;
    assert_eq!(globex.source, TokenSource::Fresh);
    assert_eq!(standins.calls(Endpoint::Login), 3);

    // 10 s after the admitted one (5 s went by in the loop), one more is admitted.
    clock.advance(4_999);
    let early = token_of(companion.token("acme", "genesys", true).await).await;
    assert_eq!(early.source, TokenSource::Cache);
    clock.advance(1);
    let later = token_of(companion.token("acme", "genesys", true).await).await;
    assert_eq!(later.source, TokenSource::Fresh);
    assert_ne!(later.access_token, answers[0].access_token);
    assert_eq!(standins.calls(Endpoint::Login), 4);
}

#[tokio::test]
async fn twenty_concurrent_posts_on_a_cold_tenant_make_one_login_call() {
    let redis = RedisServer::start();
    let standins = standins().await;
    // A slow login, so every request arrives while the fetch is running.
    standins.set_latency(Endpoint::Login, Duration::from_millis(300));
    let companion = Companion::start(token_api_config(&redis, &standins)).await;

    let requests: Vec<_> = (0..20)
        .map(|_| tokio::spawn(companion.token_at(&companion.base, "globex", "genesys", false)))
        .collect();
    let mut fresh = 0;
    let mut tokens = std::collections::BTreeSet::new();
    for request in requests {
        let response = token_of(request.await.unwrap()).await;
        fresh += usize::from(response.source == TokenSource::Fresh);
        tokens.insert(response.access_token.expose().to_owned());
    }
    assert_eq!(standins.calls(Endpoint::Login), 1);
    assert_eq!(standins.calls(Endpoint::TenantService), 1);
    assert_eq!(fresh, 1, "one request fetched, the others waited for it");
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        standins.wrong_host_calls(),
        0,
        "ap-south-1's login host was sent"
    );
}

#[tokio::test]
async fn a_tenant_without_credentials_is_404_credentials_not_found() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let companion = Companion::start(token_api_config(&redis, &standins)).await;

    let (status, error) = error_of(companion.token("wonka", "genesys", false).await).await;
    assert_eq!((status, error.code), (404, ErrorCode::CredentialsNotFound));
    assert_eq!(error.tenant_id.as_deref(), Some("wonka"));
    assert!(error.correlation_id.is_some());
    assert_eq!(
        standins.calls(Endpoint::TenantService),
        1,
        "404 is not retried"
    );
    assert_eq!(standins.calls(Endpoint::Login), 0);
    assert_eq!(
        redis
            .query::<i64>(&["EXISTS", "tokengate:{genesys:wonka}:lock"])
            .await,
        0,
        "the failed fetch aborted its lease"
    );
}

#[tokio::test]
async fn rejected_credentials_are_502_oauth_invalid_grant_after_one_call() {
    let redis = RedisServer::start();
    let standins = standins().await;
    standins.push_fault(Endpoint::Login, Fault::Status(401));
    let companion = Companion::start(token_api_config(&redis, &standins)).await;

    let (status, error) = error_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!((status, error.code), (502, ErrorCode::OauthInvalidGrant));
    assert_eq!(standins.calls(Endpoint::Login), 1, "never retried");
    assert_eq!(redis.query::<i64>(&["EXISTS", LOCK]).await, 0);
}

#[tokio::test]
async fn a_failing_tenant_service_is_retried_then_503() {
    let redis = RedisServer::start();
    let standins = standins().await;
    for _ in 0..3 {
        standins.push_fault(Endpoint::TenantService, Fault::Status(503));
    }
    let config = Config {
        tenant_service_retries: 2,
        ..token_api_config(&redis, &standins)
    };
    let companion = Companion::start(config).await;

    let (status, error) = error_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!(
        (status, error.code),
        (503, ErrorCode::TenantServiceUnavailable)
    );
    assert_eq!(standins.calls(Endpoint::TenantService), 3);
    let metrics = companion.metrics().await;
    assert_eq!(
        metrics.value(
            "tokengate_companion_upstream_requests_total{upstream=\"tenant_service\",outcome=\"server_error\"}"
        ),
        3.0
    );
    assert_eq!(
        metrics.value("tokengate_companion_token_requests_total{outcome=\"error\"}"),
        1.0
    );
}

#[tokio::test]
async fn bad_requests_are_400_invalid_request() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let companion = Companion::start(token_api_config(&redis, &standins)).await;
    let url = format!("{}/auth/token", companion.base);

    let (status, error) = error_of(companion.token("acme", "slack", false).await).await;
    assert_eq!((status, error.code), (400, ErrorCode::InvalidRequest));
    assert!(error.message.contains("slack"), "{}", error.message);
    for body in [
        r#"not json"#,
        r#"{"type":"genesys"}"#,
        r#"{"tenantId":"a/b","type":"genesys"}"#,
    ] {
        let response = companion.http.post(&url).body(body).send().await.unwrap();
        let (status, error) = error_of(response).await;
        assert_eq!(
            (status, error.code),
            (400, ErrorCode::InvalidRequest),
            "{body}"
        );
    }
    let response = companion
        .http
        .get(&url)
        .header("x-credential-type", "fax")
        .header("x-tenant-id", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, 400);
    let response = companion.http.delete(&url).send().await.unwrap();
    assert_eq!(error_of(response).await.0, 400);
    assert_eq!(standins.calls(Endpoint::TenantService), 0);
}

#[tokio::test]
async fn the_legacy_get_reads_tenant_and_type_from_headers() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let companion = Companion::start(token_api_config(&redis, &standins)).await;
    let url = format!("{}/auth/token", companion.base);
    let get = |tenant: &'static str, kind: Option<&'static str>| {
        let mut request = companion.http.get(&url).header("x-tenant-id", tenant);
        if let Some(kind) = kind {
            request = request.header("X-Credential-Type", kind);
        }
        async move { request.send().await.unwrap() }
    };

    let whatsapp = token_of(get("wonka", Some("whatsapp")).await).await;
    assert_eq!(whatsapp.access_token.expose(), "wa-wonka-token-d3e8");
    assert_eq!(whatsapp.source, TokenSource::Fresh);
    assert_eq!(
        standins.calls(Endpoint::Login),
        0,
        "WhatsApp needs no OAuth"
    );
    let again = token_of(get("wonka", Some("whatsapp")).await).await;
    assert_eq!(again.source, TokenSource::Cache);

    let genesys = token_of(get("acme", None).await).await;
    assert_eq!(
        standins.tokens_issued_to("acme"),
        vec![genesys.access_token.expose().to_owned()],
        "no type is Genesys"
    );
}

#[tokio::test]
async fn upstream_calls_are_counted_by_outcome_without_tenant_labels() {
    let redis = RedisServer::start();
    let standins = standins().await;
    standins.push_fault(Endpoint::Login, Fault::Status(503));
    let companion = Companion::start(token_api_config(&redis, &standins)).await;

    token_of(companion.token("acme", "genesys", false).await).await;
    token_of(companion.token("acme", "genesys", false).await).await;

    let metrics = companion.metrics().await;
    let calls = |upstream: &str, outcome: &str| {
        metrics.value(&format!(
            "tokengate_companion_upstream_requests_total{{upstream=\"{upstream}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(calls("tenant_service", "ok"), 1.0);
    assert_eq!(calls("oauth", "server_error"), 1.0);
    assert_eq!(calls("oauth", "ok"), 1.0);
    assert_eq!(calls("oauth", "no_response"), 0.0);
    assert_eq!(
        metrics.value(
            "tokengate_companion_upstream_request_seconds_count{upstream=\"oauth\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        metrics.value("tokengate_companion_token_requests_total{outcome=\"fresh\"}"),
        1.0
    );
    assert_eq!(
        metrics.value("tokengate_companion_token_requests_total{outcome=\"cache\"}"),
        1.0
    );
    assert!(!metrics.text.contains("acme"));
}

#[tokio::test]
async fn the_token_api_can_have_a_listener_of_its_own() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (api_base, token_base) = (
        format!("http://{}", api.local_addr().unwrap()),
        format!("http://{}", token_api.local_addr().unwrap()),
    );
    let config = token_api_config(&redis, &standins);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tokengate_companion::serve(
        Listeners {
            api,
            token_api: Some(token_api),
        },
        config,
        Arc::new(SystemClock),
        async move {
            let _ = stopped.await;
        },
    ));
    let http = reqwest::Client::new();
    let body = serde_json::json!({"tenantId": "acme", "type": "genesys"});

    let response = http
        .post(format!("{token_base}/auth/token"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(token_of(response).await.source, TokenSource::Fresh);
    let health = http
        .get(format!("{token_base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // Neither API is served on the other's listener.
    let lease = http
        .post(format!("{token_base}/v1/lease"))
        .json(&serde_json::json!({"provider": "genesys", "tenantId": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(lease).await.1.code, ErrorCode::NotFound);
    let token = http
        .post(format!("{api_base}/auth/token"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(token).await.1.code, ErrorCode::NotFound);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn without_a_tenant_service_the_token_api_is_off() {
    let redis = RedisServer::start();
    let companion = Companion::start(common::config(&redis)).await;
    let (status, error) = error_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!((status, error.code), (404, ErrorCode::NotFound));
}

#[tokio::test]
async fn without_redis_the_token_api_serves_in_degraded_mode() {
    let mut redis = RedisServer::start();
    let standins = standins().await;
    let config = Config {
        health_failure_threshold: 1,
        health_interval_ms: 50,
        ..token_api_config(&redis, &standins)
    };
    let companion = Companion::start(config).await;
    redis.kill();
    companion.wait_until_ready_is(503).await;

    let first = token_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!(first.source, TokenSource::Fresh);
    // Nothing is cached cluster-wide without Redis, but this process remembers the token
    // it fetched: the next request is answered from memory.
    let second = token_of(companion.token("acme", "genesys", false).await).await;
    assert_eq!(second.source, TokenSource::Cache);
    assert_eq!(second.access_token, first.access_token);
    // A forced refresh fetches again, within the limit.
    let forced = token_of(companion.token("acme", "genesys", true).await).await;
    assert_eq!(forced.source, TokenSource::Fresh);
    assert_eq!(standins.calls(Endpoint::Login), 2);
    let metrics = companion.metrics().await;
    assert_eq!(metrics.leases("degraded_fetch"), 2.0);
    assert_eq!(metrics.leases("degraded_hit"), 1.0);
    assert_eq!(
        metrics.value("tokengate_companion_commits_total{result=\"local\"}"),
        2.0
    );
}
