//! Redis as production runs it: a password in the URL, TLS (`rediss://`) with a private
//! CA, and a real three-node Redis Cluster.

mod common;

use common::{
    Companion, RedisProcess, assert_hit, config_for, error_of, eventually_blocking, free_port,
    now_ms, redis_cli, standins, token_of,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokengate_companion::Config;
use tokengate_core::ErrorCode;
use tokengate_core::token_api::TokenSource;
use tokengate_tests::redis_cluster::RedisCluster;
use tokengate_tests::standins::Endpoint;

const PASSWORD: &str = "redis-pass-5e1d";

fn answers_with_password(port: u16) -> bool {
    std::process::Command::new("redis-cli")
        .args([
            "-p",
            &port.to_string(),
            "--no-auth-warning",
            "-a",
            PASSWORD,
            "PING",
        ])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG")
}

#[tokio::test]
async fn a_password_in_the_url_authenticates_every_connection() {
    let redis = RedisProcess::start(&["--requirepass", PASSWORD]);
    eventually_blocking("redis answers", Duration::from_secs(10), || {
        answers_with_password(redis.port)
    });
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port);
    let companion = Arc::new(
        Companion::start(Config {
            recheck_interval_ms: 10_000,
            lease_wait_ms: 20_000,
            lock_ttl_ms: 30_000,
            ..config_for(url)
        })
        .await,
    );
    // The pub/sub connection authenticated too.
    let port = redis.port.to_string();
    common::eventually("the companion subscribed", Duration::from_secs(5), || {
        let numpat = redis_cli(&[
            "-p",
            &port,
            "--no-auth-warning",
            "-a",
            PASSWORD,
            "PUBSUB",
            "NUMPAT",
        ]);
        async move { numpat.trim() == "1" }
    })
    .await;

    let lease_id = companion.lease_fetch("acme").await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        async move { companion.lease("acme").await }
    });
    companion
        .wait_until_metric("tokengate_companion_leases_waiting", 1.0)
        .await;
    let expires_at_ms = now_ms() + 60_000;
    let committed = Instant::now();
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-pw", expires_at_ms)
            .await,
        204
    );
    assert_hit(&waiter.await.unwrap(), "tok-pw", expires_at_ms);
    assert!(
        committed.elapsed() < Duration::from_secs(2),
        "woken by pub/sub"
    );
}

#[tokio::test]
/// Redis refuses the companion: leases are served in degraded mode at once, and what
/// still needs Redis (releasing a Redis lock) answers `503 CACHE_UNAVAILABLE`, without
/// the password.
async fn a_wrong_password_is_served_in_degraded_mode() {
    let redis = RedisProcess::start(&["--requirepass", PASSWORD]);
    eventually_blocking("redis answers", Duration::from_secs(10), || {
        answers_with_password(redis.port)
    });
    let url = format!("redis://:not-the-password@127.0.0.1:{}", redis.port);
    let companion = Companion::start(Config {
        health_failure_threshold: 1_000,
        ..config_for(url)
    })
    .await;
    let lease_id = companion.lease_fetch("acme").await;
    assert!(lease_id.0.starts_with("local-"), "{lease_id:?}");
    let abort =
        serde_json::json!({"provider": "genesys", "tenantId": "acme", "leaseId": "held-in-redis"});
    let (status, error) = error_of(companion.post("/v1/abort", &abort).await).await;
    assert_eq!((status, error.code), (503, ErrorCode::CacheUnavailable));
    assert!(!error.message.contains("not-the-password"));
}

/// A CA, and a certificate for 127.0.0.1 signed by it, made with the openssl CLI.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tokengate-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test]
async fn rediss_with_a_private_ca_serves_leases() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let tls_port = free_port();
    let _redis = RedisProcess::start_on(
        0,
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ],
    );
    eventually_blocking("redis answers over TLS", Duration::from_secs(10), || {
        std::process::Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &path("ca.pem"),
                "-p",
                &tls_port.to_string(),
                "PING",
            ])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG")
    });
    let companion = Companion::start(Config {
        redis_ca_file: Some(dir.path().join("ca.pem")),
        health_failure_threshold: 1_000,
        ..config_for(format!("rediss://127.0.0.1:{tls_port}"))
    })
    .await;

    let lease_id = companion.lease_fetch("acme").await;
    let expires_at_ms = now_ms() + 60_000;
    assert_eq!(
        companion
            .commit("acme", &lease_id, "tok-tls", expires_at_ms)
            .await,
        204
    );
    assert_hit(&companion.lease("acme").await, "tok-tls", expires_at_ms);
}

#[tokio::test]
/// The server's certificate is not trusted: no connection, so leases are served in
/// degraded mode.
async fn rediss_without_the_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let tls_port = free_port();
    let _redis = RedisProcess::start_on(
        0,
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "no",
        ],
    );
    eventually_blocking("redis answers over TLS", Duration::from_secs(10), || {
        std::process::Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &path("ca.pem"),
                "-p",
                &tls_port.to_string(),
                "PING",
            ])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "PONG")
    });
    let companion = Companion::start(Config {
        health_failure_threshold: 1_000,
        ..config_for(format!("rediss://127.0.0.1:{tls_port}"))
    })
    .await;
    let lease_id = companion.lease_fetch("acme").await;
    assert!(lease_id.0.starts_with("local-"), "{lease_id:?}");
}

#[tokio::test]
async fn a_redis_cluster_serves_leases_waits_and_the_token_api() {
    let cluster = RedisCluster::start(3, 0, &[]).await;
    let standins = standins().await;
    let config = Config {
        recheck_interval_ms: 10_000,
        lease_wait_ms: 20_000,
        lock_ttl_ms: 30_000,
        tenant_service_url: Some(format!("http://{}", standins.tenant_service).into()),
        genesys_login_url_template: format!("http://{}", standins.login),
        ..config_for(cluster.url())
    };
    let companion = Arc::new(Companion::start(config).await);
    assert_eq!(companion.readiness().await.0, 200);

    // Tenants land on different nodes; each key's token and lock share one.
    let tenants = ["acme", "globex", "initech", "umbrella", "hooli", "wayne"];
    let nodes: std::collections::BTreeSet<u16> = tenants
        .iter()
        .map(|t| cluster.node_of(&format!("tokengate:{{genesys:{t}}}:token")))
        .collect();
    assert!(nodes.len() >= 2, "the tenants spread over the nodes");
    for tenant in tenants {
        let lease_id = companion.lease_fetch(tenant).await;
        let expires_at_ms = now_ms() + 60_000;
        let token = format!("tok-{tenant}");
        assert_eq!(
            companion
                .commit(tenant, &lease_id, &token, expires_at_ms)
                .await,
            204
        );
        assert_hit(&companion.lease(tenant).await, &token, expires_at_ms);
        let node = cluster.node_of(&format!("tokengate:{{genesys:{tenant}}}:token"));
        let stored = redis_cli(&[
            "-p",
            &node.to_string(),
            "GET",
            &format!("tokengate:{{genesys:{tenant}}}:token"),
        ]);
        assert!(stored.contains(&token), "{stored}");
    }

    // A waiter is woken by the holder's commit through pub/sub (re-checks only every
    // 10 s), also when the key lives on another node than the subscription (on the
    // first seed node): a cluster forwards every PUBLISH to all its nodes.
    let subscribed_on = cluster.ports[0];
    let tenant = (0..100)
        .map(|n| format!("waiter-{n}"))
        .find(|t| cluster.node_of(&format!("tokengate:{{genesys:{t}}}:token")) != subscribed_on)
        .expect("some tenant lives on another node");
    let lease_id = companion.lease_fetch(&tenant).await;
    let waiter = tokio::spawn({
        let companion = Arc::clone(&companion);
        let tenant = tenant.clone();
        async move { companion.lease(&tenant).await }
    });
    companion
        .wait_until_metric("tokengate_companion_leases_waiting", 1.0)
        .await;
    let expires_at_ms = now_ms() + 60_000;
    let committed = Instant::now();
    assert_eq!(
        companion
            .commit(&tenant, &lease_id, "tok-waited", expires_at_ms)
            .await,
        204
    );
    assert_hit(&waiter.await.unwrap(), "tok-waited", expires_at_ms);
    assert!(
        committed.elapsed() < Duration::from_secs(2),
        "{:?}",
        committed.elapsed()
    );

    // The token API over the cluster.
    let fresh = token_of(companion.token("wonka", "whatsapp", false).await).await;
    assert_eq!(fresh.source, TokenSource::Fresh);
    let cached = token_of(companion.token("wonka", "whatsapp", false).await).await;
    assert_eq!(cached.source, TokenSource::Cache);
    assert_eq!(standins.calls(Endpoint::TenantService), 1);
}
