//! The internal API's shared secret and the encryption of the tokens stored in Redis.

mod common;

use common::{Companion, RedisServer, assert_hit, config, error_of, now_ms};
use std::io::Write;
use tokengate_companion::Config;
use tokengate_core::ErrorCode;
use tokengate_core::lease::{LEASE_PATH, LeaseResponse};

const TOKEN: &str = "tokengate:{genesys:acme}:token";
const KEY: &str = "a-shared-secret-of-the-fleet";

/// A file holding `text`, removed when dropped.
fn file_with(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn k1() -> String {
    format!("k1:{}", "a1".repeat(32))
}

fn k2() -> String {
    format!("k2:{}", "b2".repeat(32))
}

async fn lease_with_key(companion: &Companion, key: Option<&str>) -> reqwest::Response {
    let mut request = companion
        .http
        .post(format!("{}{LEASE_PATH}", companion.base))
        .json(&serde_json::json!({"provider": "genesys", "tenantId": "acme"}));
    if let Some(key) = key {
        request = request.header("x-tokengate-key", key);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn with_a_key_file_the_internal_api_requires_the_key() {
    let redis = RedisServer::start();
    let key_file = file_with(&format!("{KEY}\n"));
    let companion = Companion::start(Config {
        internal_api_key_file: Some(key_file.path().to_owned()),
        ..config(&redis)
    })
    .await;

    for presented in [None, Some("wrong"), Some("a-shared-secret-of-the-fleeT")] {
        let (status, error) = error_of(lease_with_key(&companion, presented).await).await;
        assert_eq!(
            (status, error.code),
            (401, ErrorCode::Unauthorized),
            "{presented:?}"
        );
        assert!(
            error.message.contains("x-tokengate-key"),
            "{}",
            error.message
        );
        assert!(!error.message.contains(KEY));
    }
    // The key guards every /v1 route, and is checked before the body.
    for path in ["/v1/commit", "/v1/abort", "/v1/invalidate"] {
        let response = companion
            .http
            .post(format!("{}{path}", companion.base))
            .body("not even json")
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(response).await.0, 401, "{path}");
    }
    assert_eq!(
        redis
            .query::<i64>(&["EXISTS", "tokengate:{genesys:acme}:lock"])
            .await,
        0
    );

    let response = lease_with_key(&companion, Some(KEY)).await;
    assert_eq!(response.status(), 200);
    assert!(matches!(
        response.json::<LeaseResponse>().await.unwrap(),
        LeaseResponse::Fetch { .. }
    ));

    // Probes and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(companion.get(path).await.status(), 200, "{path}");
    }
    assert_eq!(
        companion
            .metrics()
            .await
            .value("tokengate_companion_unauthorized_total"),
        6.0
    );
}

#[tokio::test]
async fn the_key_may_come_from_the_environment_variable_instead() {
    let redis = RedisServer::start();
    // What clap reads from TOKENGATE_INTERNAL_API_KEY (tests never touch the process
    // environment; the binary test below does).
    let companion = Companion::start(Config {
        internal_api_key: Some(KEY.into()),
        ..config(&redis)
    })
    .await;
    assert_eq!(lease_with_key(&companion, None).await.status(), 401);
    assert_eq!(lease_with_key(&companion, Some(KEY)).await.status(), 200);
}

#[tokio::test]
async fn an_unusable_key_file_stops_start_up_naming_the_flag() {
    let short = file_with("short\n");
    for (file, mentions) in [
        (Some(short.path().to_owned()), "at least 16"),
        (Some("/nonexistent/key".into()), "cannot read"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Config {
            internal_api_key_file: file,
            ..Config::default()
        };
        let error = tokengate_companion::run(listener, config, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("--internal-api-key-file"), "{error}");
        assert!(error.contains(mentions), "{error}");
    }
}

/// Starts a companion encrypting with the keys of `keys` (a key file's text).
async fn encrypting(redis: &RedisServer, keys: &tempfile::NamedTempFile) -> Companion {
    Companion::start(Config {
        encryption_key_file: Some(keys.path().to_owned()),
        ..config(redis)
    })
    .await
}

#[tokio::test]
async fn tokens_are_stored_encrypted_and_still_served() {
    let redis = RedisServer::start();
    let keys = file_with(&format!("{}\n", k1()));
    let companion = encrypting(&redis, &keys).await;
    let lease_id = companion.lease_fetch("acme").await;
    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "gen-acme-cleartext-token", expires_at_ms)
            .await,
        204
    );

    // What `redis-cli GET` shows: no token in clear.
    let raw: Vec<u8> = redis.query(&["GET", TOKEN]).await;
    let needle = b"gen-acme-cleartext-token";
    assert!(!raw.windows(needle.len()).any(|w| w == needle));
    let stored: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(stored["v"], 1);
    assert_eq!(stored["kid"], "k1");
    assert_eq!(stored["expiresAtMs"], expires_at_ms);
    assert!(stored.get("accessToken").is_none());
    assert_eq!(
        redis.query::<u64>(&["PEXPIRETIME", TOKEN]).await,
        expires_at_ms
    );

    assert_hit(
        &companion.lease("acme").await,
        "gen-acme-cleartext-token",
        expires_at_ms,
    );
}

#[tokio::test]
async fn keys_rotate_old_values_read_until_their_key_is_dropped() {
    let redis = RedisServer::start();
    let expires_at_ms = now_ms() + 60_000;
    {
        let keys = file_with(&k1());
        let companion = encrypting(&redis, &keys).await;
        let lease_id = companion.lease_fetch("acme").await;
        assert_eq!(
            companion
                .commit("acme", &lease_id, "tok-under-k1", expires_at_ms)
                .await,
            204
        );
    }

    // k2 writes now; k1 still reads.
    let rotated = file_with(&format!("{}\n{}\n", k2(), k1()));
    let companion = encrypting(&redis, &rotated).await;
    assert_hit(
        &companion.lease("acme").await,
        "tok-under-k1",
        expires_at_ms,
    );
    drop(companion);

    // k1 dropped: its value is a miss, and the lease fetches a token written under k2.
    let only_k2 = file_with(&k2());
    let companion = encrypting(&redis, &only_k2).await;
    let lease_id = companion.lease_fetch("acme").await;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-under-k2", expires_at_ms)
            .await,
        204
    );
    let stored: serde_json::Value =
        serde_json::from_slice(&redis.query::<Vec<u8>>(&["GET", TOKEN]).await).unwrap();
    assert_eq!(stored["kid"], "k2");
    assert_hit(
        &companion.lease("acme").await,
        "tok-under-k2",
        expires_at_ms,
    );
}

#[tokio::test]
async fn compare_and_delete_works_on_encrypted_values() {
    let redis = RedisServer::start();
    let keys = file_with(&k1());
    let companion = encrypting(&redis, &keys).await;
    let lease_id = companion.lease_fetch("acme").await;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-current", now_ms() + 60_000)
            .await,
        204
    );

    assert_eq!(companion.invalidate("acme", Some("tok-older")).await, 204);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 1, "kept");
    assert_eq!(companion.invalidate("acme", Some("tok-current")).await, 204);
    assert_eq!(redis.query::<i64>(&["EXISTS", TOKEN]).await, 0, "deleted");
    let metrics = companion.metrics().await;
    assert_eq!(
        metrics.value("tokengate_companion_invalidations_total{result=\"mismatch\"}"),
        1.0
    );
    assert_eq!(
        metrics.value("tokengate_companion_invalidations_total{result=\"deleted\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_bad_key_file_stops_start_up_without_echoing_keys() {
    let keys = file_with(&format!("{}\nk2:{}\n", k1(), "zz".repeat(32)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        encryption_key_file: Some(keys.path().to_owned()),
        ..Config::default()
    };
    let error = tokengate_companion::run(listener, config, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("--encryption-key-file"), "{error}");
    assert!(error.contains("line 2"), "{error}");
    assert!(!error.contains("a1a1"), "{error}");
}
