//! Scenario 5: a companion lease answered from Redis (`hit`) against a raw Redis `GET`
//! of the same token key, measured by the same client (tokio, one keep-alive
//! connection each, requests alternating lease / GET so drift hits both alike). The
//! companion's own `/healthz` (no Redis) is measured the same way, to split the lease
//! into HTTP stack and Redis work; and the lease is measured against a second companion
//! logging at `warn` instead of `info`, to show what the per-lease log line costs.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokengate_tests::harness::{Companion, Process, Redis, companion_binary, free_port};

use crate::client::{Conn, RedisConn};
use crate::stats::{Latencies, micros};

/// What it found.
#[derive(Debug, Clone)]
pub struct LeaseBench {
    /// Round trips measured per kind.
    pub iterations: usize,
    /// Lease answered `hit`, companion logging at info (the default).
    pub lease: Latencies,
    /// Lease answered `hit`, companion logging at warn.
    pub lease_quiet: Latencies,
    /// Raw Redis GET of the token key.
    pub redis_get: Latencies,
    /// The companion's `/healthz`.
    pub healthz: Latencies,
    /// The Redis key read.
    pub key: String,
}

/// Runs it.
pub async fn run(iterations: usize) -> Result<LeaseBench, String> {
    let dir = tempfile::Builder::new()
        .prefix("tokengate-bench-lease-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let redis = Redis::start(dir.path()).await;
    let companion = Companion::start(dir.path(), &redis.url(), &[]).await;
    let quiet = QuietCompanion::start(dir.path(), &redis.url()).await?;
    let companion_addr = SocketAddr::from(([127, 0, 0, 1], companion.port));
    let redis_addr = SocketAddr::from(([127, 0, 0, 1], redis.port));

    let mut lease_conn = Conn::connect(companion_addr).await?;
    seed_token(&mut lease_conn).await?;
    let key = token_key(redis.port)?;
    let mut quiet_conn = Conn::connect(quiet.addr).await?;
    let mut health_conn = Conn::connect(companion_addr).await?;
    let mut redis_conn = RedisConn::connect(redis_addr).await?;
    let lease_body = Bytes::from_static(br#"{"provider":"genesys","tenantId":"acme"}"#);

    let warmup = iterations / 10;
    let mut lease = Vec::with_capacity(iterations);
    let mut lease_quiet = Vec::with_capacity(iterations);
    let mut redis_get = Vec::with_capacity(iterations);
    let mut healthz = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let measured = i >= warmup;
        let started = Instant::now();
        let answer = lease_conn
            .post_json("/v1/lease", lease_body.clone())
            .await?;
        let took = micros(started.elapsed());
        let outcome = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|body| body["outcome"].as_str().map(str::to_owned));
        if answer.status != 200 || outcome.as_deref() != Some("hit") {
            return Err(format!(
                "lease answered {} {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ));
        }
        if measured {
            lease.push(took);
        }

        let started = Instant::now();
        let value = redis_conn.get(&key).await?;
        let took = micros(started.elapsed());
        if value.is_none() {
            return Err(format!("Redis has no {key}"));
        }
        if measured {
            redis_get.push(took);
        }

        let started = Instant::now();
        let answer = quiet_conn
            .post_json("/v1/lease", lease_body.clone())
            .await?;
        let took = micros(started.elapsed());
        if answer.status != 200 {
            return Err(format!("quiet lease answered {}", answer.status));
        }
        if measured {
            lease_quiet.push(took);
        }

        let started = Instant::now();
        let answer = health_conn.get("/healthz", "-").await?;
        let took = micros(started.elapsed());
        if answer.status != 200 {
            return Err(format!("healthz answered {}", answer.status));
        }
        if measured {
            healthz.push(took);
        }
    }
    drop(quiet);
    drop(companion);
    Ok(LeaseBench {
        iterations,
        lease: Latencies::of(&lease),
        lease_quiet: Latencies::of(&lease_quiet),
        redis_get: Latencies::of(&redis_get),
        healthz: Latencies::of(&healthz),
        key,
    })
}

/// Leases acme (a `fetch`) and commits a token valid for an hour.
async fn seed_token(conn: &mut Conn) -> Result<(), String> {
    let answer = conn
        .post_json(
            "/v1/lease",
            Bytes::from_static(br#"{"provider":"genesys","tenantId":"acme"}"#),
        )
        .await?;
    let lease: serde_json::Value =
        serde_json::from_slice(&answer.body).map_err(|e| format!("lease answer: {e}"))?;
    let lease_id = lease["leaseId"]
        .as_str()
        .ok_or_else(|| format!("lease answered {lease}"))?;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let commit = serde_json::json!({
        "provider": "genesys",
        "tenantId": "acme",
        "leaseId": lease_id,
        "accessToken": "gen-acme-bench-0123456789abcdef",
        "expiresAtMs": now_ms + 3_600_000,
    });
    let answer = conn
        .post_json("/v1/commit", Bytes::from(commit.to_string()))
        .await?;
    if answer.status != 204 {
        return Err(format!(
            "commit answered {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    Ok(())
}

/// The Redis key holding acme's token, found with `redis-cli --scan` (so the benchmark
/// follows the companion's key layout, whatever it is).
fn token_key(port: u16) -> Result<String, String> {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--scan"])
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    let keys = String::from_utf8_lossy(&output.stdout);
    keys.lines()
        .find(|key| key.contains("acme") && key.ends_with(":token"))
        .map(str::to_owned)
        .ok_or_else(|| format!("no token key for acme in Redis: {keys}"))
}

/// A companion on the same Redis logging at `warn`.
struct QuietCompanion {
    addr: SocketAddr,
    _process: Process,
}

impl QuietCompanion {
    async fn start(dir: &Path, redis_url: &str) -> Result<QuietCompanion, String> {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut command = Command::new(companion_binary());
        command
            .args(["--listen", &addr.to_string(), "--redis-url", redis_url])
            .env("RUST_LOG", "warn");
        let process = Process::spawn(
            "companion (warn)",
            command,
            dir.join(format!("companion-quiet-{port}.log")),
        );
        let started = Instant::now();
        loop {
            if let Ok(mut conn) = Conn::connect(addr).await {
                if conn
                    .get("/healthz", "-")
                    .await
                    .is_ok_and(|a| a.status == 200)
                {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err("the quiet companion did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(QuietCompanion {
            addr,
            _process: process,
        })
    }
}
