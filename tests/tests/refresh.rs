//! Refresh-ahead and expiry through real Envoy. Envoy's clock cannot be driven, and no
//! token is due for refresh or stale on arrival (the refresh window is at most half a
//! token's life, the expiry margin at most a quarter), so the tests use tokens of a few
//! seconds and wait, on the wall clock, for the moment under test; the timing rules
//! themselves are unit-tested on the fake host (`plugin/tests/worker.rs`).

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::json;
use tokengate_tests::harness::{Cluster, Envoy, Stack, eventually};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::Endpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_the_refresh_window_is_served_at_once_and_starts_one_refresh() {
    // The window asked for is two minutes, the margin 5 s; an 8 s token cuts them to
    // half and a quarter of its life: served until 6 s, refreshed between 4 and 5 s.
    let config = Envoy::filter_config_with(json!({
        "refreshAhead": { "percent": 0, "minLeadMs": 120_000 }
    }));
    let stack = Stack::start_with(config, 2).await;
    stack.standins.set_expires_in(8);
    let issued = Instant::now();
    let first = stack.get("/api", "acme").await;
    let first_token = stack.bearers("acme").remove(0);
    assert_eq!(first.authorization.as_deref(), Some(first_token.as_str()));
    // Its successor lives an hour: outside the window, so it starts no refresh itself.
    stack.standins.set_expires_in(3_600);
    // Not due on arrival: served from the cache, no refresh.
    let early = stack.get("/api", "acme").await;
    assert_eq!(early.authorization.as_deref(), Some(first_token.as_str()));
    assert_eq!(stack.standins.calls(Endpoint::Login), 1);

    tokio::time::sleep_until((issued + Duration::from_millis(5_200)).into()).await;
    let near_expiry = join_all((0..10).map(|_| stack.get("/api", "acme"))).await;

    eventually(
        "the background refresh",
        Duration::from_secs(5),
        // The login counts a call on arrival and records its token when it answers.
        async || stack.bearers("acme").len() == 2,
    )
    .await;
    let refreshed = stack.bearers("acme").remove(1);
    // The login records a token as it answers; the refresh ends when the gateway has
    // cached it.
    eventually("the refresh ends", Duration::from_secs(5), async || {
        stack.envoy.stat("tokengate.fetch_succeeded").await == 2
    })
    .await;
    // Each request got the old token, or the new one if the refresh (a few ms on
    // loopback) finished while the burst was still arriving: none waited for a fetch.
    for answer in &near_expiry {
        assert_eq!(answer.status, 200);
        let token = answer.authorization.as_deref();
        assert!(
            token == Some(first_token.as_str()) || token == Some(refreshed.as_str()),
            "{token:?}"
        );
    }
    assert!(
        near_expiry
            .iter()
            .any(|answer| answer.authorization.as_deref() == Some(first_token.as_str())),
        "the old token was served while the refresh ran"
    );
    let after = stack.get("/api", "acme").await;
    assert_eq!(after.authorization.as_deref(), Some(refreshed.as_str()));
    assert_eq!(
        stack.standins.calls(Endpoint::Login),
        2,
        "exactly one refresh"
    );
    // Counted per worker that started one; the second of two racing workers is
    // collapsed by the marker or the companion, as the login count shows.
    let runs = stack.envoy.stat("tokengate.refresh_ahead").await;
    assert!((1..=2).contains(&runs), "{runs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_token_inside_the_expiry_margin_is_never_injected() {
    // Tokens live 2 s and the margin asked is 2 s: it is cut to a quarter of the life,
    // so a cached token serves for 1.5 s (the margin does not swallow it), not after.
    let config = Envoy::filter_config_with(json!({
        "expiryMarginMs": 2_000,
        "refreshAhead": { "percent": 0, "minLeadMs": 2_001 }
    }));
    let stack = Stack::start_with(config, 2).await;
    stack.standins.set_expires_in(2);

    let issued_at = Instant::now();
    let first = stack.get("/api", "acme").await;
    let again = stack.get("/api", "acme").await;
    tokio::time::sleep_until((issued_at + Duration::from_millis(1_600)).into()).await;
    let later = stack.get("/api", "acme").await;

    let issued = stack.bearers("acme");
    assert_eq!(first.authorization.as_deref(), Some(issued[0].as_str()));
    assert_eq!(again.authorization.as_deref(), Some(issued[0].as_str()));
    assert_eq!(issued.len(), 2, "the token inside the margin was replaced");
    assert_eq!(later.authorization.as_deref(), Some(issued[1].as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_the_companion_holds_inside_the_expiry_margin_is_not_injected() {
    let config = Envoy::filter_config_with(json!({
        "expiryMarginMs": 3000,
        "refreshAhead": { "percent": 0, "minLeadMs": 3001 }
    }));
    let cluster = Cluster::start(2, 1, 1, &config, &[]).await;
    // Tokens live 2 s: any cached one is inside the 3 s margin.
    cluster.standins.set_expires_in(2);
    let get = async |envoy: &Envoy| {
        let response = reqwest::Client::new()
            .get(format!("{}/api", envoy.url()))
            .header("x-tenant-id", "acme")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        receive(response).await.json()["headers"]["authorization"]
            .as_str()
            .map(str::to_owned)
    };

    let first = get(&cluster.envoys[0]).await;
    // The companion now holds that token, valid for 2 s more, which it would hand out;
    // the second Envoy must ask for one that outlives its margin instead.
    let second = get(&cluster.envoys[1]).await;

    let issued = cluster.standins.tokens_issued_to("acme");
    assert_eq!(issued.len(), 2, "the second Envoy had a new token fetched");
    assert_eq!(first, Some(format!("Bearer {}", issued[0])));
    assert_eq!(second, Some(format!("Bearer {}", issued[1])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_started_by_hits_on_an_envoy_that_then_goes_quiet_finishes_on_its_own() {
    // Two Envoys of one worker each, one companion. Envoy 2 serves hits inside the
    // refresh window of a short-lived token until one of them starts a refresh-ahead,
    // then receives nothing. The refresh (lease, Tenant Service, a slow login, commit)
    // must finish without traffic: Envoy 1 is then served the new token from the
    // companion's cache at once, with no login call of its own; and no request, on
    // either Envoy, is ever given a token the login considers expired.
    let config = Envoy::filter_config_with(json!({
        "expiryMarginMs": 1_000,
        "refreshAhead": { "percent": 50, "minLeadMs": 1_001 },
        "fetchDeadlineMs": 5_000
    }));
    let cluster = Cluster::start(2, 1, 1, &config, &[]).await;
    let (envoy_1, envoy_2) = (&cluster.envoys[0], &cluster.envoys[1]);
    let standins = &cluster.standins;
    // Every answer's token must still be valid for the login when the answer arrives.
    let unexpired = |answer: &tokengate_tests::harness::Answer| {
        assert_eq!(answer.status, 200, "{}", answer.body);
        let token = answer
            .authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_else(|| panic!("no token: {}", answer.body));
        let expiry = standins
            .token_expiry(token)
            .unwrap_or_else(|| panic!("{token} was not issued by the login"));
        assert!(
            Instant::now() < expiry,
            "{token} was injected {:?} after the login's expiry",
            Instant::now() - expiry
        );
        token.to_owned()
    };

    // Generation 1 lives 8 s: its refresh window is its last 4 s, and its refresh is
    // due 4 to 6 s after it was issued.
    standins.set_expires_in(8);
    let first = unexpired(&envoy_2.get("/api", "acme").await);
    // Generation 2 lives longer, and its login answers slowly: the refresh is still
    // under way when Envoy 2's last request has been served.
    standins.set_expires_in(20);
    standins.set_latency(Endpoint::Login, Duration::from_millis(500));
    let mut hits = 0;
    eventually(
        "a hit starts the refresh",
        Duration::from_secs(10),
        async || {
            assert_eq!(unexpired(&envoy_2.get("/api", "acme").await), first);
            hits += 1;
            envoy_2.stat("tokengate.refresh_ahead").await >= 1
        },
    )
    .await;
    let quiet_since = Instant::now();

    // Nothing reaches Envoy 2 from here on.
    eventually(
        "the refresh's login call",
        Duration::from_secs(3),
        async || standins.tokens_issued_to("acme").len() == 2,
    )
    .await;
    let second = standins.tokens_issued_to("acme").remove(1);
    eventually(
        "Envoy 2's refresh is committed",
        Duration::from_secs(3),
        async || envoy_2.stat("tokengate.fetch_succeeded").await == 2,
    )
    .await;
    let refreshed_after_quiet = quiet_since.elapsed();
    let asked = Instant::now();
    let served = envoy_1.get("/api", "acme").await;
    let waited = asked.elapsed();
    println!(
        "the refresh ended {refreshed_after_quiet:?} after Envoy 2's last request (login \
         latency 500 ms); Envoy 1 was served in {waited:?}"
    );
    assert_eq!(
        unexpired(&served),
        second,
        "Envoy 1 got the refreshed token"
    );
    assert!(
        waited < Duration::from_secs(2),
        "Envoy 1 waited {waited:?} for a refresh that Envoy 2 started {:?} earlier",
        asked - quiet_since
    );
    assert_eq!(
        envoy_1.stat("tokengate.cluster_cache_hit").await,
        1,
        "served from the companion's cache"
    );

    // Envoy 2 is asked again only once generation 1 has expired: its cache holds the
    // successor, whose life was counted from when its login call was sent.
    let first_expiry = standins
        .token_expiry(&first)
        .unwrap_or_else(|| panic!("{first}"));
    tokio::time::sleep_until((first_expiry + Duration::from_millis(200)).into()).await;
    assert_eq!(unexpired(&envoy_2.get("/api", "acme").await), second);
    assert_eq!(
        standins.calls(Endpoint::Login),
        2,
        "one login call per token generation ({hits} hits on Envoy 2)"
    );
}
