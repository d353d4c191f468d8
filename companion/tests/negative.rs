//! Negative caching against a real Redis: a fetch that failed with rejected or missing
//! credentials answers every lease of its key with the same error for
//! `--negative-cache-ms`, across companions and in degraded mode, without a new fetch;
//! other failures never do; a forced lease and an invalidation clear it.

mod common;

use common::{
    Companion, RedisServer, config, error_of, standins, token_api_config, wait_until_a_lease_waits,
    wait_until_subscribed,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokengate_companion::Config;
use tokengate_core::ErrorCode;
use tokengate_core::lease::{FetchFailure, LeaseResponse};
use tokengate_tests::standins::{Endpoint, Fault};

const FAILURE: &str = "tokengate:{genesys:acme}:failure";

fn rejected() -> FetchFailure {
    FetchFailure {
        code: ErrorCode::OauthInvalidGrant,
        message: "Genesys rejected the OAuth credentials of tenant acme: invalid_client".into(),
    }
}

fn with_negative_cache(config: Config, negative_cache_ms: u64) -> Config {
    Config {
        negative_cache_ms,
        ..config
    }
}

/// Leases acme and expects the cached rejection: `502 OAUTH_INVALID_GRANT`, its message.
async fn assert_rejection_answered(companion: &Companion) {
    let (status, body) = error_of(companion.lease_raw("acme").await).await;
    assert_eq!(
        (status, body.code, body.message.as_str()),
        (
            502,
            ErrorCode::OauthInvalidGrant,
            rejected().message.as_str()
        )
    );
}

#[tokio::test]
async fn a_reported_rejection_answers_every_lease_and_waiter_on_every_companion_until_it_expires() {
    let redis = RedisServer::start();
    let config = with_negative_cache(config(&redis), 1_500);
    let first = Arc::new(Companion::start(config.clone()).await);
    let second = Companion::start(config).await;

    wait_until_subscribed(&redis).await;
    let lease_id = first.lease_fetch("acme").await;
    // A lease waiting on the holder hears the rejection, too, instead of fetching.
    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn(first.lease_raw_owned("acme", false));
    wait_until_a_lease_waits(&redis, exists_before).await;
    let aborted = Instant::now();
    assert_eq!(
        first
            .abort_failed("acme", &lease_id, Some(rejected()))
            .await,
        204
    );
    let (status, body) = error_of(waiter.await.unwrap()).await;
    assert_eq!((status, body.code), (502, ErrorCode::OauthInvalidGrant));

    let ttl_ms: i64 = redis.query(&["PTTL", FAILURE]).await;
    assert!((1..=1_500).contains(&ttl_ms), "{ttl_ms}");
    for companion in [&*first, &second] {
        assert_rejection_answered(companion).await;
    }
    assert_eq!(first.metrics().await.leases("cached_failure"), 2.0);
    assert_eq!(second.metrics().await.leases("cached_failure"), 1.0);

    // Once --negative-cache-ms has passed, the next lease fetches again.
    common::eventually("the failure expires", Duration::from_secs(5), || async {
        matches!(second.lease_raw("acme").await.status().as_u16(), 200)
    })
    .await;
    assert!(aborted.elapsed() >= Duration::from_millis(1_400));
}

#[tokio::test]
async fn a_passing_failure_is_never_cached_and_a_forced_lease_or_invalidation_clears_one() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;

    let lease_id = companion.lease_fetch("acme").await;
    let exhausted = FetchFailure {
        code: ErrorCode::OauthExchangeFailed,
        message: "login answered 503".into(),
    };
    companion
        .abort_failed("acme", &lease_id, Some(exhausted))
        .await;
    let lease_id = companion.lease_fetch("acme").await;

    companion
        .abort_failed("acme", &lease_id, Some(rejected()))
        .await;
    assert_rejection_answered(&companion).await;
    let LeaseResponse::Fetch { lease_id, .. } = companion.lease_forced("acme").await else {
        panic!("a forced lease fetches");
    };
    assert_eq!(redis.query::<i64>(&["EXISTS", FAILURE]).await, 0);
    companion
        .abort_failed("acme", &lease_id, Some(rejected()))
        .await;
    assert_rejection_answered(&companion).await;
    assert_eq!(companion.invalidate("acme", None).await, 204);
    let _lease_id = companion.lease_fetch("acme").await;
}

#[tokio::test]
async fn zero_turns_negative_caching_off() {
    let redis = RedisServer::start();
    let companion = Companion::start(with_negative_cache(config(&redis), 0)).await;
    let lease_id = companion.lease_fetch("acme").await;
    companion
        .abort_failed("acme", &lease_id, Some(rejected()))
        .await;
    assert_eq!(redis.query::<i64>(&["EXISTS", FAILURE]).await, 0);
    let _lease_id = companion.lease_fetch("acme").await;
}

#[tokio::test]
async fn in_degraded_mode_the_rejection_is_answered_from_memory() {
    let mut redis = RedisServer::start();
    let config = Config {
        health_interval_ms: 50,
        health_failure_threshold: 3,
        redis_timeout_ms: 200,
        ..config(&redis)
    };
    let companion = Companion::start(config).await;
    redis.kill();
    companion.wait_until_ready_is(503).await;

    let lease_id = companion.lease_fetch("acme").await;
    assert!(lease_id.0.starts_with("local-"), "{lease_id:?}");
    companion
        .abort_failed("acme", &lease_id, Some(rejected()))
        .await;
    assert_rejection_answered(&companion).await;
    assert_eq!(companion.invalidate("acme", None).await, 204);
    let lease_id = companion.lease_fetch("acme").await;
    assert!(lease_id.0.starts_with("local-"), "{lease_id:?}");
}

#[tokio::test]
async fn the_token_api_caches_a_rejection_it_fetched_itself() {
    let redis = RedisServer::start();
    let standins = standins().await;
    let companion = Companion::start(token_api_config(&redis, &standins)).await;
    standins.push_fault(Endpoint::Login, Fault::InvalidClient);

    let mut answers = Vec::new();
    for _ in 0..3 {
        let (status, body) = error_of(companion.token("acme", "genesys", false).await).await;
        answers.push((status, body.code, body.message));
    }
    assert_eq!(answers[0].0, 502);
    assert_eq!(answers[0].1, ErrorCode::OauthInvalidGrant);
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "{answers:?}"
    );
    assert_eq!(
        standins.calls(Endpoint::Login),
        1,
        "one rejected login, not three"
    );
    assert_eq!(standins.calls(Endpoint::TenantService), 1);
}
