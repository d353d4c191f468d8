//! `POST /v1/invalidate` against a real Redis: compare-and-delete when a token is named,
//! plain delete when none is.

mod common;

use std::time::{Duration, Instant};

use common::{
    Companion, RedisServer, assert_hit, config, error_of, eventually, now_ms, wait_until_subscribed,
};
use tokengate_companion::hot::HOT_TTL_MS;
use tokengate_core::ErrorCode;
use tokengate_core::lease::{INVALIDATE_PATH, LeaseResponse};

const TOKEN: &str = "tokengate:{genesys:acme}:token";

/// How long a companion answers from its copy of a cached token at most.
const HOT_TTL: Duration = Duration::from_millis(HOT_TTL_MS);

/// Fetches and commits `token` for acme; returns its expiry.
async fn cache(companion: &Companion, token: &str) -> u64 {
    let lease_id = companion.lease_fetch("acme").await;
    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, token, expires_at_ms)
            .await,
        204
    );
    expires_at_ms
}

#[tokio::test]
async fn invalidating_the_cached_token_deletes_it_and_the_next_lease_fetches() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    cache(&companion, "tok-rejected").await;

    assert_eq!(
        companion.invalidate("acme", Some("tok-rejected")).await,
        204
    );

    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 0);
    assert!(matches!(
        companion.lease("acme").await,
        LeaseResponse::Fetch { .. }
    ));
}

#[tokio::test]
async fn invalidating_another_token_keeps_the_one_that_replaced_it() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let expires_at_ms = cache(&companion, "tok-fresh").await;

    // A caller purges the token an upstream rejected, which was already replaced.
    assert_eq!(companion.invalidate("acme", Some("tok-old")).await, 204);

    assert_hit(&companion.lease("acme").await, "tok-fresh", expires_at_ms);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 1);
}

#[tokio::test]
async fn invalidating_without_a_token_drops_whatever_is_cached() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    cache(&companion, "tok-any").await;

    assert_eq!(companion.invalidate("acme", None).await, 204);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 0);
    // Nothing cached: still a success.
    assert_eq!(companion.invalidate("acme", None).await, 204);
    assert_eq!(companion.invalidate("acme", Some("tok-any")).await, 204);

    let metrics = companion.metrics().await;
    let invalidations = |result: &str| {
        metrics.value(&format!(
            "tokengate_companion_invalidations_total{{result=\"{result}\"}}"
        ))
    };
    assert_eq!(invalidations("deleted"), 1.0);
    assert_eq!(invalidations("not_cached"), 2.0);
    assert_eq!(invalidations("mismatch"), 0.0);
}

#[tokio::test]
async fn an_unreadable_cached_value_is_kept_unless_no_token_is_named() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let _: () = redis.query(&["SET", TOKEN, "not json"]).await;

    assert_eq!(companion.invalidate("acme", Some("tok")).await, 204);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 1);
    assert_eq!(companion.invalidate("acme", None).await, 204);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 0);
}

#[tokio::test]
async fn malformed_invalidations_answer_invalid_request() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    cache(&companion, "tok").await;

    for (body, mentions) in [
        (
            serde_json::json!({"provider":"genesys","tenantId":"acme","accessToken":""}),
            "accessToken is empty",
        ),
        (
            serde_json::json!({"provider":"genesys","tenantId":"a:b"}),
            "tenant id",
        ),
        (serde_json::json!({"tenantId":"acme"}), "provider"),
    ] {
        let (status, error) = error_of(companion.post(INVALIDATE_PATH, &body).await).await;
        assert_eq!(
            (status, error.code),
            (400, ErrorCode::InvalidRequest),
            "{body}"
        );
        assert!(error.message.contains(mentions), "{}", error.message);
    }
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 1);
}

#[tokio::test]
async fn an_invalidation_on_one_companion_drops_the_copies_the_others_answer_hits_from() {
    let redis = RedisServer::start();
    let serving = Companion::start(config(&redis)).await;
    wait_until_subscribed(&redis).await;
    let invalidating = Companion::start(config(&redis)).await;
    let expires_at_ms = cache(&serving, "tok-rejected").await;

    // Once it holds a copy, the serving companion answers hits without Redis.
    eventually(
        "hits are answered from the copy",
        Duration::from_secs(5),
        || async {
            assert_hit(&serving.lease("acme").await, "tok-rejected", expires_at_ms);
            let scripts_before = redis.calls("evalsha").await;
            assert_hit(&serving.lease("acme").await, "tok-rejected", expires_at_ms);
            redis.calls("evalsha").await == scripts_before
        },
    )
    .await;

    assert_eq!(
        invalidating.invalidate("acme", Some("tok-rejected")).await,
        204
    );

    // Well within the copy's lifetime: the deletion's message dropped it.
    let invalidated = Instant::now();
    eventually("the next lease fetches", HOT_TTL / 2, || async {
        matches!(serving.lease("acme").await, LeaseResponse::Fetch { .. })
    })
    .await;
    assert!(invalidated.elapsed() < HOT_TTL);
}
