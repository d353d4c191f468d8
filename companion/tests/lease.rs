//! The lease / commit / abort flow against a real Redis: hits, fetches, waits and the
//! lock's life cycle.

mod common;

use common::{
    Companion, ManualClock, RedisServer, assert_hit, config, error_of, now_ms,
    wait_until_a_lease_waits, wait_until_subscribed,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokengate_companion::{Clock, Config};
use tokengate_core::ErrorCode;
use tokengate_core::lease::LeaseResponse;

const LOCK: &str = "tokengate:{genesys:acme}:lock";
const TOKEN: &str = "tokengate:{genesys:acme}:token";

/// A configuration whose waiting leases re-check only every 10 s: a quick answer can
/// only come from the pub/sub wake-up. Locks and waits outlast any test.
fn woken_config(redis: &RedisServer) -> Config {
    Config {
        lock_ttl_ms: 30_000,
        lease_wait_ms: 20_000,
        recheck_interval_ms: 10_000,
        ..config(redis)
    }
}

#[tokio::test]
async fn a_cold_key_is_fetched_then_committed_then_hit() {
    let redis = RedisServer::start();
    let config = config(&redis);
    let companion = Companion::start(config.clone()).await;

    let (lease_id, lease_ttl_ms) = match companion.lease("acme").await {
        LeaseResponse::Fetch {
            lease_id,
            lease_ttl_ms,
        } => (lease_id, lease_ttl_ms),
        other => panic!("expected fetch, got {other:?}"),
    };
    assert_eq!(lease_ttl_ms, config.lock_ttl_ms);
    assert_eq!(redis.query::<String>(&["GET", LOCK]).await, lease_id.0);

    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-1", expires_at_ms)
            .await,
        204
    );

    assert_hit(&companion.lease("acme").await, "tok-1", expires_at_ms);
    // Stored as JSON, expiring exactly with the token; the lock is gone.
    let stored: serde_json::Value =
        serde_json::from_str(&redis.query::<String>(&["GET", TOKEN]).await).unwrap();
    assert_eq!(
        stored,
        serde_json::json!({"accessToken":"tok-1","expiresAtMs":expires_at_ms})
    );
    assert_eq!(
        redis.query::<u64>(&["PEXPIRETIME", TOKEN]).await,
        expires_at_ms
    );
    assert_eq!(redis.query::<i64>(&["EXISTS", LOCK]).await, 0);
    // Other tenants are other keys.
    assert!(matches!(
        companion.lease("globex").await,
        LeaseResponse::Fetch { .. }
    ));
}

#[tokio::test]
async fn a_waiting_lease_is_woken_by_the_commit_not_by_polling() {
    let redis = RedisServer::start();
    let config = woken_config(&redis);
    let companion = Arc::new(Companion::start(config).await);
    wait_until_subscribed(&redis).await;

    let lease_id = companion.lease_fetch("acme").await;
    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease("acme").await }
    });
    wait_until_a_lease_waits(&redis, exists_before).await;

    let expires_at_ms = now_ms() + 60_000;
    let committed = Instant::now();
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-2", expires_at_ms)
            .await,
        204
    );
    let answer = waiter.await.unwrap();
    let woken_after = committed.elapsed();

    assert_hit(&answer, "tok-2", expires_at_ms);
    assert!(
        woken_after < Duration::from_secs(2),
        "woken after {woken_after:?}"
    );
}

#[tokio::test]
async fn an_abort_hands_the_lock_to_a_waiter() {
    let redis = RedisServer::start();
    let config = woken_config(&redis);
    let companion = Arc::new(Companion::start(config).await);
    wait_until_subscribed(&redis).await;

    let first = companion.lease_fetch("acme").await;
    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease_fetch("acme").await }
    });
    wait_until_a_lease_waits(&redis, exists_before).await;

    let aborted = Instant::now();
    assert_eq!(companion.abort("acme", &first).await, 204);
    let second = waiter.await.unwrap();
    assert!(
        aborted.elapsed() < Duration::from_secs(2),
        "woken after {:?}",
        aborted.elapsed()
    );

    assert_ne!(second, first);
    assert_eq!(redis.query::<String>(&["GET", LOCK]).await, second.0);
    // Aborting again (the lease no longer holds the lock) is harmless.
    assert_eq!(companion.abort("acme", &first).await, 204);
    assert_eq!(redis.query::<String>(&["GET", LOCK]).await, second.0);
}

#[tokio::test]
async fn a_holder_that_never_finishes_loses_the_lock_at_its_ttl() {
    let redis = RedisServer::start();
    let config = Config {
        lock_ttl_ms: 300,
        lease_wait_ms: 250,
        recheck_interval_ms: 20,
        ..config(&redis)
    };
    let companion = Companion::start(config).await;

    let granted = Instant::now();
    let first = companion.lease_fetch("acme").await;
    // Let part of the TTL pass, so the waiter's 250 ms budget reaches past the expiry.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let second = companion.lease_fetch("acme").await;

    assert_ne!(second, first);
    assert!(
        granted.elapsed() >= Duration::from_millis(290),
        "taken over after {:?}",
        granted.elapsed()
    );
}

#[tokio::test]
async fn a_wait_longer_than_the_budget_answers_lock_acquisition_failed() {
    let redis = RedisServer::start();
    let config = Config {
        lock_ttl_ms: 5_000,
        lease_wait_ms: 200,
        recheck_interval_ms: 20,
        ..config(&redis)
    };
    let companion = Companion::start(config).await;
    let _holder = companion.lease_fetch("acme").await;

    let started = Instant::now();
    let (status, body) = error_of(companion.lease_raw("acme").await).await;

    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(status, 503);
    assert_eq!(body.code, ErrorCode::LockAcquisitionFailed);
    assert_eq!(body.tenant_id.as_deref(), Some("acme"));
}

#[tokio::test]
async fn fifty_concurrent_leases_make_one_fetch_and_share_one_wait() {
    let redis = RedisServer::start();
    let config = woken_config(&redis);
    let companion = Arc::new(Companion::start(config).await);
    wait_until_subscribed(&redis).await;
    let exists_before = redis.calls("exists").await;

    let mut leases = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let companion = Arc::clone(&companion);
        leases.spawn(async move { companion.lease("acme").await });
    }
    // Only the lock holder is answered before the commit.
    let first = leases.join_next().await.unwrap().unwrap();
    let LeaseResponse::Fetch { lease_id, .. } = first else {
        panic!("the first answer should be the fetch, got {first:?}");
    };
    let expires_at_ms = now_ms() + 60_000;
    let committed = Instant::now();
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-50", expires_at_ms)
            .await,
        204
    );

    let mut hits = 0;
    while let Some(answer) = leases.join_next().await {
        assert_hit(&answer.unwrap(), "tok-50", expires_at_ms);
        hits += 1;
    }
    assert_eq!(hits, 49);
    let answered_after = committed.elapsed();
    assert!(
        answered_after < Duration::from_secs(2),
        "answered after {answered_after:?}"
    );
    // The waiters shared one wait loop: a handful of looks at the lock, not 49 or more.
    let looks = redis.calls("exists").await - exists_before;
    assert!(looks <= 5, "{looks} looks at the lock");
}

#[tokio::test]
async fn a_stale_lease_neither_deletes_nor_releases_the_new_holders_lock() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;

    let stale = companion.lease_fetch("acme").await;
    // Let the first lock expire now instead of after its TTL.
    let _: i64 = redis.query(&["PEXPIRE", LOCK, "1"]).await;
    redis
        .wait_until("the first lock expired", Duration::from_secs(5), || async {
            redis.query::<i64>(&["EXISTS", LOCK]).await == 0
        })
        .await;
    let current = companion.lease_fetch("acme").await;

    assert_eq!(companion.abort("acme", &stale).await, 204);
    assert_eq!(redis.query::<String>(&["GET", LOCK]).await, current.0);

    // The stale lease's token is still valid, so it is stored; the lock stays.
    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &stale, "tok-stale", expires_at_ms)
            .await,
        204
    );
    assert_eq!(redis.query::<String>(&["GET", LOCK]).await, current.0);
    assert_hit(&companion.lease("acme").await, "tok-stale", expires_at_ms);

    // A stale commit never replaces a longer-lived token; the holder's own commit does.
    assert_eq!(
        companion
            .commit("acme", &stale, "tok-older", expires_at_ms - 1_000)
            .await,
        204
    );
    assert_hit(&companion.lease("acme").await, "tok-stale", expires_at_ms);
    assert_eq!(
        companion
            .commit("acme", &current, "tok-new", expires_at_ms - 2_000)
            .await,
        204
    );
    assert_hit(
        &companion.lease("acme").await,
        "tok-new",
        expires_at_ms - 2_000,
    );
    assert_eq!(redis.query::<i64>(&["EXISTS", LOCK]).await, 0);
}

#[tokio::test]
async fn an_already_expired_token_is_not_stored_and_frees_the_lock() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;

    let first = companion.lease_fetch("acme").await;
    assert_eq!(
        companion
            .commit("acme", &first, "tok-old", now_ms() - 1)
            .await,
        204
    );

    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 0);
    let second = companion.lease_fetch("acme").await;
    assert_ne!(second, first);
}

#[tokio::test]
async fn a_token_about_to_expire_on_the_companions_clock_is_refetched() {
    let redis = RedisServer::start();
    let clock = ManualClock::at(now_ms());
    let companion = Companion::start_with(config(&redis), Some(clock.clone())).await;

    let lease_id = companion.lease_fetch("acme").await;
    let expires_at_ms = clock.now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-1", expires_at_ms)
            .await,
        204
    );
    assert_hit(&companion.lease("acme").await, "tok-1", expires_at_ms);

    // 59.5 s later (for the companion) the token has less than the 1 s margin left.
    clock.advance(59_500);
    assert!(matches!(
        companion.lease("acme").await,
        LeaseResponse::Fetch { .. }
    ));
}

#[tokio::test]
async fn shutting_down_answers_waiting_leases_at_once() {
    let redis = RedisServer::start();
    let config = Config {
        lock_ttl_ms: 30_000,
        lease_wait_ms: 20_000,
        ..config(&redis)
    };
    let mut companion = Companion::start(config).await;
    let _holder = companion.lease_fetch("acme").await;
    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn(companion.lease_raw_owned("acme", false));
    wait_until_a_lease_waits(&redis, exists_before).await;

    let stopped = Instant::now();
    companion.stop();
    let (status, body) = error_of(waiter.await.unwrap()).await;

    assert_eq!((status, body.code), (503, ErrorCode::CompanionUnavailable));
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        stopped.elapsed()
    );
}

#[tokio::test]
async fn after_a_redis_restart_waiters_are_woken_by_pub_sub_again() {
    let mut redis = RedisServer::start();
    let config = woken_config(&redis);
    let companion = Arc::new(Companion::start(config).await);
    wait_until_subscribed(&redis).await;

    redis.kill();
    let redis = RedisServer::start_on(redis.port).expect("redis restarts on its port");
    wait_until_subscribed(&redis).await;

    // Not even the first lease after the restart fails: the store retries once on the
    // connection its manager re-establishes.
    let lease_id = companion.lease_fetch("acme").await;
    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease("acme").await }
    });
    wait_until_a_lease_waits(&redis, exists_before).await;
    let expires_at_ms = now_ms() + 60_000;
    let committed = Instant::now();
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-r", expires_at_ms)
            .await,
        204
    );

    assert_hit(&waiter.await.unwrap(), "tok-r", expires_at_ms);
    assert!(
        committed.elapsed() < Duration::from_secs(2),
        "woken after {:?}",
        committed.elapsed()
    );
}

#[tokio::test]
async fn a_forced_lease_skips_the_cached_token_which_others_still_get() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let first = companion.lease_fetch("acme").await;
    let old_expiry = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &first, "tok-old", old_expiry)
            .await,
        204
    );

    let LeaseResponse::Fetch { lease_id, .. } = companion.lease_forced("acme").await else {
        panic!("a forced lease should fetch");
    };
    // While the forced fetch runs, the old token is still served.
    assert_hit(&companion.lease("acme").await, "tok-old", old_expiry);

    let new_expiry = now_ms() + 120_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-new", new_expiry)
            .await,
        204
    );
    assert_hit(&companion.lease("acme").await, "tok-new", new_expiry);
}

/// Read-your-writes on one companion: its in-process copy of a token is dropped by its
/// own commit, not only when Redis's `ready` message comes back (which can come after
/// the next lease). Repeated, since each round races that message.
#[tokio::test]
async fn a_companion_answers_its_own_commit_at_once_not_its_older_copy() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    wait_until_subscribed(&redis).await;
    let first = companion.lease_fetch("acme").await;
    let mut expiry = now_ms() + 60_000;
    assert_eq!(companion.commit("acme", &first, "tok-0", expiry).await, 204);
    for round in 1..=30 {
        // A hit here keeps a copy of the cached token...
        assert_hit(
            &companion.lease("acme").await,
            &format!("tok-{}", round - 1),
            expiry,
        );
        let LeaseResponse::Fetch { lease_id, .. } = companion.lease_forced("acme").await else {
            panic!("round {round}: a forced lease should fetch");
        };
        expiry += 1_000;
        let token = format!("tok-{round}");
        assert_eq!(
            companion.commit("acme", &lease_id, &token, expiry).await,
            204
        );
        // ... which the commit's answer has already dropped.
        assert_hit(&companion.lease("acme").await, &token, expiry);
    }
}

#[tokio::test]
async fn a_forced_lease_waits_for_the_fetch_in_progress_and_takes_only_its_token() {
    let redis = RedisServer::start();
    let config = woken_config(&redis);
    let companion = Arc::new(Companion::start(config).await);
    wait_until_subscribed(&redis).await;
    let first = companion.lease_fetch("acme").await;
    let old_expiry = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &first, "tok-old", old_expiry)
            .await,
        204
    );
    let refreshing = match companion.lease_forced("acme").await {
        LeaseResponse::Fetch { lease_id, .. } => lease_id,
        other => panic!("expected fetch, got {other:?}"),
    };

    // A second forced lease finds the refresh in progress and waits for it, although a
    // usable token is cached.
    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease_forced("acme").await }
    });
    wait_until_a_lease_waits(&redis, exists_before).await;
    assert!(!waiter.is_finished());

    let new_expiry = now_ms() + 120_000;
    assert_eq!(
        companion
            .commit("acme", &refreshing, "tok-new", new_expiry)
            .await,
        204
    );
    assert_hit(&waiter.await.unwrap(), "tok-new", new_expiry);
}

#[tokio::test]
async fn a_forced_lease_does_not_take_the_token_its_caller_discards_from_a_fetch_begun_earlier() {
    // A gateway served tok-1 before its lease of it was committed, and a client at once
    // forced a refresh: its lease finds tok-1's lock still held.
    let redis = RedisServer::start();
    let config = woken_config(&redis);
    let companion = Arc::new(Companion::start(config).await);
    wait_until_subscribed(&redis).await;
    let first = companion.lease_fetch("acme").await;
    let discarded_expiry = now_ms() + 60_000;
    let forced = serde_json::json!({
        "provider": "genesys",
        "tenantId": "acme",
        "forceRefresh": true,
        "minExpiresAtMs": discarded_expiry,
    });

    let exists_before = redis.calls("exists").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.post("/v1/lease", &forced).await }
    });
    wait_until_a_lease_waits(&redis, exists_before).await;
    assert_eq!(
        companion
            .commit("acme", &first, "tok-1", discarded_expiry)
            .await,
        204
    );

    let response = waiter.await.unwrap();
    assert_eq!(response.status(), 200);
    match response.json::<LeaseResponse>().await.unwrap() {
        LeaseResponse::Fetch { .. } => {}
        other => panic!("tok-1 is the discarded token: expected fetch, got {other:?}"),
    }
}

#[tokio::test]
async fn a_lease_asking_for_a_newer_token_fetches_unless_one_is_cached() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    let lease_id = companion.lease_fetch("acme").await;
    let old_expiry = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-old", old_expiry)
            .await,
        204
    );

    let newer =
        serde_json::json!({"provider":"genesys","tenantId":"acme","minExpiresAtMs": old_expiry});
    let response = companion.post("/v1/lease", &newer).await;
    assert_eq!(response.status(), 200);
    let lease_id = match response.json::<LeaseResponse>().await.unwrap() {
        LeaseResponse::Fetch { lease_id, .. } => lease_id,
        other => panic!("the cached token is not newer: expected fetch, got {other:?}"),
    };
    let new_expiry = old_expiry + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-new", new_expiry)
            .await,
        204
    );

    // Another Envoy asking for a token newer than the old one is served the new one.
    let response = companion.post("/v1/lease", &newer).await;
    assert_hit(
        &response.json::<LeaseResponse>().await.unwrap(),
        "tok-new",
        new_expiry,
    );
}

#[tokio::test]
async fn a_lock_redis_takes_after_the_lease_gave_up_on_its_acquire_is_released() {
    let redis = RedisServer::start();
    let companion = Companion::start(config(&redis)).await;
    // Redis knows the acquire script (a fresh one would answer the late EVALSHA NOSCRIPT).
    companion.lease_fetch("globex").await;
    let acquires_before = redis.calls("evalsha").await;

    // Frozen Redis: the acquire is sent, its answer does not come within the timeout;
    // the lease is served in degraded mode instead.
    redis.pause();
    let local = companion.lease_fetch("acme").await;
    assert!(local.0.starts_with("local-"), "{local:?}");
    assert_eq!(companion.abort("acme", &local).await, 204);
    redis.resume();

    // Thawed, Redis runs the acquire (taking the lock for a lease id nobody will commit
    // or abort), then the release sent after it, long before the lock's 5 s TTL.
    redis
        .wait_until(
            "the late acquire ran and its lock was released",
            Duration::from_secs(2),
            || async {
                redis.calls("evalsha").await > acquires_before
                    && redis.calls("eval").await >= 1
                    && redis.query::<i64>(&["EXISTS", LOCK]).await == 0
            },
        )
        .await;
    assert!(matches!(
        companion.lease("acme").await,
        LeaseResponse::Fetch { .. }
    ));
}
