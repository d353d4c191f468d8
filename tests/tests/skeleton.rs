//! The walking skeleton through real processes: Envoy running `tokengate.wasm`, the
//! companion and Redis, with stand-ins for the Tenant Service, the Genesys login and
//! the upstream app.

use futures::future::join_all;
use tokengate_tests::harness::Stack;
use tokengate_tests::standins::Endpoint;

/// What the echo upstream saw of one request.
struct Seen {
    status: u16,
    authorization: Option<String>,
}

async fn get(client: &reqwest::Client, stack: &Stack, tenant: &str) -> Seen {
    let response = client
        .get(format!("{}/api/conversations", stack.envoy.url()))
        .header("x-tenant-id", tenant)
        .send()
        .await
        .unwrap_or_else(|e| panic!("request through Envoy failed: {e}"));
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let authorization = body["headers"]["authorization"].as_str().map(str::to_owned);
    Seen {
        status,
        authorization,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_request_reaches_the_upstream_with_the_token_issued_for_it() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();

    let seen = get(&client, &stack, "acme").await;

    assert_eq!(seen.status, 200);
    let issued = stack.standins.tokens_issued_to("acme");
    assert_eq!(issued.len(), 1, "one token issued for acme");
    assert_eq!(seen.authorization, Some(format!("Bearer {}", issued[0])));
    assert_eq!(
        stack.standins.wrong_host_calls(),
        0,
        "the login saw the region's host"
    );
    assert_eq!(
        stack.standins.last_service_name().as_deref(),
        Some("tokengate")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_is_served_from_the_cache_without_callouts() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();

    let first = get(&client, &stack, "acme").await;
    let second = get(&client, &stack, "acme").await;

    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(second.authorization, first.authorization);
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 1);
    assert_eq!(stack.standins.calls(Endpoint::Login), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_cold_requests_make_one_oauth_call() {
    let stack = Stack::start().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_default();

    let seen = join_all((0..100).map(|_| get(&client, &stack, "globex"))).await;

    assert_eq!(
        stack.standins.calls(Endpoint::Login),
        1,
        "exactly one OAuth call"
    );
    assert_eq!(
        stack.standins.calls(Endpoint::TenantService),
        1,
        "exactly one Tenant Service call"
    );
    let issued = stack.standins.tokens_issued_to("globex");
    assert_eq!(issued.len(), 1);
    let expected = Some(format!("Bearer {}", issued[0]));
    let served = seen
        .iter()
        .filter(|s| s.status == 200 && s.authorization == expected)
        .count();
    assert_eq!(
        served, 100,
        "all 100 reached the upstream with the one token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_never_receive_each_others_token() {
    let stack = Stack::start().await;
    let client = reqwest::Client::new();

    let requests = (0..20).map(|i| {
        let tenant = if i % 2 == 0 { "acme" } else { "initech" };
        let client = &client;
        let stack = &stack;
        async move { (tenant, get(client, stack, tenant).await) }
    });
    let seen = join_all(requests).await;

    let acme = stack.standins.tokens_issued_to("acme");
    let initech = stack.standins.tokens_issued_to("initech");
    assert_eq!((acme.len(), initech.len()), (1, 1));
    assert_ne!(acme[0], initech[0]);
    for (tenant, seen) in seen {
        let own = if tenant == "acme" {
            &acme[0]
        } else {
            &initech[0]
        };
        assert_eq!(seen.status, 200);
        assert_eq!(
            seen.authorization,
            Some(format!("Bearer {own}")),
            "{tenant} got its own token"
        );
    }
}
