//! The fault matrix on real processes: Redis slow and restarted, the companion frozen,
//! restarted and killed while it holds a fetch lock, every kind of Tenant Service and
//! identity provider failure, and Envoy hot restarts under load.
//!
//! Every case checks the same three things: each request got either the token the
//! stand-in login issued to its tenant (as the echo upstream saw it) or the documented
//! error (status and JSON `code`); the stand-ins were called as often as the retry policy
//! says; and no fetch lock is left in Redis. A lock is released, not waited out (locks
//! live 30 s by default; the checks allow 2 s), except where no process is left that
//! could release it (a companion killed or gone while a fetch held its lock): then the
//! case runs with a 2 s lock TTL and checks the lock is gone by then. The README's
//! reliability section lists each case with its test; cases tested elsewhere (Redis down,
//! the companion down, the lock holder's companion killed mid-fetch with gateway
//! fetches, single upstream faults) are in `collapse.rs` and `token_semantics.rs`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{Value, json};
use tokengate_tests::harness::{Cluster, Envoy, EnvoyUpstreams, Redis, eventually, wait_until};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::{Endpoint, Fault, Fixture, generated_tenant_id};

/// How long a released lock may take to disappear: the abort or commit follows the
/// answer by a round trip, far below any lock TTL used here.
const LOCK_RELEASE: Duration = Duration::from_secs(2);

/// What one request through Envoy came back with.
#[derive(Debug)]
struct Outcome {
    tenant: String,
    /// 0 when no HTTP answer came back (connection refused or reset).
    status: u16,
    body: Value,
    authorization: Option<String>,
}

impl Outcome {
    fn code(&self) -> Option<&str> {
        self.body["code"].as_str()
    }
}

/// `GET /api/conversations` for `tenant` through `envoy_url`.
async fn send(client: &reqwest::Client, envoy_url: &str, tenant: &str) -> Outcome {
    let response = client
        .get(format!("{envoy_url}/api/conversations"))
        .header("x-tenant-id", tenant)
        .send()
        .await;
    let (status, body) = match response {
        Ok(response) => {
            let received = receive(response).await;
            (
                received.status,
                serde_json::from_str(&received.text).unwrap_or(Value::String(received.text)),
            )
        }
        Err(error) => (0, Value::String(format!("{error:?}"))),
    };
    let authorization = body["headers"]["authorization"].as_str().map(str::to_owned);
    Outcome {
        tenant: tenant.to_owned(),
        status,
        body,
        authorization,
    }
}

/// A client that opens a new connection for every request.
fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Fails unless `outcome` carried a token the login issued to its tenant, or is one of
/// the `allowed` errors (status and code).
fn assert_token_or(cluster: &Cluster, outcome: &Outcome, allowed: &[(u16, &str)]) {
    if outcome.status == 200 {
        let issued = cluster.standins.tokens_issued_to(&outcome.tenant);
        let authorization = outcome.authorization.as_deref().unwrap_or_default();
        assert!(
            issued
                .iter()
                .any(|token| authorization == format!("Bearer {token}")),
            "{}: 200 without a token issued to it: {}",
            outcome.tenant,
            outcome.body
        );
    } else {
        assert!(
            allowed
                .iter()
                .any(|(status, code)| outcome.status == *status && outcome.code() == Some(code)),
            "{}: neither a token nor one of {allowed:?}: {} {}",
            outcome.tenant,
            outcome.status,
            outcome.body
        );
    }
}

/// The fetch locks in Redis right now.
fn held_locks(redis: &Redis) -> Vec<String> {
    redis
        .cli(&["KEYS", "tokengate:*:lock"])
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Waits until no fetch lock is left in Redis, at most `within`.
async fn assert_no_lock_left(redis: &Redis, within: Duration) {
    let started = Instant::now();
    loop {
        let held = held_locks(redis);
        if held.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < within,
            "fetch locks still held after {within:?}: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The fixture with `count` generated tenants (`bench-0` ...), for tests that need
/// many cold tenants.
fn fixture_with_tenants(count: usize) -> Fixture {
    Fixture::default_fixture()
        .with_generated_tenants(count)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A companion's `/readyz` status (0 when it does not answer).
async fn readiness(port: u16) -> u16 {
    match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

mod upstream_failures {
    //! Every Tenant Service and identity provider failure, one row a tenant, through one
    //! Envoy: the answer, the calls, the lock, and that the next request is served at once.

    use super::*;

    /// What a row expects the client to see.
    #[derive(Debug, Clone, Copy)]
    enum Expect {
        /// `200` with the token the login issued.
        Token,
        /// This status and JSON `code`.
        Error(u16, &'static str),
    }

    impl Expect {
        /// The error, if it is one answered from memory for a while afterwards
        /// (negative caching: credentials rejected or not found).
        fn negatively_cached(self) -> Option<(u16, &'static str)> {
            match self {
                Expect::Error(status, code @ ("OAUTH_INVALID_GRANT" | "CREDENTIALS_NOT_FOUND")) => {
                    Some((status, code))
                }
                _ => None,
            }
        }
    }

    /// One row of the matrix.
    struct Case {
        name: &'static str,
        /// Where the faults go.
        endpoint: Endpoint,
        /// Queued before the request, taken one per call.
        faults: Vec<Fault>,
        expect: Expect,
        /// Calls `endpoint` receives for the request.
        calls: u64,
    }

    fn case(
        name: &'static str,
        endpoint: Endpoint,
        faults: Vec<Fault>,
        expect: Expect,
        calls: u64,
    ) -> Case {
        Case {
            name,
            endpoint,
            faults,
            expect,
            calls,
        }
    }

    /// A 200 of the login with this body.
    fn login_ok(body: &str) -> Fault {
        Fault::StatusWithBody(200, body.to_owned())
    }

    /// A 400 of the login with this OAuth error.
    fn login_400(error: &str, description: &str) -> Fault {
        Fault::StatusWithBody(
            400,
            json!({ "error": error, "description": description, "error_description": description })
                .to_string(),
        )
    }

    /// A 200 of `megabytes` MB: no real answer is larger than a few hundred bytes.
    fn oversized(megabytes: usize) -> Fault {
        Fault::StatusWithBody(200, "x".repeat(megabytes << 20))
    }

    /// Short per-attempt timeouts, so a hung upstream costs 400 ms an attempt.
    async fn cluster(tenants: usize) -> Cluster {
        let config = Envoy::filter_config_with(
            json!({ "tenantService": { "timeoutMs": 400 }, "genesys": { "timeoutMs": 400 } }),
        );
        Cluster::start_with_fixture(fixture_with_tenants(tenants), None, 1, 2, 1, &config, &[])
            .await
    }

    /// Runs the rows in order, one fresh tenant each.
    async fn run(cluster: &Cluster, cases: Vec<Case>) {
        let client = reqwest::Client::new();
        let url = cluster.envoys[0].url();
        for (index, case) in cases.into_iter().enumerate() {
            let tenant = generated_tenant_id(index);
            let before = [
                cluster.standins.calls(Endpoint::TenantService),
                cluster.standins.calls(Endpoint::Login),
            ];
            for fault in case.faults {
                cluster.standins.push_fault(case.endpoint, fault);
            }
            let started = Instant::now();
            let outcome = send(&client, &url, &tenant).await;
            let took = started.elapsed();
            let calls = [
                cluster.standins.calls(Endpoint::TenantService) - before[0],
                cluster.standins.calls(Endpoint::Login) - before[1],
            ];
            let name = case.name;
            match case.expect {
                Expect::Token => {
                    let issued = cluster.standins.tokens_issued_to(&tenant);
                    assert_eq!(
                        (outcome.status, outcome.authorization.as_deref()),
                        (200, issued.last().map(|t| format!("Bearer {t}")).as_deref()),
                        "{name}: {}",
                        outcome.body
                    );
                    assert_eq!(issued.len(), 1, "{name}: one token issued");
                }
                Expect::Error(status, code) => {
                    assert_eq!(
                        (outcome.status, outcome.code()),
                        (status, Some(code)),
                        "{name}: {}",
                        outcome.body
                    );
                    assert_eq!(outcome.body["tenantId"], tenant.as_str(), "{name}");
                    assert!(
                        outcome.body["message"]
                            .as_str()
                            .is_some_and(|m| !m.is_empty()),
                        "{name}: a message"
                    );
                }
            }
            // The other stand-in: the login is called only after credentials came back,
            // the Tenant Service once before the login.
            let expected = match (case.endpoint, case.expect) {
                (Endpoint::TenantService, Expect::Token) => [case.calls, 1],
                (Endpoint::TenantService, Expect::Error(..)) => [case.calls, 0],
                _ => [1, case.calls],
            };
            assert_eq!(
                calls, expected,
                "{name}: calls to the Tenant Service and the login"
            );
            assert_eq!(
                cluster.standins.pending_faults(case.endpoint),
                0,
                "{name}: every fault was used"
            );
            assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
            // The next request is served at once: no lock to wait out. An error that
            // asking again cannot fix is answered from memory (negative caching), the
            // same and without a call; any other is not cached: the next request fetches.
            let next = send(&client, &url, &tenant).await;
            if let Some((status, code)) = case.expect.negatively_cached() {
                assert_eq!(
                    (next.status, next.code(), &next.body["message"]),
                    (status, Some(code), &outcome.body["message"]),
                    "{name}: the next request"
                );
                let calls_now = [
                    cluster.standins.calls(Endpoint::TenantService),
                    cluster.standins.calls(Endpoint::Login),
                ];
                assert_eq!(
                    calls_now,
                    [before[0] + calls[0], before[1] + calls[1]],
                    "{name}: answered from memory"
                );
                println!("{name}: {} in {took:?}, then from memory", outcome.status);
                continue;
            }
            let issued = cluster.standins.tokens_issued_to(&tenant);
            assert_eq!(
                (next.status, next.authorization.as_deref()),
                (200, issued.last().map(|t| format!("Bearer {t}")).as_deref()),
                "{name}: the next request: {}",
                next.body
            );
            println!("{name}: {} in {took:?}", outcome.status);
        }
        assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_tenant_service_failure_ends_in_a_token_or_its_error_and_frees_the_lock() {
        use Endpoint::TenantService as Ts;
        use Expect::{Error, Token};
        let cases = vec![
            case("timeout then 200", Ts, vec![Fault::Hang], Token, 2),
            case(
                "500, 502 then 200",
                Ts,
                vec![Fault::Status(500), Fault::Status(502)],
                Token,
                3,
            ),
            case(
                "429 then 200",
                Ts,
                vec![Fault::TooManyRequests {
                    retry_after_secs: None,
                }],
                Token,
                2,
            ),
            case(
                "503 three times",
                Ts,
                vec![Fault::Status(503); 3],
                Error(503, "TENANT_SERVICE_UNAVAILABLE"),
                3,
            ),
            case(
                "timeout three times",
                Ts,
                vec![Fault::Hang; 3],
                Error(503, "TENANT_SERVICE_UNAVAILABLE"),
                3,
            ),
            case(
                "404",
                Ts,
                vec![Fault::Status(404)],
                Error(404, "CREDENTIALS_NOT_FOUND"),
                1,
            ),
            case(
                "400",
                Ts,
                vec![Fault::Status(400)],
                Error(400, "INVALID_REQUEST"),
                1,
            ),
            case(
                "401",
                Ts,
                vec![Fault::InvalidClient],
                Error(503, "TENANT_SERVICE_UNAVAILABLE"),
                1,
            ),
            case(
                "403",
                Ts,
                vec![Fault::Status(403)],
                Error(503, "TENANT_SERVICE_UNAVAILABLE"),
                1,
            ),
            case(
                "200 with HTML",
                Ts,
                vec![Fault::GarbageOk],
                Error(404, "CREDENTIALS_NOT_FOUND"),
                1,
            ),
            case(
                "200 empty",
                Ts,
                vec![Fault::EmptyOk],
                Error(404, "CREDENTIALS_NOT_FOUND"),
                1,
            ),
            case(
                "200 with JSON of the wrong shape",
                Ts,
                vec![Fault::StatusWithBody(200, r#"{"clientId":42}"#.to_owned())],
                Error(404, "CREDENTIALS_NOT_FOUND"),
                1,
            ),
            case("200 of 5 MB then 200", Ts, vec![oversized(5)], Token, 2),
            case(
                "200 of 40 MB (over Envoy's buffer limit) then 200",
                Ts,
                vec![oversized(40)],
                Token,
                2,
            ),
            case(
                "200 of 5 MB three times",
                Ts,
                vec![oversized(5); 3],
                Error(503, "TENANT_SERVICE_UNAVAILABLE"),
                3,
            ),
        ];
        let cluster = cluster(cases.len()).await;
        run(&cluster, cases).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_identity_provider_failure_ends_in_a_token_or_its_error_and_frees_the_lock() {
        use Endpoint::Login;
        use Expect::{Error, Token};
        let unusable = |body: &str| vec![login_ok(body)];
        let cases = vec![
            case("500 then 200", Login, vec![Fault::Status(500)], Token, 2),
            case(
                "502, 503 then 200",
                Login,
                vec![Fault::Status(502), Fault::Status(503)],
                Token,
                3,
            ),
            case(
                "5xx three times",
                Login,
                vec![Fault::Status(500), Fault::Status(502), Fault::Status(503)],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                3,
            ),
            case("timeout then 200", Login, vec![Fault::Hang], Token, 2),
            case(
                "timeout three times",
                Login,
                vec![Fault::Hang; 3],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                3,
            ),
            case(
                "401",
                Login,
                vec![Fault::Status(401)],
                Error(502, "OAUTH_INVALID_GRANT"),
                1,
            ),
            case(
                "400 invalid_client",
                Login,
                vec![Fault::InvalidClient],
                Error(502, "OAUTH_INVALID_GRANT"),
                1,
            ),
            case(
                "400 unauthorized_client",
                Login,
                vec![login_400("unauthorized_client", "client not authorized")],
                Error(502, "OAUTH_INVALID_GRANT"),
                1,
            ),
            case(
                "400 invalid_grant",
                Login,
                vec![login_400("invalid_grant", "grant not allowed")],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                1,
            ),
            case(
                "400 invalid_request",
                Login,
                vec![login_400("invalid_request", "grant_type missing")],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                1,
            ),
            case(
                "400 not JSON",
                Login,
                vec![Fault::StatusWithBody(
                    400,
                    "<html>bad request</html>".to_owned(),
                )],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                1,
            ),
            case(
                "403",
                Login,
                vec![Fault::Status(403)],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                1,
            ),
            case(
                "400 rate limit exceeded then 200",
                Login,
                vec![Fault::RateLimited],
                Token,
                2,
            ),
            case(
                "429 then 200",
                Login,
                vec![Fault::TooManyRequests {
                    retry_after_secs: None,
                }],
                Token,
                2,
            ),
            case(
                "429 three times",
                Login,
                vec![
                    Fault::TooManyRequests {
                        retry_after_secs: None,
                    };
                    3
                ],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                3,
            ),
            case("200 empty then 200", Login, vec![Fault::EmptyOk], Token, 2),
            case(
                "200 with HTML then 200",
                Login,
                vec![Fault::GarbageOk],
                Token,
                2,
            ),
            case(
                "200 without access_token then 200",
                Login,
                unusable(r#"{"token_type":"bearer","expires_in":86399}"#),
                Token,
                2,
            ),
            case("200 of 5 MB then 200", Login, vec![oversized(5)], Token, 2),
            case(
                "expires_in missing then 200",
                Login,
                unusable(r#"{"access_token":"never-injected-1","token_type":"bearer"}"#),
                Token,
                2,
            ),
            case(
                "expires_in 0 then 200",
                Login,
                unusable(r#"{"access_token":"never-injected-2","expires_in":0}"#),
                Token,
                2,
            ),
            case(
                "expires_in negative then 200",
                Login,
                unusable(r#"{"access_token":"never-injected-3","expires_in":-3600}"#),
                Token,
                2,
            ),
            case(
                "expires_in a string then 200",
                Login,
                unusable(r#"{"access_token":"never-injected-4","expires_in":"3600"}"#),
                Token,
                2,
            ),
            case(
                "expires_in 0 three times",
                Login,
                vec![login_ok(r#"{"access_token":"never-injected-5","expires_in":0}"#); 3],
                Error(502, "OAUTH_EXCHANGE_FAILED"),
                3,
            ),
        ];
        let cluster = cluster(cases.len()).await;
        run(&cluster, cases).await;
    }
}

/// `count` concurrent requests, tenant `tenants[i % tenants.len()]` for request `i`.
async fn burst(
    client: &reqwest::Client,
    url: &str,
    tenants: &[&str],
    count: usize,
) -> Vec<Outcome> {
    join_all((0..count).map(|i| send(client, url, tenants[i % tenants.len()]))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_time_or_a_clear_503_and_leaves_no_lock() {
    let companion_args = [
        "--redis-timeout-ms",
        "300",
        "--health-interval-ms",
        "100",
        "--health-failure-threshold",
        "2",
    ];
    let cluster = Cluster::start(
        1,
        2,
        1,
        &Envoy::filter_config_with(json!({})),
        &companion_args,
    )
    .await;
    let client = fresh_connections();
    let url = cluster.envoys[0].url();
    let warm = send(&client, &url, "acme").await;
    assert_token_or(&cluster, &warm, &[]);

    // Slower than usual but within --redis-timeout-ms: only slower.
    cluster.redis.cli(&["CLIENT", "PAUSE", "150", "ALL"]);
    let slowed = burst(&client, &url, &["globex"], 10).await;
    for outcome in &slowed {
        assert_token_or(&cluster, outcome, &[]);
    }

    // Slower than --redis-timeout-ms for 2.5 s: warm tenants are served from Envoy's
    // cache, cold ones get a token (degraded mode) or 503 CACHE_UNAVAILABLE.
    cluster.redis.cli(&["CLIENT", "PAUSE", "2500", "ALL"]);
    let cold = ["initech", "umbrella", "hooli", "wayne"];
    let mut tenants = vec!["acme"; 4];
    tenants.extend(cold);
    let during = burst(&client, &url, &tenants, 40).await;
    for outcome in &during {
        assert_token_or(&cluster, outcome, &[(503, "CACHE_UNAVAILABLE")]);
    }
    let warm_bearer = warm.authorization.as_deref();
    assert!(
        during
            .iter()
            .filter(|o| o.tenant == "acme")
            .all(|o| o.authorization.as_deref() == warm_bearer),
        "warm tenants kept their token"
    );

    // Redis answers again: nothing was left locked, and every tenant is served at once.
    let port = cluster.companions[0].port;
    eventually(
        "the companion trusts Redis again",
        Duration::from_secs(10),
        async || readiness(port).await == 200,
    )
    .await;
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
    let started = Instant::now();
    let after = burst(&client, &url, &cold, 8).await;
    for outcome in &after {
        assert_eq!(outcome.status, 200, "{}: {}", outcome.tenant, outcome.body);
        assert_token_or(&cluster, outcome, &[]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no lock to wait out: {:?}",
        started.elapsed()
    );
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_loses_the_cluster_cache_and_tokens_are_fetched_again() {
    let mut cluster = Cluster::start(2, 2, 1, &Envoy::filter_config_with(json!({})), &[]).await;
    let client = fresh_connections();
    let first = send(&client, &cluster.envoys[0].url(), "acme").await;
    assert_token_or(&cluster, &first, &[]);
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;

    cluster.redis.kill();
    let port = cluster.redis.port;
    cluster.redis = Redis::start_on(cluster.dir.path(), port).await;

    // Envoy 0 still holds the token; Envoy 1 finds the cluster cache empty and fetches.
    let cached = send(&client, &cluster.envoys[0].url(), "acme").await;
    assert_eq!(cached.authorization, first.authorization, "{}", cached.body);
    // The companion's connection to Redis died with it: the first use finds out and
    // retries on a new connection, so no request fails.
    let refetched = burst(&client, &cluster.envoys[1].url(), &["acme"], 10).await;
    let issued = cluster.standins.tokens_issued_to("acme");
    assert_eq!(issued.len(), 2, "one more token for the lost cache");
    let second = format!("Bearer {}", issued[1]);
    for outcome in &refetched {
        assert_eq!(
            (outcome.status, outcome.authorization.as_deref()),
            (200, Some(second.as_str())),
            "{}",
            outcome.body
        );
    }
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_companion_is_bypassed_and_leaves_no_lock_when_it_thaws() {
    let config = Envoy::filter_config_with(
        json!({ "companion": { "timeoutMs": 1000, "retryAfterMs": 500 } }),
    );
    let cluster = Cluster::start(2, 2, 1, &config, &[]).await;
    let client = fresh_connections();
    let (zero, one) = (cluster.envoys[0].url(), cluster.envoys[1].url());
    let warm = send(&client, &zero, "acme").await;
    assert_token_or(&cluster, &warm, &[]);
    // The filter commits after answering; a commit the frozen companion cannot finish
    // leaves its lock to the TTL (like a commit that finds no companion).
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;

    // Frozen (SIGSTOP) for longer than companion.timeoutMs: its TCP backlog accepts the
    // leases, nothing answers them.
    cluster.companions[0].process.signal("STOP");
    let during = join_all([
        send(&client, &zero, "acme"),
        send(&client, &zero, "globex"),
        send(&client, &one, "globex"),
        send(&client, &one, "initech"),
    ])
    .await;
    cluster.companions[0].process.signal("CONT");
    for outcome in &during {
        assert_eq!(outcome.status, 200, "{}: {}", outcome.tenant, outcome.body);
        assert_token_or(&cluster, outcome, &[]);
    }
    assert_eq!(during[0].authorization, warm.authorization);
    assert!(cluster.stat("tokengate.companion_fallback").await >= 3);

    // Thawed, it finds the leases the filter gave up on: none may leave a lock behind.
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // retryAfterMs passes
    let logins = cluster.standins.calls(Endpoint::Login);
    let through_zero = send(&client, &zero, "umbrella").await;
    let through_one = send(&client, &one, "umbrella").await;
    assert_token_or(&cluster, &through_zero, &[]);
    assert_eq!(through_one.authorization, through_zero.authorization);
    assert_eq!(
        cluster.standins.calls(Endpoint::Login),
        logins + 1,
        "the companion collapses fetches again"
    );
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_companion_killed_while_it_fetches_under_its_lock_costs_one_lock_ttl() {
    let companion_args = ["--lock-ttl-ms", "2000", "--fetch-deadline-ms", "1800"];
    let config = Envoy::filter_config_with(json!({ "fetch": "companion" }));
    let mut cluster = Cluster::start(1, 2, 1, &config, &companion_args).await;
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::from_millis(1000));
    let client = fresh_connections();
    let url = cluster.envoys[0].url();

    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { burst(&client, &url, &["acme"], 10).await }
    });
    eventually(
        "the companion calls the login",
        Duration::from_secs(5),
        async || cluster.standins.calls(Endpoint::Login) == 1,
    )
    .await;
    let lock_ttl_ms: i64 = cluster
        .redis
        .cli(&["PTTL", "tokengate:{genesys:acme}:lock"])
        .trim()
        .parse()
        .unwrap_or(-2);
    assert!(
        (1..=2000).contains(&lock_ttl_ms),
        "the lock is held: {lock_ttl_ms}"
    );
    cluster.companions[0].kill();
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::ZERO);

    // Without a companion, `fetch: companion` has no local mode: a clear 503.
    let in_flight = in_flight.await.unwrap_or_else(|e| panic!("{e}"));
    for outcome in &in_flight {
        assert_eq!(
            (outcome.status, outcome.code()),
            (503, Some("COMPANION_UNAVAILABLE")),
            "{}",
            outcome.body
        );
    }
    // Back up, it waits out the dead fetch's lock (2 s), then fetches once.
    cluster.companions[0].restart().await;
    let started = Instant::now();
    let after = burst(&client, &url, &["acme"], 10).await;
    let bearer = cluster
        .standins
        .tokens_issued_to("acme")
        .last()
        .map(|t| format!("Bearer {t}"));
    for outcome in &after {
        assert_eq!(
            (outcome.status, outcome.authorization.as_ref()),
            (200, bearer.as_ref()),
            "{}",
            outcome.body
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(cluster.standins.calls(Endpoint::Login), 2);
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_lost_to_a_companion_restart_is_sent_again_and_frees_the_lock() {
    let config = Envoy::filter_config_with(json!({ "companion": { "retryAfterMs": 3000 } }));
    let mut cluster = Cluster::start(2, 1, 1, &config, &[]).await;
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::from_millis(600));
    let client = reqwest::Client::new();

    let first = tokio::spawn({
        let (client, url) = (client.clone(), cluster.envoys[0].url());
        async move { send(&client, &url, "acme").await }
    });
    // The lease is held and the fetch waits on the login: take the companion away, so
    // that the commit finds nobody.
    eventually(
        "the gateway calls the login",
        Duration::from_secs(5),
        async || cluster.standins.calls(Endpoint::Login) == 1,
    )
    .await;
    cluster.companions[0].kill();
    let first = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_token_or(&cluster, &first, &[]);
    assert_eq!(held_locks(&cluster.redis).len(), 1, "the commit was lost");
    cluster.companions[0].restart().await;

    // The filter sends the commit once more (after companion.retryAfterMs): the lock is
    // freed and the token cached, long before the lock's 30 s TTL.
    assert_no_lock_left(&cluster.redis, Duration::from_secs(8)).await;
    let second = send(&client, &cluster.envoys[1].url(), "acme").await;
    assert_eq!(
        second.authorization, first.authorization,
        "the other Envoy is served the committed token"
    );
    assert_eq!(cluster.standins.calls(Endpoint::Login), 1);
}

/// Sends requests for `tenants` round-robin from `workers` concurrent loops until
/// `stop` is set; returns every outcome.
async fn load(
    client: &reqwest::Client,
    url: &str,
    tenants: &[String],
    workers: usize,
    stop: &AtomicBool,
) -> Vec<Outcome> {
    let loops = (0..workers).map(|worker| async move {
        let mut outcomes = Vec::new();
        let mut next = worker;
        while !stop.load(Ordering::SeqCst) {
            outcomes.push(send(client, url, &tenants[next % tenants.len()]).await);
            next += workers;
        }
        outcomes
    });
    join_all(loops).await.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_companion_restarted_under_load_fails_no_request() {
    let tenants: Vec<String> = (0..40).map(generated_tenant_id).collect();
    let config = Envoy::filter_config_with(
        json!({ "fetchDeadlineMs": 1500, "companion": { "retryAfterMs": 300 } }),
    );
    let lock_ttl = Duration::from_millis(2000);
    let companion_args = ["--lock-ttl-ms", "2000", "--fetch-deadline-ms", "1500"];
    let fixture = fixture_with_tenants(tenants.len());
    let mut cluster =
        Cluster::start_with_fixture(fixture, None, 1, 2, 1, &config, &companion_args).await;
    // Fetches take a while, so some hold a lease when the companion stops.
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::from_millis(400));
    let client = fresh_connections();
    let url = cluster.envoys[0].url();
    let stop = AtomicBool::new(false);

    let restart = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.companions[0].process.signal("TERM");
        wait_until("the companion exits", Duration::from_secs(15), || {
            !cluster.companions[0].process.is_running()
        })
        .await;
        // Down for longer than a fetch: commits find no companion, leases fall back.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        cluster.companions[0].restart().await;
        let stranded = held_locks(&cluster.redis);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, Ordering::SeqCst);
        stranded
    };
    let (outcomes, stranded) = tokio::join!(load(&client, &url, &tenants, 8, &stop), restart);

    for outcome in &outcomes {
        assert_eq!(outcome.status, 200, "{}: {}", outcome.tenant, outcome.body);
        assert_token_or(&cluster, outcome, &[]);
    }
    assert!(
        cluster.stat("tokengate.companion_fallback").await >= 1,
        "requests were served in local mode while the companion was down"
    );
    println!(
        "{} requests over a companion restart; locks of commits that found no companion: {}",
        outcomes.len(),
        stranded.len()
    );
    // The restarted companion collapses fetches again: a new tenant's token lands in Redis.
    cluster
        .standins
        .set_latency(Endpoint::Login, Duration::ZERO);
    let after = send(&client, &url, "acme").await;
    assert_token_or(&cluster, &after, &[]);
    // The commit leaves with the request's answer, not before it.
    eventually(
        "acme's token is committed",
        Duration::from_secs(3),
        async || {
            cluster
                .redis
                .cli(&["EXISTS", "tokengate:{genesys:acme}:token"])
                .trim()
                == "1"
        },
    )
    .await;
    // A fetch whose commit found no companion leaves its lock to expire at the lock TTL.
    assert_no_lock_left(&cluster.redis, lock_ttl + LOCK_RELEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_hot_restart_under_load_fails_no_request() {
    let tenants: Vec<String> = (0..30).map(generated_tenant_id).collect();
    let cluster = Cluster::start_with_fixture(
        fixture_with_tenants(tenants.len()),
        None,
        0,
        2,
        1,
        &Envoy::default_filter_config(),
        &[],
    )
    .await;
    let upstreams = EnvoyUpstreams {
        companion_port: cluster.companions[0].port,
        tenant_service: cluster.standins.tenant_service,
        login: cluster.standins.login,
        echo: cluster.standins.echo,
        idp: None,
    };
    let mut envoy = Envoy::start_hot_restartable(
        cluster.dir.path(),
        &upstreams,
        &Envoy::default_filter_config(),
        2,
    )
    .await;
    let url = envoy.url();
    let (fresh, pooled) = (fresh_connections(), reqwest::Client::new());
    let stop = AtomicBool::new(false);

    let restart = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut previous = envoy.hot_restart().await;
        wait_until("the previous epoch exits", Duration::from_secs(10), || {
            !previous.is_running()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
    };
    let (on_fresh, on_pooled, ()) = tokio::join!(
        load(&fresh, &url, &tenants, 4, &stop),
        load(&pooled, &url, &tenants, 4, &stop),
        restart
    );

    let mut per_tenant: BTreeMap<&str, usize> = BTreeMap::new();
    for outcome in on_fresh.iter().chain(&on_pooled) {
        assert_eq!(outcome.status, 200, "{}: {}", outcome.tenant, outcome.body);
        assert_token_or(&cluster, outcome, &[]);
        *per_tenant.entry(&outcome.tenant).or_default() += 1;
    }
    println!(
        "{} requests over a hot restart ({} on new connections)",
        on_fresh.len() + on_pooled.len(),
        on_fresh.len()
    );
    assert_eq!(
        cluster.standins.tokens_issued(),
        per_tenant.len() as u64,
        "the new epoch's empty cache was filled from Redis, not the login"
    );
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
    drop(envoy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expires_in_beyond_48_hours_is_clamped_to_48_hours() {
    let cluster = Cluster::start(1, 1, 1, &Envoy::filter_config_with(json!({})), &[]).await;
    cluster.standins.set_expires_in(1_000_000_000_000);

    let answer = send(&reqwest::Client::new(), &cluster.envoys[0].url(), "acme").await;

    assert_token_or(&cluster, &answer, &[]);
    // The commit to the companion goes on after the request was resumed.
    let ttl_of_token = || -> u64 {
        cluster
            .redis
            .cli(&["PTTL", "tokengate:{genesys:acme}:token"])
            .trim()
            .parse()
            .unwrap_or(0)
    };
    eventually("the token's commit", Duration::from_secs(5), async || {
        ttl_of_token() > 0
    })
    .await;
    let ttl_ms = ttl_of_token();
    let max_ms = 48 * 3600 * 1000;
    assert!(
        (max_ms - 60_000..=max_ms).contains(&ttl_ms),
        "cached for 48 h, not 31,000 years: {ttl_ms} ms"
    );
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_tenant_is_answered_from_memory_by_every_worker_and_envoy_then_asked_again() {
    // Two Envoys of two workers; both the filter and the companion remember a rejection
    // for 1.5 s.
    let config = Envoy::filter_config_with(json!({ "negativeCacheMs": 1_500 }));
    let cluster = Cluster::start(2, 2, 1, &config, &["--negative-cache-ms", "1500"]).await;
    let client = fresh_connections();
    cluster
        .standins
        .push_fault(Endpoint::Login, Fault::InvalidClient);

    let rejected_at = Instant::now();
    let first = send(&client, &cluster.envoys[0].url(), "acme").await;
    assert_eq!(
        (first.status, first.code()),
        (502, Some("OAUTH_INVALID_GRANT")),
        "{}",
        first.body
    );
    // Every worker of both Envoys (new connections land on either worker) answers the
    // same error, without a call to the Tenant Service or the login.
    let urls = [cluster.envoys[0].url(), cluster.envoys[1].url()];
    let again = join_all((0..20).map(|i| send(&client, &urls[i % 2], "acme"))).await;
    assert!(
        rejected_at.elapsed() < Duration::from_millis(1_500),
        "the burst ran inside the window: {:?}",
        rejected_at.elapsed()
    );
    for outcome in &again {
        assert_eq!(
            (outcome.status, outcome.code(), &outcome.body["message"]),
            (502, Some("OAUTH_INVALID_GRANT"), &first.body["message"]),
        );
    }
    assert_eq!(
        [
            cluster.standins.calls(Endpoint::TenantService),
            cluster.standins.calls(Endpoint::Login)
        ],
        [1, 1],
        "one rejected login for 21 requests"
    );
    // Envoy 1 answered from its own memory; Envoy 2's lease was answered the error by
    // the companion (then Envoy 2 remembered it too).
    assert!(cluster.envoys[0].stat("tokengate.negative_cache_hit").await >= 1);
    let from_companion = cluster.companions[0]
        .metric("tokengate_companion_leases_total{outcome=\"cached_failure\"}")
        .await;
    assert!(from_companion >= 1.0, "{from_companion}");

    // Once the window is over, the next request asks again (and the login, without a
    // fault now, issues a token).
    eventually(
        "a token after the window",
        Duration::from_secs(5),
        async || send(&client, &urls[1], "acme").await.status == 200,
    )
    .await;
    assert!(rejected_at.elapsed() >= Duration::from_millis(1_400));
    assert_eq!(cluster.standins.calls(Endpoint::Login), 2);
    assert_no_lock_left(&cluster.redis, LOCK_RELEASE).await;
}
