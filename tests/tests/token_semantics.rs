//! The seeds' token semantics through real Envoy, one case per error class: each proves
//! the wiring (Envoy callouts, their timeouts and headers, the retry settings, the
//! errors' statuses and JSON bodies), WhatsApp tokens, and endpoint mode (the original
//! `/auth/token` API). The retry and backoff rules themselves are unit-tested in
//! `core/tests/flow.rs` and the worker's in `plugin/tests/worker.rs`, on driven clocks.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokengate_tests::harness::{Envoy, Stack, wait_until};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::{Endpoint, Fault};

/// Short timeouts so timeout cases run in well under a second per attempt.
fn fast_timeouts() -> Value {
    json!({ "tenantService": { "timeoutMs": 400 }, "genesys": { "timeoutMs": 400, "loginClusterPattern": "genesys_login" } })
}

async fn stack_with(overrides: Value) -> Stack {
    let mut config = Envoy::filter_config_with(fast_timeouts());
    if let (Value::Object(config), Value::Object(overrides)) = (&mut config, overrides) {
        config.extend(overrides);
    }
    Stack::start_with(config, 2).await
}

/// Status, JSON body and what the upstream saw as `authorization`, for one request.
struct Answer {
    status: u16,
    body: Value,
}

impl Answer {
    fn upstream_authorization(&self) -> Option<&str> {
        self.body["headers"]["authorization"].as_str()
    }
}

async fn inject(stack: &Stack, tenant: &str) -> Answer {
    let response = reqwest::Client::new()
        .get(format!("{}/api/conversations", stack.envoy.url()))
        .header("x-tenant-id", tenant)
        .header("x-request-id", format!("req-{tenant}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let received = receive(response).await;
    Answer {
        status: received.status,
        body: received.json(),
    }
}

fn bearer_of(stack: &Stack, tenant: &str) -> String {
    let issued = stack.standins.tokens_issued_to(tenant);
    assert_eq!(issued.len(), 1, "one token issued to {tenant}: {issued:?}");
    format!("Bearer {}", issued[0])
}

fn assert_error(answer: &Answer, status: u16, code: &str, tenant: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["code"], code, "{}", answer.body);
    assert_eq!(answer.body["tenantId"], tenant);
    assert_eq!(answer.body["correlationId"], format!("req-{tenant}"));
    assert!(
        answer.body["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_service_5xx_is_retried_through_envoy() {
    let stack = stack_with(json!({})).await;
    stack
        .standins
        .push_fault(Endpoint::TenantService, Fault::Status(503));

    let answer = inject(&stack, "acme").await;

    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.upstream_authorization(),
        Some(bearer_of(&stack, "acme").as_str())
    );
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_service_that_keeps_failing_is_a_503_after_the_configured_retries() {
    let stack = stack_with(json!({ "tenantService": { "timeoutMs": 400, "retries": 1 } })).await;
    stack
        .standins
        .push_fault(Endpoint::TenantService, Fault::Status(500));
    stack
        .standins
        .push_fault(Endpoint::TenantService, Fault::Hang);

    let answer = inject(&stack, "acme").await;

    assert_error(&answer, 503, "TENANT_SERVICE_UNAVAILABLE", "acme");
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 2);
    assert_eq!(stack.standins.calls(Endpoint::Login), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_service_404_is_credentials_not_found_after_one_call() {
    let stack = stack_with(json!({})).await;

    let answer = inject(&stack, "nobody").await;

    assert_error(&answer, 404, "CREDENTIALS_NOT_FOUND", "nobody");
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_without_a_secret_or_with_an_unknown_region_never_reach_the_login() {
    let stack = stack_with(json!({})).await;

    let no_secret = inject(&stack, "tyrell").await;
    let unknown_region = inject(&stack, "lostco").await;

    assert_error(&no_secret, 404, "CREDENTIALS_NOT_FOUND", "tyrell");
    assert_error(&unknown_region, 502, "UNKNOWN_REGION", "lostco");
    assert!(
        unknown_region.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("ap-south-1")
    );
    assert_eq!(stack.standins.calls(Endpoint::Login), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_401_is_invalid_grant_after_exactly_one_call() {
    let stack = stack_with(json!({})).await;
    stack
        .standins
        .push_fault(Endpoint::Login, Fault::Status(401));

    let answer = inject(&stack, "acme").await;

    assert_error(&answer, 502, "OAUTH_INVALID_GRANT", "acme");
    assert_eq!(stack.standins.calls(Endpoint::Login), 1);

    // The failed fetch released the cluster-wide lock: the next request is answered at
    // once instead of waiting out the lock, from memory (negative caching), the same.
    let started = Instant::now();
    let retry = inject(&stack, "acme").await;
    assert_error(&retry, 502, "OAUTH_INVALID_GRANT", "acme");
    assert_eq!(retry.body["message"], answer.body["message"]);
    assert_eq!(stack.standins.calls(Endpoint::Login), 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no wait for a stale lock: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_timeout_then_success_serves_the_token() {
    let stack = stack_with(json!({})).await;
    stack.standins.push_fault(Endpoint::Login, Fault::Hang);

    let answer = inject(&stack, "acme").await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.upstream_authorization(),
        Some(bearer_of(&stack, "acme").as_str())
    );
    assert_eq!(stack.standins.calls(Endpoint::Login), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_provider_that_keeps_failing_is_exchange_failed_after_the_configured_retries() {
    let stack = stack_with(json!({
        "genesys": { "timeoutMs": 400, "loginClusterPattern": "genesys_login", "retries": 0 }
    }))
    .await;
    stack
        .standins
        .push_fault(Endpoint::Login, Fault::Status(503));

    let answer = inject(&stack, "acme").await;

    assert_error(&answer, 502, "OAUTH_EXCHANGE_FAILED", "acme");
    assert_eq!(stack.standins.calls(Endpoint::Login), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_of_a_429_is_honoured() {
    let stack = stack_with(json!({})).await;
    stack.standins.push_fault(
        Endpoint::Login,
        Fault::TooManyRequests {
            retry_after_secs: Some(2),
        },
    );

    let started = Instant::now();
    let answer = inject(&stack, "acme").await;
    let elapsed = started.elapsed();

    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        elapsed >= Duration::from_millis(2000),
        "Retry-After: 2 was waited: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backoff_does_not_hold_up_other_requests_of_the_worker() {
    let mut config = Envoy::filter_config_with(fast_timeouts());
    config["expiryMarginMs"] = json!(0);
    let stack = Stack::start_with(config, 1).await;
    stack
        .standins
        .push_fault(Endpoint::Login, Fault::RateLimited);

    let stack = std::sync::Arc::new(stack);
    let slow = tokio::spawn({
        let stack = std::sync::Arc::clone(&stack);
        async move { inject(&stack, "acme").await.status }
    });
    wait_until("acme's first login call", Duration::from_secs(5), || {
        stack.standins.calls(Endpoint::Login) > 0
    })
    .await;
    let other = inject(&stack, "initech").await;

    assert_eq!(other.status, 200);
    assert!(
        !slow.is_finished(),
        "initech was served while acme's fetch still backed off"
    );
    assert_eq!(slow.await.ok(), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_tenant_id_is_a_400_before_any_callout() {
    let stack = stack_with(json!({})).await;

    let response = reqwest::Client::new()
        .get(format!("{}/x", stack.envoy.url()))
        .header("x-tenant-id", "acme:admin")
        .header("x-request-id", "req-bad")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let received = receive(response).await;
    assert_eq!(received.status, 400);
    let body: Value = received.json();
    assert_eq!(
        (body["code"].as_str(), body["correlationId"].as_str()),
        (Some("INVALID_REQUEST"), Some("req-bad"))
    );
    assert_eq!(
        stack.standins.calls(Endpoint::TenantService) + stack.standins.calls(Endpoint::Echo),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_header_that_is_not_utf8_is_a_400_and_the_filter_keeps_working() {
    let stack = Stack::start_with(Envoy::filter_config_with(fast_timeouts()), 1).await;
    let client = reqwest::Client::new();

    let tenant =
        reqwest::header::HeaderValue::from_bytes(b"acme\xff").unwrap_or_else(|e| panic!("{e}"));
    let response = client
        .get(format!("{}/x", stack.envoy.url()))
        .header("x-tenant-id", tenant)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let received = receive(response).await;
    assert_eq!(received.status, 400);
    let body: Value = received.json();
    assert_eq!(body["code"], "INVALID_REQUEST");

    let after = inject(&stack, "acme").await;
    assert_eq!(after.status, 200, "the Wasm VM survived: {}", after.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_tokens_are_read_from_any_of_their_shapes_and_injected() {
    let stack = stack_with(json!({ "provider": "whatsapp" })).await;

    for (tenant, token) in [
        ("acme", "wa-acme-token-51d2"),
        ("globex", "wa-globex-token-c4a7"),
        ("umbrella", "wa-umbrella-token-88c0"),
    ] {
        let answer = inject(&stack, tenant).await;
        assert_eq!(answer.status, 200, "{tenant}: {}", answer.body);
        assert_eq!(
            answer.upstream_authorization(),
            Some(format!("Bearer {token}").as_str())
        );
    }
    let again = inject(&stack, "acme").await;
    assert_eq!(again.status, 200);

    assert_eq!(
        stack.standins.calls(Endpoint::TenantService),
        3,
        "the repeat came from the cache"
    );
    assert_eq!(
        stack.standins.calls(Endpoint::Login),
        0,
        "WhatsApp needs no OAuth exchange"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_token_inside_its_safety_buffer_is_served_but_not_cached() {
    // globex's token expires in 2099: a buffer longer than that leaves no lifetime.
    let stack = stack_with(
        json!({ "provider": "whatsapp", "whatsapp": { "safetyBufferSecs": 10_000_000_000u64 } }),
    )
    .await;

    let first = inject(&stack, "globex").await;
    let second = inject(&stack, "globex").await;

    for answer in [&first, &second] {
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(
            answer.upstream_authorization(),
            Some("Bearer wa-globex-token-c4a7")
        );
    }
    assert_eq!(
        stack.standins.calls(Endpoint::TenantService),
        2,
        "nothing was cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_line_per_fetched_token_and_no_secret_in_the_log() {
    let stack = stack_with(json!({})).await;

    let answer = inject(&stack, "acme").await;
    assert_eq!(answer.status, 200);

    let token = stack.standins.tokens_issued_to("acme").remove(0);
    let log = stack.envoy.process.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("token request genesys:acme source=fresh"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("correlation_id=req-acme") && lines[0].contains("duration_ms="),
        "{}",
        lines[0]
    );
    for secret in ["acme-secret-7f3a9c", token.as_str()] {
        assert!(!log.contains(secret), "the Envoy log shows a secret");
        assert!(
            !stack.companion.process.log_text().contains(secret),
            "the companion log shows a secret"
        );
    }
}

mod endpoint_mode {
    use super::*;

    async fn endpoint_stack() -> Stack {
        stack_with(json!({ "mode": "endpoint" })).await
    }

    async fn post(stack: &Stack, body: &str) -> Answer {
        let response = reqwest::Client::new()
            .post(format!("{}/auth/token", stack.envoy.url()))
            .header("content-type", "application/json")
            .header("x-request-id", "req-endpoint")
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let received = receive(response).await;
        Answer {
            status: received.status,
            body: received.json(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn post_auth_token_answers_a_token_response_then_from_the_cache() {
        let stack = endpoint_stack().await;

        let fresh = post(&stack, r#"{"tenantId":"acme","type":"genesys"}"#).await;
        let cached = post(&stack, r#"{"tenantId":"acme","type":"genesys"}"#).await;

        assert_eq!(fresh.status, 200, "{}", fresh.body);
        let token = stack.standins.tokens_issued_to("acme").remove(0);
        assert_eq!(fresh.body["accessToken"], token.as_str());
        assert_eq!(fresh.body["tokenType"], "Bearer");
        assert_eq!(fresh.body["source"], "fresh");
        let expires_in = fresh.body["expiresIn"].as_i64().unwrap_or_default();
        assert!((86_390..=86_399).contains(&expires_in), "{expires_in}");
        let expires_at = fresh.body["expiresAt"].as_str().unwrap_or_default();
        assert!(
            expires_at.len() == 24 && expires_at.ends_with('Z'),
            "{expires_at}"
        );
        assert_eq!(
            (
                cached.body["source"].as_str(),
                cached.body["accessToken"].as_str()
            ),
            (Some("cache"), Some(token.as_str()))
        );
        assert_eq!(stack.standins.calls(Endpoint::Login), 1);
        assert_eq!(
            stack.standins.calls(Endpoint::Echo),
            0,
            "the gateway answered itself"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn force_refresh_skips_the_caches_and_fetches_a_new_token() {
        let stack = endpoint_stack().await;

        let first = post(&stack, r#"{"tenantId":"acme","type":"genesys"}"#).await;
        let forced = post(
            &stack,
            r#"{"tenantId":"acme","type":"genesys","forceRefresh":true}"#,
        )
        .await;
        let after = post(&stack, r#"{"tenantId":"acme","type":"genesys"}"#).await;

        assert_eq!((first.status, forced.status), (200, 200), "{}", forced.body);
        assert_eq!(stack.standins.calls(Endpoint::Login), 2);
        assert_eq!(forced.body["source"], "fresh");
        assert_ne!(forced.body["accessToken"], first.body["accessToken"]);
        assert_eq!(
            after.body["accessToken"], forced.body["accessToken"],
            "the refreshed token replaced the cached one"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forced_refreshes_are_rate_limited_like_purges() {
        let stack = endpoint_stack().await;
        let forced = r#"{"tenantId":"acme","type":"genesys","forceRefresh":true}"#;

        let first = post(&stack, forced).await;
        let again = post(&stack, forced).await;
        let third = post(&stack, forced).await;

        assert_eq!((first.status, again.status, third.status), (200, 200, 200));
        assert_eq!(
            stack.standins.calls(Endpoint::Login),
            1,
            "one forced fetch per purge.minIntervalMs"
        );
        assert_eq!(
            (again.body["source"].as_str(), third.body["source"].as_str()),
            (Some("cache"), Some("cache"))
        );
        assert_eq!(again.body["accessToken"], first.body["accessToken"]);
        assert_eq!(stack.envoy.stat("tokengate.purge_suppressed").await, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn legacy_get_takes_the_type_from_x_credential_type() {
        let stack = endpoint_stack().await;

        let response = reqwest::Client::new()
            .get(format!("{}/auth/token", stack.envoy.url()))
            .header("x-tenant-id", "wonka")
            .header("x-credential-type", "whatsapp")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let received = receive(response).await;

        assert_eq!(received.status, 200);
        let body: Value = received.json();
        assert_eq!(body["accessToken"], "wa-wonka-token-d3e8");
        assert_eq!(body["source"], "fresh");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_token_requests_get_clear_errors_without_callouts() {
        let stack = endpoint_stack().await;

        let unknown_type = post(&stack, r#"{"tenantId":"acme","type":"slack"}"#).await;
        let not_json = post(&stack, "tenantId=acme").await;
        let no_tenant = post(&stack, r#"{"type":"genesys"}"#).await;
        let not_found = reqwest::Client::new()
            .get(format!("{}/auth/other", stack.envoy.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        for answer in [&unknown_type, &not_json, &no_tenant] {
            assert_eq!(
                (answer.status, answer.body["code"].as_str()),
                (400, Some("INVALID_REQUEST")),
                "{}",
                answer.body
            );
            assert_eq!(answer.body["correlationId"], "req-endpoint");
        }
        assert!(
            unknown_type.body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("must be one of 'genesys', 'whatsapp'")
        );
        assert_eq!(not_found.status().as_u16(), 404);
        assert_eq!(stack.standins.calls(Endpoint::TenantService), 0);
    }
}
