//! The walking skeleton through real processes: Envoy running `tokengate.wasm`, the
//! companion and Redis, with stand-ins for the Tenant Service, the Genesys login and
//! the upstream app.

use futures::future::join_all;
use tokengate_tests::harness::Stack;
use tokengate_tests::standins::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_request_reaches_the_upstream_with_the_token_issued_for_it() {
    let stack = Stack::start().await;

    let seen = stack.get("/api/conversations", "acme").await;

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

    let first = stack.get("/api/conversations", "acme").await;
    let second = stack.get("/api/conversations", "acme").await;

    assert_eq!((first.status, second.status), (200, 200));
    assert_eq!(second.authorization, first.authorization);
    assert_eq!(stack.standins.calls(Endpoint::TenantService), 1);
    assert_eq!(stack.standins.calls(Endpoint::Login), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_cold_requests_make_one_oauth_call() {
    let stack = Stack::start().await;

    let seen = join_all((0..100).map(|_| stack.get("/api/conversations", "globex"))).await;

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

    let requests = (0..20).map(|i| {
        let tenant = if i % 2 == 0 { "acme" } else { "initech" };
        let stack = &stack;
        async move { (tenant, stack.get("/api/conversations", tenant).await) }
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
