//! The worker's rules on the recording fake host: every callout it sends is answered
//! by the test, the clock only moves when the test moves it, and each test asserts what
//! the requests, the companion and the stats would see. Nothing here sleeps.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use tokengate::ask::request_ids;
use tokengate::config::FilterConfig;
use tokengate::fake::{FakeEnvoy, FakeHeaders, FakeHost, SentCallout};
use tokengate::host::{Level, Metric, ProviderEvent};
use tokengate::records::LruRecords;
use tokengate::slots::Table;
use tokengate::worker::{Decision, Delivery, RequestIds, TokenAsk, Worker, WorkerLoad};
use tokengate_core::cache::{GatewayEntry, REFRESH_RETRY_MS};
use tokengate_core::limit::WINDOW_MS;
use tokengate_core::{
    CachedToken, CalloutResult, ErrorCode, Provider, SecretBytes, TenantId, TokenKey,
};

const START_MS: u64 = 1_700_000_000_000;
/// `cache.maxTenants` by default.
const DEFAULT_MAX_TENANTS: u32 = 100_000;
const COMPANION: &str = "tokengate_companion";
const TENANT_SERVICE: &str = "tenant_service";
const LOGIN: &str = "genesys_eu-west-1";
const CREDENTIALS: &str = r#"{"clientId":"id-1","clientSecret":"s3cret","region":"eu-west-1"}"#;
/// An Envoy local reply for a callout to a cluster nobody listens on.
const ENVOY_CONNECT_FAILURE: &str = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure, transport failure reason: delayed connect error: Connection refused";

fn key(tenant: &str) -> TokenKey {
    TokenKey::new(Provider::genesys(), TenantId::parse(tenant).unwrap())
}

fn response(status: u16, body: &str) -> CalloutResult {
    CalloutResult::Response {
        status,
        body: SecretBytes::new(body.as_bytes().to_vec()),
        retry_after_secs: None,
    }
}

fn login_answer(token: &str, expires_in_secs: u64) -> String {
    json!({"access_token": token, "token_type": "bearer", "expires_in": expires_in_secs})
        .to_string()
}

fn lease_granted(lease_id: &str) -> String {
    json!({"outcome": "fetch", "leaseId": lease_id, "leaseTtlMs": 30_000}).to_string()
}

/// One worker of a fake Envoy, with the calls a host makes, shortened.
struct Rig {
    worker: Worker,
    host: FakeHost,
}

impl Rig {
    fn new(overrides: Value) -> Self {
        Self::on(&FakeEnvoy::starting_at(START_MS), overrides, 1)
    }

    /// Worker number `id` (also its wake queue) of `envoy`.
    fn on(envoy: &FakeEnvoy, overrides: Value, id: u32) -> Self {
        let config = FilterConfig::parse(overrides.to_string().as_bytes()).unwrap();
        Self {
            worker: Worker::new(config, u64::from(id), Some(id)),
            host: envoy.host(),
        }
    }

    fn ask(&mut self, context_id: u32, tenant: &str) -> Decision {
        self.ask_for(context_id, tenant, Delivery::Inject, false)
    }

    fn ask_for(
        &mut self,
        context_id: u32,
        tenant: &str,
        delivery: Delivery,
        force_refresh: bool,
    ) -> Decision {
        let ask = TokenAsk {
            context_id,
            key: key(tenant),
            delivery,
            force_refresh,
        };
        let ids = RequestIds {
            correlation_id: Some(format!("req-{context_id}")),
            traceparent: None,
        };
        self.worker.on_request(&mut self.host, ask, || ids)
    }

    /// Request `context_id` for `tenant` with these headers, read as the hosts read
    /// them.
    fn ask_with_headers(
        &mut self,
        context_id: u32,
        tenant: &str,
        headers: &[(&'static str, &'static str)],
    ) {
        let ask = TokenAsk {
            context_id,
            key: key(tenant),
            delivery: Delivery::Inject,
            force_refresh: false,
        };
        let headers = FakeHeaders::new(headers.to_vec());
        let decision = self
            .worker
            .on_request(&mut self.host, ask, || request_ids(&headers));
        assert!(matches!(decision, Decision::Pause), "a miss");
    }

    fn tick(&mut self) {
        self.worker.on_tick(&mut self.host);
    }

    fn advance(&mut self, ms: u64) {
        self.host.envoy().advance(ms);
    }

    fn answer(&mut self, callout: &SentCallout, result: CalloutResult) {
        self.worker
            .on_callout_response(&mut self.host, callout.id, result);
    }

    /// The one callout sent since the last look, checked to go to `cluster` `path`.
    fn sent_one(&mut self, cluster: &str, path: &str) -> SentCallout {
        let mut sent = self.host.take_sent();
        assert_eq!(
            sent.len(),
            1,
            "expected one callout to {cluster} {path}: {sent:#?}"
        );
        let callout = sent.remove(0);
        assert_eq!(
            (callout.cluster.as_str(), callout.path.as_str()),
            (cluster, path)
        );
        callout
    }

    fn nothing_sent(&mut self) {
        let sent = self.host.take_sent();
        assert!(sent.is_empty(), "expected no callout: {sent:#?}");
    }

    /// Runs a fetch of `tenant` from its lease on: the companion grants the lease, the
    /// Tenant Service and the login answer, and `token` is issued for `lifetime_secs`.
    fn fetch_with_lease(&mut self, tenant: &str, token: &str, lifetime_secs: u64) {
        self.lease_granted(tenant);
        self.fetch_from_tenant_service(tenant, token, lifetime_secs);
    }

    /// Request `context_id` for `tenant`, whose credentials the Tenant Service does not
    /// have: the lease is granted, then aborted.
    fn not_found(&mut self, context_id: u32, tenant: &str) {
        let _ = self.ask(context_id, tenant);
        self.lease_granted(tenant);
        let credentials = self.sent_one(
            TENANT_SERVICE,
            &format!("/tenants/{tenant}/credentials/genesys"),
        );
        self.answer(&credentials, response(404, ""));
        let _abort = self.sent_one(COMPANION, "/v1/abort");
    }

    /// On the next tick the worker leases `tenant`'s key, and the companion grants it.
    fn lease_granted(&mut self, tenant: &str) {
        self.tick();
        let lease = self.sent_one(COMPANION, "/v1/lease");
        assert_eq!(lease.json()["tenantId"], tenant);
        self.answer(&lease, response(200, &lease_granted("lease-1")));
    }

    /// The Tenant Service and login steps of a fetch already under way.
    fn fetch_from_tenant_service(&mut self, tenant: &str, token: &str, lifetime_secs: u64) {
        let credentials = self.sent_one(
            TENANT_SERVICE,
            &format!("/tenants/{tenant}/credentials/genesys"),
        );
        self.answer(&credentials, response(200, CREDENTIALS));
        let login = self.sent_one(LOGIN, "/oauth/token");
        assert_eq!(login.authority, "login.mypurecloud.ie");
        assert_eq!(
            String::from_utf8_lossy(&login.body),
            "grant_type=client_credentials"
        );
        self.answer(&login, response(200, &login_answer(token, lifetime_secs)));
    }

    /// The contexts resumed with `Bearer <token>`, in order.
    fn resumed_with(&self, token: &str) -> Vec<u32> {
        self.host
            .resumed
            .iter()
            .filter(|resumed| {
                resumed.header == "authorization" && resumed.value == format!("Bearer {token}")
            })
            .map(|resumed| resumed.context_id)
            .collect()
    }

    fn cached_entry(&self, tenant: &str) -> Option<GatewayEntry> {
        let slots = self.worker.config().slots();
        let found = slots.find(&self.host, Table::Tokens, &key(tenant))?;
        GatewayEntry::decode(&found.record)
    }
}

fn cached_token(decision: Decision) -> CachedToken {
    match decision {
        Decision::Cached(token) => token,
        Decision::Pause => panic!("expected a cache hit, the request was paused"),
    }
}

// --- Tier 1: one fetch per key per worker ---------------------------------------------

#[test]
fn requests_that_miss_together_share_one_fetch_and_all_get_its_token() {
    let mut rig = Rig::new(json!({}));
    for context_id in [1, 2, 3] {
        assert!(matches!(rig.ask(context_id, "acme"), Decision::Pause));
    }
    assert_eq!(
        rig.host.tick_period_ms, 1,
        "the fetch starts on the next tick"
    );
    rig.nothing_sent();

    rig.fetch_with_lease("acme", "tok-acme", 3_600);

    assert_eq!(rig.resumed_with("tok-acme"), [1, 2, 3]);
    let commit = rig.sent_one(COMPANION, "/v1/commit");
    assert_eq!(commit.json()["leaseId"], "lease-1");
    assert_eq!(commit.json()["accessToken"], "tok-acme");
    assert_eq!(rig.host.stat(Metric::CacheMiss), 3);
    assert_eq!(rig.host.stat(Metric::CollapsedWaiter), 2);
    assert_eq!(rig.host.stat(Metric::FetchStarted), 1);
    assert_eq!(rig.host.stat(Metric::FetchSucceeded), 1);
    let genesys = |event| rig.host.stat(Metric::Provider(0, event));
    assert_eq!(
        [ProviderEvent::FetchStarted, ProviderEvent::FetchSucceeded].map(genesys),
        [1, 1]
    );
    let entry = rig
        .cached_entry("acme")
        .expect("cached for the other workers");
    assert_eq!(entry.token.expires_at_ms, START_MS + 3_600_000);
    assert_eq!(rig.host.tick_period_ms, 0, "idle: no timer");
}

#[test]
fn a_fetched_token_is_logged_once_for_all_its_waiters() {
    let mut rig = Rig::new(json!({}));
    for context_id in [7, 8, 9] {
        let _ = rig.ask(context_id, "acme");
    }
    rig.fetch_with_lease("acme", "tok-acme", 3_600);

    let lines = rig.host.logs_at(Level::Info);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("token request genesys:acme source=fresh")
            && lines[0].contains("waiters=3")
            && lines[0].contains("correlation_id=req-7"),
        "{}",
        lines[0]
    );
    assert!(
        rig.host
            .logs
            .iter()
            .all(|(_, line)| !line.contains("tok-acme") && !line.contains("s3cret")),
        "no token or secret in a log line"
    );
}

#[test]
fn a_cached_token_is_served_without_callouts() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let _ = rig.host.take_sent();

    rig.advance(60_000);
    let token = cached_token(rig.ask(2, "acme"));

    assert_eq!(token.access_token.expose(), "tok-acme");
    rig.tick();
    rig.nothing_sent();
    assert_eq!(rig.host.stat(Metric::CacheHit), 1);
}

#[test]
fn two_tenants_never_share_a_token() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let _ = rig.host.take_sent();
    let _ = rig.ask(2, "globex");
    rig.fetch_with_lease("globex", "tok-globex", 3_600);

    assert_eq!(rig.resumed_with("tok-acme"), [1]);
    assert_eq!(rig.resumed_with("tok-globex"), [2]);
    assert_eq!(
        cached_token(rig.ask(3, "globex")).access_token.expose(),
        "tok-globex"
    );
}

#[test]
fn an_expired_token_is_never_served() {
    let mut rig = Rig::new(
        json!({"expiryMarginMs": 5_000, "refreshAhead": {"percent": 0, "minLeadMs": 6_000}}),
    );
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 60);
    let _ = rig.host.take_sent();

    rig.advance(60_000 - 5_000);
    assert!(
        matches!(rig.ask(2, "acme"), Decision::Pause),
        "inside the expiry margin the token is not injected"
    );
}

#[test]
fn a_request_that_left_is_not_resumed_and_the_fetch_goes_on() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    let _ = rig.ask(2, "acme");
    let _ = rig.ask(3, "acme");
    rig.worker.on_request_gone(1);
    // Request 3 is gone too, but the worker learns it only when resuming it fails.
    rig.host.gone.insert(3);

    rig.fetch_with_lease("acme", "tok-acme", 3_600);

    assert_eq!(rig.resumed_with("tok-acme"), [2]);
    assert!(rig.cached_entry("acme").is_some());
    assert_eq!(
        rig.worker.load().delivered,
        1,
        "only the resumed request awaits its upstream's answer"
    );
}

// --- Tier 2: one fetch per key per Envoy ----------------------------------------------

/// An Envoy of each kind of gateway cache, bounded to `max_tenants`: slot tables over
/// shared data (the wasm build) and the host's own least-recently-used maps (the
/// native build). The rules that share the cache between workers hold on both.
fn envoys_of_both_caches(max_tenants: u32) -> [FakeEnvoy; 2] {
    [
        FakeEnvoy::starting_at(START_MS),
        FakeEnvoy::starting_at(START_MS).keeping_records_in(LruRecords::new(max_tenants)),
    ]
}

/// Two workers of `envoy`, both asked for acme's token: the first (request 1) claims
/// the key and sends the lease returned; the second (request 2) waits on it.
fn one_leases_the_other_waits(
    envoy: FakeEnvoy,
    overrides: Value,
) -> (FakeEnvoy, Rig, Rig, SentCallout) {
    let mut first = Rig::on(&envoy, overrides.clone(), 1);
    let mut second = Rig::on(&envoy, overrides, 2);
    let _ = first.ask(1, "acme");
    first.tick();
    let lease = first.sent_one(COMPANION, "/v1/lease");
    let _ = second.ask(2, "acme");
    second.tick();
    second.nothing_sent();
    (envoy, first, second, lease)
}

#[test]
fn a_worker_waits_for_the_peer_that_fetches_and_is_woken_with_its_token() {
    for envoy in envoys_of_both_caches(DEFAULT_MAX_TENANTS) {
        let (envoy, mut first, mut second, lease) = one_leases_the_other_waits(envoy, json!({}));
        assert_eq!(second.host.stat(Metric::CollapsedWaiter), 1);

        first.answer(&lease, response(200, &lease_granted("lease-1")));
        first.fetch_from_tenant_service("acme", "tok-acme", 3_600);
        assert_eq!(
            envoy.take_woken(),
            [2],
            "the waiting worker's queue is woken"
        );

        second.worker.on_wake(&mut second.host);
        assert_eq!(second.resumed_with("tok-acme"), [2]);
        second.nothing_sent();
        assert_eq!(second.host.stat(Metric::FetchStarted), 0);
    }
}

#[test]
fn a_peer_that_never_finishes_is_taken_over_when_its_claim_runs_out() {
    let overrides = json!({"companion": {"timeoutMs": 2_000}, "fetchDeadlineMs": 3_000});
    for envoy in envoys_of_both_caches(DEFAULT_MAX_TENANTS) {
        let (envoy, _first, mut second, _lost) =
            one_leases_the_other_waits(envoy, overrides.clone());

        envoy.advance(4_999);
        second.tick();
        second.nothing_sent();
        envoy.advance(1);
        second.tick();

        let lease = second.sent_one(COMPANION, "/v1/lease");
        second.answer(&lease, response(200, &lease_granted("lease-2")));
        second.fetch_from_tenant_service("acme", "tok-acme", 3_600);
        assert_eq!(second.resumed_with("tok-acme"), [2]);
    }
}

#[test]
fn a_peers_failure_is_answered_to_the_workers_that_waited_on_it() {
    for envoy in envoys_of_both_caches(DEFAULT_MAX_TENANTS) {
        let (_envoy, mut first, mut second, lease) = one_leases_the_other_waits(envoy, json!({}));

        first.answer(&lease, response(200, &lease_granted("lease-1")));
        let credentials = first.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
        first.answer(&credentials, response(404, "{}"));
        second.worker.on_wake(&mut second.host);

        for rig in [&first, &second] {
            let reply = rig.host.replies.last().expect("answered");
            assert_eq!(
                (reply.status, reply.body["code"].as_str()),
                (404, Some("CREDENTIALS_NOT_FOUND"))
            );
        }
        assert_eq!(second.host.replies[0].body["correlationId"], "req-2");
        second.nothing_sent();
        let abort = first.sent_one(COMPANION, "/v1/abort");
        assert_eq!(abort.json()["leaseId"], "lease-1");
    }
}

// --- Tier 3 answers: the companion's cache, its errors, and its absence -----------------

#[test]
fn a_token_from_the_cluster_cache_is_used_without_fetching() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    let hit =
        json!({"outcome": "hit", "accessToken": "tok-cluster", "expiresAtMs": START_MS + 600_000});
    rig.answer(&lease, response(200, &hit.to_string()));

    assert_eq!(rig.resumed_with("tok-cluster"), [1]);
    rig.nothing_sent();
    assert_eq!(rig.host.stat(Metric::ClusterCacheHit), 1);
    assert_eq!(rig.host.stat(Metric::FetchStarted), 0);
    assert!(
        rig.cached_entry("acme").is_some(),
        "kept for the other workers"
    );
}

#[test]
fn a_cluster_token_that_expired_before_its_answer_was_handled_is_never_injected() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    // The answer is handled 20 s after it was sent; the token it carries lived 10 s.
    rig.advance(20_000);
    let hit =
        json!({"outcome": "hit", "accessToken": "tok-cluster", "expiresAtMs": START_MS + 10_000});
    rig.answer(&lease, response(200, &hit.to_string()));

    assert!(rig.resumed_with("tok-cluster").is_empty());
    assert!(rig.host.replies.is_empty(), "the request still waits");
    assert!(rig.cached_entry("acme").is_none(), "not cached either");
    // It is asked again, for a token that outlives the margin from now.
    let again = rig.sent_one(COMPANION, "/v1/lease");
    let now_ms = START_MS + 20_000;
    assert_eq!(again.json()["minExpiresAtMs"], now_ms + 5_000);
    let hit = json!({"outcome": "hit", "accessToken": "tok-new", "expiresAtMs": now_ms + 600_000});
    rig.answer(&again, response(200, &hit.to_string()));
    assert_eq!(rig.resumed_with("tok-new"), [1]);
}

#[test]
fn a_companion_token_answered_after_its_expiry_is_never_injected() {
    let mut rig = Rig::new(json!({"fetch": "companion"}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let request = rig.sent_one(COMPANION, "/auth/token");
    rig.advance(20_000);
    // Lived 10 s from the request: expired 10 s before the answer was handled.
    let answer = json!({
        "accessToken": "tok-acme", "expiresIn": 10, "tokenType": "Bearer",
        "source": "fresh", "expiresAt": "unreadable"
    });
    rig.answer(&request, response(200, &answer.to_string()));

    assert!(rig.resumed_with("tok-acme").is_empty());
    let reply = &rig.host.replies[0];
    assert_eq!((reply.context_id, reply.status), (1, 503));
}

#[test]
fn the_companions_own_error_reaches_the_client_and_a_refused_key_is_the_gateways_fault() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    let busy = json!({"code": "LOCK_ACQUISITION_FAILED", "message": "lock held too long"});
    rig.answer(&lease, response(503, &busy.to_string()));
    assert_eq!(rig.host.replies[0].body["code"], "LOCK_ACQUISITION_FAILED");

    let _ = rig.ask(2, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    let refused = json!({"code": "UNAUTHORIZED", "message": "bad key"});
    rig.answer(&lease, response(401, &refused.to_string()));
    assert_eq!(
        (
            rig.host.replies[1].status,
            rig.host.replies[1].body["code"].as_str()
        ),
        (503, Some("COMPANION_UNAVAILABLE"))
    );
    assert_eq!(
        rig.host.stat(Metric::CompanionFallback),
        0,
        "an answering companion is up"
    );
}

#[test]
fn without_an_answering_companion_the_worker_fetches_locally_then_tries_it_again() {
    let mut rig = Rig::new(json!({"companion": {"retryAfterMs": 5_000}}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    rig.answer(&lease, response(503, ENVOY_CONNECT_FAILURE));

    rig.fetch_from_tenant_service("acme", "tok-acme", 3_600);
    assert_eq!(rig.resumed_with("tok-acme"), [1]);
    assert_eq!(rig.host.stat(Metric::CompanionFallback), 1);
    rig.nothing_sent(); // no commit: there is no lease
    let warning = rig.host.logs_at(Level::Warn).join("\n");
    assert!(
        warning.contains("companion unreachable (connection refused)"),
        "{warning}"
    );

    let _ = rig.ask(2, "globex");
    rig.tick();
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/globex/credentials/genesys");
    rig.answer(&credentials, response(200, CREDENTIALS));
    let _login = rig.sent_one(LOGIN, "/oauth/token");

    rig.advance(5_000);
    let _ = rig.ask(3, "initech");
    rig.tick();
    let _lease = rig.sent_one(COMPANION, "/v1/lease");
}

#[test]
fn local_mode_admits_a_limited_number_of_fetches_per_key_per_rolling_minute() {
    let mut rig =
        Rig::new(json!({"companion": {"localFetchesPerMinute": 2, "retryAfterMs": 600_000}}));
    rig.host.refused_clusters.insert(COMPANION.to_owned());
    for (context_id, at) in [(1, 0), (2, 10_000)] {
        rig.advance(at);
        let _ = rig.ask(context_id, "acme");
        rig.tick();
        let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
        rig.answer(&credentials, response(404, "{}"));
    }

    rig.advance(30_000);
    let _ = rig.ask(3, "acme");
    rig.tick();
    rig.nothing_sent();
    let refused = &rig.host.replies[2];
    assert_eq!(
        (refused.status, refused.body["code"].as_str()),
        (503, Some("COMPANION_UNAVAILABLE"))
    );
    assert!(
        refused.body["message"]
            .as_str()
            .unwrap()
            .contains("next is allowed in 20 s"),
        "{}",
        refused.body
    );
    let _ = rig.ask(4, "globex");
    rig.tick();
    let _ = rig.sent_one(TENANT_SERVICE, "/tenants/globex/credentials/genesys");

    rig.advance(WINDOW_MS - 40_000);
    let _ = rig.ask(5, "acme");
    rig.tick();
    let _ = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    assert_eq!(rig.host.stat(Metric::CompanionFallback), 4);
}

// --- Fetch stages driven by core's flow -----------------------------------------------

#[test]
fn a_backoff_sets_the_timer_to_its_end_and_retries_then() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.lease_granted("acme");
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    rig.answer(&credentials, response(503, ""));
    assert_eq!(rig.host.tick_period_ms, 500, "the seed's first backoff");

    rig.advance(499);
    rig.tick();
    rig.nothing_sent();
    rig.advance(1);
    rig.tick();
    rig.fetch_from_tenant_service("acme", "tok-acme", 3_600);
    assert_eq!(rig.resumed_with("tok-acme"), [1]);
}

#[test]
fn a_callout_the_host_refuses_counts_as_no_answer_and_is_retried() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    rig.host.refused_clusters.insert(TENANT_SERVICE.to_owned());
    rig.answer(&lease, response(200, &lease_granted("lease-1")));
    rig.nothing_sent();
    assert!(rig.host.logs_at(Level::Error)[0].contains("could not be sent"));

    rig.host.refused_clusters.clear();
    rig.advance(500);
    rig.tick();
    rig.fetch_from_tenant_service("acme", "tok-acme", 3_600);
    assert_eq!(rig.resumed_with("tok-acme"), [1]);
}

#[test]
fn a_fetch_that_cannot_finish_before_its_deadline_fails_instead_of_retrying() {
    let mut rig = Rig::new(json!({"fetchDeadlineMs": 1_000}));
    let _ = rig.ask(1, "acme");
    rig.lease_granted("acme");
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    assert!(
        credentials.timeout_ms <= 1_000,
        "an attempt never outlives the deadline"
    );
    rig.advance(600);
    rig.answer(&credentials, CalloutResult::NoResponse);

    let reply = &rig.host.replies[0];
    assert_eq!(
        (reply.status, reply.body["code"].as_str()),
        (503, Some("TENANT_SERVICE_UNAVAILABLE"))
    );
    let _abort = rig.sent_one(COMPANION, "/v1/abort");
}

// --- Lease ends ----------------------------------------------------------------------

#[test]
fn a_commit_lost_to_a_companion_restart_is_sent_once_more() {
    let mut rig = Rig::new(json!({"companion": {"retryAfterMs": 2_000}}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let commit = rig.sent_one(COMPANION, "/v1/commit");
    rig.answer(&commit, CalloutResult::NoResponse);
    assert_eq!(rig.host.tick_period_ms, 1_000, "a timer runs for the retry");

    rig.advance(1_999);
    rig.tick();
    rig.nothing_sent();
    rig.advance(1);
    rig.tick();
    let again = rig.sent_one(COMPANION, "/v1/commit");
    assert_eq!(again.body, commit.body, "the same commit");

    rig.answer(&again, response(502, ""));
    rig.advance(10_000);
    rig.tick();
    rig.nothing_sent();
    assert_eq!(rig.host.tick_period_ms, 0, "sent once more, not forever");
}

#[test]
fn an_abort_the_companion_answered_is_not_sent_again() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    rig.answer(&lease, response(200, &lease_granted("lease-9")));
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    rig.answer(&credentials, response(400, "{}"));
    let abort = rig.sent_one(COMPANION, "/v1/abort");
    rig.answer(&abort, response(200, "{}"));

    rig.advance(60_000);
    rig.tick();
    rig.nothing_sent();
}

// --- Refresh-ahead -------------------------------------------------------------------

#[test]
fn a_token_near_expiry_is_served_at_once_while_one_refresh_runs() {
    let mut rig = Rig::new(json!({"refreshAhead": {"percent": 10, "minLeadMs": 30_000}}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-old", 3_600);
    let _ = rig.host.take_sent();
    let old_expiry = START_MS + 3_600_000;

    rig.advance(3_600_000 - 180_000); // the latest a refresh can start (jitter)
    for context_id in [2, 3, 4] {
        assert_eq!(
            cached_token(rig.ask(context_id, "acme"))
                .access_token
                .expose(),
            "tok-old"
        );
    }
    assert_eq!(rig.host.stat(Metric::RefreshAhead), 1);
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    assert_eq!(
        lease.json()["minExpiresAtMs"],
        old_expiry,
        "a newer token is asked for"
    );
    rig.answer(&lease, response(200, &lease_granted("lease-2")));
    rig.fetch_from_tenant_service("acme", "tok-new", 3_600);

    assert_eq!(
        cached_token(rig.ask(5, "acme")).access_token.expose(),
        "tok-new"
    );
}

#[test]
fn a_refresh_queued_behind_another_workers_takes_its_newer_token_from_the_cache() {
    let overrides = json!({"refreshAhead": {"percent": 10, "minLeadMs": 30_000}});
    for envoy in envoys_of_both_caches(DEFAULT_MAX_TENANTS) {
        let mut first = Rig::on(&envoy, overrides.clone(), 1);
        let mut second = Rig::on(&envoy, overrides.clone(), 2);
        let _ = first.ask(1, "acme");
        first.fetch_with_lease("acme", "tok-old", 3_600);
        let _ = first.host.take_sent();

        envoy.advance(3_600_000 - 180_000);
        let _ = cached_token(first.ask(2, "acme"));
        let _ = cached_token(second.ask(3, "acme"));
        assert_eq!(
            first.host.stat(Metric::RefreshAhead) + second.host.stat(Metric::RefreshAhead),
            2,
            "both queued a refresh before either started"
        );
        first.tick();
        let lease = first.sent_one(COMPANION, "/v1/lease");
        first.answer(&lease, response(200, &lease_granted("lease-2")));
        first.fetch_from_tenant_service("acme", "tok-new", 3_600);

        second.tick();
        second.nothing_sent();
        assert_eq!(
            cached_token(second.ask(4, "acme")).access_token.expose(),
            "tok-new"
        );
    }
}

#[test]
fn after_a_failed_refresh_the_old_token_serves_and_every_worker_waits_for_the_retry() {
    let envoy = FakeEnvoy::starting_at(START_MS);
    let mut first = Rig::on(&envoy, json!({}), 1);
    let mut second = Rig::on(&envoy, json!({}), 2);
    let _ = first.ask(1, "acme");
    first.fetch_with_lease("acme", "tok-old", 3_600);
    let _ = first.host.take_sent();
    envoy.advance(3_600_000 - 180_000); // the latest a refresh can start (jitter)

    let _ = cached_token(first.ask(2, "acme"));
    first.tick();
    let lease = first.sent_one(COMPANION, "/v1/lease");
    first.answer(&lease, response(200, &lease_granted("lease-2")));
    let credentials = first.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    first.answer(&credentials, response(400, "{}"));
    let _abort = first.sent_one(COMPANION, "/v1/abort");
    assert!(
        first.host.replies.is_empty(),
        "nobody waited on the refresh"
    );

    envoy.advance(REFRESH_RETRY_MS - 1);
    for rig in [&mut first, &mut second] {
        let _ = cached_token(rig.ask(3, "acme"));
        rig.tick();
        rig.nothing_sent();
    }
    envoy.advance(1);
    let _ = cached_token(second.ask(4, "acme"));
    second.tick();
    let _lease = second.sent_one(COMPANION, "/v1/lease");
    assert_eq!(
        first.host.stat(Metric::RefreshAhead) + second.host.stat(Metric::RefreshAhead),
        2
    );
}

// --- Token lifetimes -----------------------------------------------------------------

#[test]
fn a_token_answered_late_lives_from_when_its_request_was_sent() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.lease_granted("acme");
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    rig.answer(&credentials, response(200, CREDENTIALS));
    let login = rig.sent_one(LOGIN, "/oauth/token");
    let sent_at_ms = rig.host.now();
    // The worker only gets to the answer 9 s after it sent the request.
    rig.advance(9_000);
    rig.answer(&login, response(200, &login_answer("tok-late", 60)));

    assert_eq!(rig.resumed_with("tok-late"), [1]);
    let entry = rig.cached_entry("acme").unwrap();
    assert_eq!(entry.token.expires_at_ms, sent_at_ms + 60_000);
    let commit = rig.sent_one(COMPANION, "/v1/commit");
    assert_eq!(commit.json()["expiresAtMs"], sent_at_ms + 60_000);
}

#[test]
fn a_companion_token_answered_late_without_a_readable_expiry_lives_from_the_request() {
    let mut rig = Rig::new(json!({"fetch": "companion"}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let request = rig.sent_one(COMPANION, "/auth/token");
    rig.advance(9_000);
    let answer = json!({
        "accessToken": "tok-acme", "expiresIn": 600, "tokenType": "Bearer",
        "source": "fresh", "expiresAt": "unreadable"
    });
    rig.answer(&request, response(200, &answer.to_string()));

    assert_eq!(rig.resumed_with("tok-acme"), [1]);
    let entry = rig.cached_entry("acme").unwrap();
    assert_eq!(entry.token.expires_at_ms, START_MS + 600_000);
}

#[test]
fn a_short_lived_token_is_not_due_for_refresh_on_arrival_and_the_misfit_is_warned_once() {
    // The defaults: refreshAhead 10 % / 30 s, expiryMarginMs 5 s; the IdP issues 20 s
    // tokens.
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-20", 20);
    let _ = rig.host.take_sent();

    for (context_id, at_ms) in [(2, 1_000), (3, 9_000)] {
        rig.advance(at_ms - (rig.host.now() - START_MS));
        assert_eq!(
            cached_token(rig.ask(context_id, "acme"))
                .access_token
                .expose(),
            "tok-20"
        );
    }
    rig.tick();
    rig.nothing_sent();
    assert_eq!(
        rig.host.stat(Metric::RefreshAhead),
        0,
        "not due in its first half"
    );
    let entry = rig.cached_entry("acme").unwrap();
    assert!(
        (START_MS + 10_000..=START_MS + 12_500).contains(&entry.refresh_at_ms),
        "{entry:?}"
    );
    assert_eq!(
        entry.stale_at_ms,
        START_MS + 15_000,
        "a 5 s margin: a quarter"
    );

    let warnings = rig.host.logs_at(Level::Warn);
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].starts_with("provider genesys issues tokens that live 20000 ms")
            && warnings[0].contains("expiryMarginMs 5000")
            && warnings[0].contains("refreshAhead.minLeadMs 30000"),
        "{}",
        warnings[0]
    );
    // Another tenant of the same provider: no second warning on this worker.
    let _ = rig.ask(4, "globex");
    rig.fetch_with_lease("globex", "tok-globex", 20);
    assert_eq!(rig.host.logs_at(Level::Warn).len(), 1);
}

#[test]
fn a_day_long_token_keeps_the_configured_margin_and_window_without_a_warning() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-day", 86_400);
    let entry = rig.cached_entry("acme").unwrap();
    let expiry = START_MS + 86_400_000;
    assert_eq!(entry.stale_at_ms, expiry - 5_000);
    assert!((expiry - 8_640_000..=expiry - 4_320_000).contains(&entry.refresh_at_ms));
    assert!(rig.host.logs_at(Level::Warn).is_empty());
}

// --- Negative caching ----------------------------------------------------------------

const REJECTED: &str = r#"{"error":"invalid_client"}"#;

#[test]
fn rejected_credentials_are_answered_from_memory_on_every_worker_then_asked_again() {
    for envoy in envoys_of_both_caches(DEFAULT_MAX_TENANTS) {
        let mut first = Rig::on(&envoy, json!({"negativeCacheMs": 3_000}), 1);
        let mut second = Rig::on(&envoy, json!({"negativeCacheMs": 3_000}), 2);
        let _ = first.ask(1, "acme");
        first.lease_granted("acme");
        let credentials = first.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
        first.answer(&credentials, response(200, CREDENTIALS));
        let login = first.sent_one(LOGIN, "/oauth/token");
        first.answer(&login, response(400, REJECTED));
        let abort = first.sent_one(COMPANION, "/v1/abort");
        let answered = first.host.replies[0].body.clone();
        assert_eq!(answered["code"], "OAUTH_INVALID_GRANT");
        assert_eq!(
            answered["message"],
            "Genesys rejected the OAuth credentials of tenant acme: invalid_client"
        );
        assert_eq!(
            abort.json()["error"],
            json!({"code": "OAUTH_INVALID_GRANT", "message": answered["message"]}),
            "the companion caches it for the other Envoys"
        );

        envoy.advance(2_999);
        for (rig, context_id) in [(&mut second, 2), (&mut first, 3)] {
            assert!(matches!(rig.ask(context_id, "acme"), Decision::Pause));
            rig.tick();
            rig.nothing_sent();
            let reply = rig.host.replies.last().unwrap();
            assert_eq!(
                (reply.context_id, reply.status, &reply.body["message"]),
                (context_id, 502, &answered["message"])
            );
            assert_eq!(reply.body["code"], "OAUTH_INVALID_GRANT");
            assert_eq!(rig.host.stat(Metric::NegativeCacheHit), 1);
        }
        envoy.advance(1);
        let _ = second.ask(4, "acme");
        second.tick();
        let _lease = second.sent_one(COMPANION, "/v1/lease");
    }
}

#[test]
fn credentials_not_found_are_cached_and_a_5xx_or_timeout_never_is() {
    let mut rig = Rig::new(json!({}));
    rig.not_found(1, "acme");
    let _ = rig.ask(2, "acme");
    rig.tick();
    rig.nothing_sent();
    assert_eq!(rig.host.replies[1].body["code"], "CREDENTIALS_NOT_FOUND");

    let _ = rig.ask(3, "globex");
    rig.lease_granted("globex");
    for _ in 0..3 {
        let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/globex/credentials/genesys");
        rig.answer(&credentials, CalloutResult::NoResponse);
        rig.advance(4_000);
        rig.tick();
    }
    let abort = rig.sent_one(COMPANION, "/v1/abort");
    assert_eq!(
        abort.json().get("error"),
        None,
        "not for the companion to cache"
    );
    assert_eq!(
        rig.host.replies[2].body["code"],
        "TENANT_SERVICE_UNAVAILABLE"
    );
    let _ = rig.ask(4, "globex");
    rig.tick();
    let _lease = rig.sent_one(COMPANION, "/v1/lease");
}

#[test]
fn a_forced_refresh_skips_the_cached_error_and_zero_turns_negative_caching_off() {
    let mut rig = Rig::new(json!({}));
    rig.not_found(1, "acme");
    let _ = rig.ask_for(2, "acme", Delivery::Respond, true);
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    assert_eq!(lease.json()["forceRefresh"], true);

    let mut off = Rig::new(json!({"negativeCacheMs": 0}));
    off.not_found(1, "acme");
    let _ = off.ask(2, "acme");
    off.tick();
    let _lease = off.sent_one(COMPANION, "/v1/lease");
}

#[test]
fn a_purge_clears_the_cached_error_of_its_key() {
    let mut rig = Rig::new(json!({"purge": {"statuses": [401]}}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-old", 60);
    let _ = rig.host.take_sent();
    // A refresh-ahead whose login is rejected: the old token still serves.
    rig.advance(45_000);
    let _ = cached_token(rig.ask(2, "acme"));
    rig.lease_granted("acme");
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    rig.answer(&credentials, response(200, CREDENTIALS));
    let login = rig.sent_one(LOGIN, "/oauth/token");
    rig.answer(&login, response(401, ""));
    let _abort = rig.sent_one(COMPANION, "/v1/abort");

    // The upstream rejects the old token: purged, and the error is forgotten with it.
    rig.worker.on_upstream_status(&mut rig.host, 1, None, 401);
    let _ = rig.ask(3, "acme");
    rig.tick();
    let sent = rig.host.take_sent();
    assert!(
        sent.iter().any(|callout| callout.path == "/v1/lease"),
        "asked again, not answered from memory: {sent:#?}"
    );
}

// --- Purge and forced refresh --------------------------------------------------------

#[test]
fn an_upstream_rejection_purges_the_token_here_and_at_the_companion_once_per_interval() {
    let mut rig = Rig::new(json!({"purge": {"statuses": [401], "minIntervalMs": 10_000}}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let _ = rig.host.take_sent();
    let token = cached_token(rig.ask(2, "acme"));

    rig.worker
        .on_upstream_status(&mut rig.host, 2, Some((key("acme"), token.clone())), 401);
    assert!(
        rig.cached_entry("acme").is_none(),
        "dropped from the gateway cache"
    );
    rig.tick();
    let invalidate = rig.sent_one(COMPANION, "/v1/invalidate");
    assert_eq!(invalidate.json()["accessToken"], "tok-acme");
    assert_eq!(rig.host.stat(Metric::Purge), 1);
    rig.answer(&invalidate, response(204, ""));
    let invalidate_failures = |rig: &Rig| {
        rig.host
            .logs_at(Level::Warn)
            .iter()
            .filter(|line| line.contains("companion invalidate for genesys:acme failed"))
            .count()
    };
    assert_eq!(invalidate_failures(&rig), 0, "a 204 is no failure");

    rig.worker
        .on_upstream_status(&mut rig.host, 3, Some((key("acme"), token.clone())), 401);
    rig.tick();
    rig.nothing_sent();
    assert_eq!(rig.host.stat(Metric::PurgeSuppressed), 1);

    // The next purge, once the interval passed: its invalidation fails, and says so.
    rig.advance(10_000);
    rig.worker
        .on_upstream_status(&mut rig.host, 5, Some((key("acme"), token.clone())), 401);
    rig.tick();
    let invalidate = rig.sent_one(COMPANION, "/v1/invalidate");
    rig.answer(&invalidate, response(503, ENVOY_CONNECT_FAILURE));
    assert_eq!(invalidate_failures(&rig), 1);

    let _ = rig.ask(6, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    assert_eq!(
        lease.json()["minExpiresAtMs"],
        token.expires_at_ms,
        "the replacement must be newer than the rejected token"
    );
}

#[test]
fn a_request_the_worker_resumed_is_purged_when_its_upstream_rejects_it() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let _ = rig.host.take_sent();

    rig.worker.on_upstream_status(&mut rig.host, 1, None, 200);
    rig.worker.on_upstream_status(&mut rig.host, 1, None, 401);
    assert_eq!(
        rig.host.stat(Metric::Purge),
        0,
        "its token was forgotten at its answer"
    );

    let _ = rig.ask(2, "globex");
    rig.fetch_with_lease("globex", "tok-globex", 3_600);
    rig.worker.on_upstream_status(&mut rig.host, 2, None, 401);
    assert_eq!(rig.host.stat(Metric::Purge), 1);
    assert!(rig.cached_entry("globex").is_none());
}

#[test]
fn forced_refreshes_skip_the_caches_once_per_interval() {
    let mut rig = Rig::new(json!({"mode": "endpoint"}));
    let _ = rig.ask_for(1, "acme", Delivery::Respond, false);
    rig.fetch_with_lease("acme", "tok-1", 3_600);
    let _ = rig.host.take_sent();

    assert!(matches!(
        rig.ask_for(2, "acme", Delivery::Respond, true),
        Decision::Pause
    ));
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    assert_eq!(lease.json()["forceRefresh"], true);

    let decision = rig.ask_for(3, "acme", Delivery::Respond, true);
    assert_eq!(
        cached_token(decision).access_token.expose(),
        "tok-1",
        "throttled: served as usual"
    );
    assert_eq!(rig.host.stat(Metric::PurgeSuppressed), 1);
}

// --- Delivery -------------------------------------------------------------------------

#[test]
fn endpoint_mode_answers_the_token_response_and_errors_as_json() {
    let mut rig = Rig::new(json!({"mode": "endpoint"}));
    let _ = rig.ask_for(1, "acme", Delivery::Respond, false);
    rig.fetch_with_lease("acme", "tok-acme", 3_600);

    let reply = &rig.host.replies[0];
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body["accessToken"], "tok-acme");
    assert_eq!(reply.body["tokenType"], "Bearer");
    assert_eq!(reply.body["source"], "fresh");
    assert_eq!(reply.body["expiresIn"], 3_600);
    assert!(rig.host.resumed.is_empty());
    let _commit = rig.sent_one(COMPANION, "/v1/commit");

    let _ = rig.ask_for(2, "globex", Delivery::Respond, false);
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    rig.answer(&lease, response(200, &lease_granted("lease-2")));
    let credentials = rig.sent_one(TENANT_SERVICE, "/tenants/globex/credentials/genesys");
    rig.answer(&credentials, response(200, CREDENTIALS));
    let login = rig.sent_one(LOGIN, "/oauth/token");
    rig.answer(&login, response(401, r#"{"error":"invalid_client"}"#));
    let error = &rig.host.replies[1];
    assert_eq!(error.status, 502);
    assert_eq!(
        error.body,
        json!({
            "code": "OAUTH_INVALID_GRANT",
            "message": error.body["message"],
            "tenantId": "globex",
            "correlationId": "req-2"
        })
    );
    assert_eq!(
        rig.host
            .stat(Metric::FetchFailed(ErrorCode::OauthInvalidGrant)),
        1
    );
}

#[test]
fn fetch_by_companion_asks_its_token_api_and_keeps_no_secret() {
    let mut rig = Rig::new(json!({"fetch": "companion", "companion": {"apiKey": "key-1"}}));
    let _ = rig.ask(1, "acme");
    rig.tick();
    let request = rig.sent_one(COMPANION, "/auth/token");
    assert_eq!(request.header("x-tokengate-key"), Some("key-1"));
    assert_eq!(request.json()["tenantId"], "acme");
    let answer = json!({
        "accessToken": "tok-acme", "expiresIn": 600, "tokenType": "Bearer",
        "source": "fresh", "expiresAt": "2023-11-14T22:23:20.000Z"
    });
    rig.answer(&request, response(200, &answer.to_string()));

    assert_eq!(rig.resumed_with("tok-acme"), [1]);
    let entry = rig.cached_entry("acme").unwrap();
    assert_eq!(
        entry.token.expires_at_ms, 1_700_000_600_000,
        "from expiresAt"
    );
    rig.nothing_sent();

    let _ = rig.ask(2, "globex");
    rig.tick();
    let request = rig.sent_one(COMPANION, "/auth/token");
    rig.answer(&request, CalloutResult::NoResponse);
    assert_eq!(rig.host.replies[0].body["code"], "COMPANION_UNAVAILABLE");
    assert_eq!(rig.host.stat(Metric::CompanionFallback), 0, "no local mode");
}

// --- The bounded gateway cache --------------------------------------------------------

#[test]
fn a_tenant_pushed_out_of_the_gateway_cache_is_served_from_the_companions() {
    let [slots, lru] = envoys_of_both_caches(1);
    for (envoy, shared_keys) in [(slots, 3), (lru, 0)] {
        let mut rig = Rig::on(&envoy, json!({"cache": {"maxTenants": 1}}), 1);
        let _ = rig.ask(1, "acme");
        rig.fetch_with_lease("acme", "tok-acme", 3_600);
        let _commit = rig.sent_one(COMPANION, "/v1/commit");
        let _ = rig.ask(2, "globex");
        rig.fetch_with_lease("globex", "tok-globex", 3_600);
        let _commit = rig.sent_one(COMPANION, "/v1/commit");
        assert!(
            rig.cached_entry("acme").is_none(),
            "room for one: acme was pushed out"
        );
        assert_eq!(rig.host.stat(Metric::CacheEvicted), 1);

        assert!(matches!(rig.ask(3, "acme"), Decision::Pause));
        rig.tick();
        let lease = rig.sent_one(COMPANION, "/v1/lease");
        let hit = json!({"outcome": "hit", "accessToken": "tok-acme", "expiresAtMs": START_MS + 3_600_000});
        rig.answer(&lease, response(200, &hit.to_string()));

        assert_eq!(rig.resumed_with("tok-acme"), [1, 3]);
        rig.nothing_sent();
        assert_eq!(rig.host.stat(Metric::FetchStarted), 2, "no third fetch");
        assert!(
            envoy.shared_len() <= shared_keys,
            "slots: one per table; the keyed store: no shared data"
        );
    }
}

// --- Trace context ---------------------------------------------------------------------

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OTHER_TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// The `traceparent` each callout of `sent` carried, by path.
fn traceparents(sent: &[SentCallout]) -> Vec<(&str, Option<&str>)> {
    sent.iter()
        .map(|callout| (callout.path.as_str(), callout.header("traceparent")))
        .collect()
}

/// Runs a leased fetch of `tenant` whose credentials are answered `credentials_status`
/// (200: a token is fetched and committed; 404: the lease is aborted), answering the
/// lease end with `lease_end_answer`, and returns every callout it sent.
fn leased_fetch(
    rig: &mut Rig,
    tenant: &str,
    credentials_status: u16,
    lease_end_answer: CalloutResult,
) -> Vec<SentCallout> {
    let mut sent = Vec::new();
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");
    rig.answer(&lease, response(200, &lease_granted("lease-1")));
    sent.push(lease);
    let path = format!("/tenants/{tenant}/credentials/genesys");
    let credentials = rig.sent_one(TENANT_SERVICE, &path);
    if credentials_status == 200 {
        rig.answer(&credentials, response(200, CREDENTIALS));
        sent.push(credentials);
        let login = rig.sent_one(LOGIN, "/oauth/token");
        rig.answer(&login, response(200, &login_answer("tok", 3_600)));
        sent.push(login);
    } else {
        rig.answer(&credentials, response(credentials_status, ""));
        sent.push(credentials);
    }
    let lease_end = rig.host.take_sent().remove(0);
    rig.answer(&lease_end, lease_end_answer);
    sent.push(lease_end);
    sent
}

#[test]
fn every_callout_of_a_fetch_carries_the_traceparent_of_its_request() {
    let mut rig = Rig::new(json!({"companion": {"retryAfterMs": 2_000}}));
    rig.ask_with_headers(1, "acme", &[("traceparent", TRACE)]);
    let mut sent = leased_fetch(&mut rig, "acme", 200, CalloutResult::NoResponse);
    rig.advance(2_000);
    rig.tick();
    sent.push(rig.sent_one(COMPANION, "/v1/commit")); // the lost commit, once more
    assert_eq!(
        traceparents(&sent),
        [
            ("/v1/lease", Some(TRACE)),
            ("/tenants/acme/credentials/genesys", Some(TRACE)),
            ("/oauth/token", Some(TRACE)),
            ("/v1/commit", Some(TRACE)),
            ("/v1/commit", Some(TRACE)),
        ]
    );

    rig.ask_with_headers(2, "globex", &[("traceparent", OTHER_TRACE)]);
    let sent = leased_fetch(&mut rig, "globex", 404, response(200, "{}"));
    assert_eq!(
        traceparents(&sent),
        [
            ("/v1/lease", Some(OTHER_TRACE)),
            ("/tenants/globex/credentials/genesys", Some(OTHER_TRACE)),
            ("/v1/abort", Some(OTHER_TRACE)),
        ]
    );
}

#[test]
fn a_local_an_oauth2_and_a_companion_fetch_carry_the_traceparent_too() {
    let mut local = Rig::new(json!({}));
    local.ask_with_headers(1, "acme", &[("traceparent", TRACE)]);
    local.tick();
    let lease = local.sent_one(COMPANION, "/v1/lease");
    local.answer(&lease, response(503, ENVOY_CONNECT_FAILURE));
    let credentials = local.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/genesys");
    local.answer(&credentials, response(200, CREDENTIALS));
    let login = local.sent_one(LOGIN, "/oauth/token");
    assert_eq!(
        traceparents(&[credentials, login]),
        [
            ("/tenants/acme/credentials/genesys", Some(TRACE)),
            ("/oauth/token", Some(TRACE)),
        ]
    );

    let mut oauth2 = Rig::new(json!({
        "provider": "crm",
        "providers": {"crm": {"kind": "oauth2", "tokenUrl": "https://idp.crm.example/token"}},
        "tokenEndpointClusters": {"idp.crm.example": "crm_idp"}
    }));
    let ask = TokenAsk {
        context_id: 1,
        key: TokenKey::new(
            Provider::parse("crm").unwrap(),
            TenantId::parse("acme").unwrap(),
        ),
        delivery: Delivery::Inject,
        force_refresh: false,
    };
    let headers = FakeHeaders::new(vec![("traceparent", TRACE)]);
    let _ = oauth2
        .worker
        .on_request(&mut oauth2.host, ask, || request_ids(&headers));
    oauth2.tick();
    let lease = oauth2.sent_one(COMPANION, "/v1/lease");
    oauth2.answer(&lease, response(200, &lease_granted("lease-1")));
    let credentials = oauth2.sent_one(TENANT_SERVICE, "/tenants/acme/credentials/crm");
    oauth2.answer(
        &credentials,
        response(200, r#"{"clientId":"id","clientSecret":"s"}"#),
    );
    let token_endpoint = oauth2.sent_one("crm_idp", "/token");
    assert_eq!(token_endpoint.header("traceparent"), Some(TRACE));

    let mut by_companion = Rig::new(json!({"fetch": "companion"}));
    by_companion.ask_with_headers(1, "acme", &[("traceparent", TRACE)]);
    by_companion.tick();
    let request = by_companion.sent_one(COMPANION, "/auth/token");
    assert_eq!(request.header("traceparent"), Some(TRACE));
}

#[test]
fn an_invalid_or_repeated_traceparent_is_never_passed_on() {
    let invalid = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    let requests: [&[(&'static str, &'static str)]; 3] = [
        &[],
        &[("traceparent", invalid)],
        &[("traceparent", TRACE), ("traceparent", OTHER_TRACE)],
    ];
    for headers in requests {
        let mut rig = Rig::new(json!({}));
        rig.ask_with_headers(1, "acme", headers);
        let sent = leased_fetch(&mut rig, "acme", 200, response(200, "{}"));
        assert!(
            sent.iter()
                .all(|callout| callout.header("traceparent").is_none()),
            "{headers:?}: {sent:#?}"
        );
    }
}

#[test]
fn a_collapsed_fetch_carries_the_traceparent_of_its_first_request() {
    let mut rig = Rig::new(json!({}));
    rig.ask_with_headers(1, "acme", &[("traceparent", TRACE)]);
    rig.ask_with_headers(2, "acme", &[("traceparent", OTHER_TRACE)]);
    rig.ask_with_headers(3, "acme", &[]);
    let sent = leased_fetch(&mut rig, "acme", 200, response(200, "{}"));
    assert_eq!(rig.resumed_with("tok"), [1, 2, 3]);
    assert_eq!(sent.len(), 4);
    for callout in &sent {
        assert_eq!(callout.header("traceparent"), Some(TRACE), "{callout:#?}");
    }

    let mut untraced_first = Rig::new(json!({}));
    untraced_first.ask_with_headers(1, "acme", &[]);
    untraced_first.ask_with_headers(2, "acme", &[("traceparent", TRACE)]);
    let sent = leased_fetch(&mut untraced_first, "acme", 200, response(200, "{}"));
    assert!(
        sent.iter()
            .all(|callout| callout.header("traceparent").is_none())
    );
}

#[test]
fn a_cache_hit_never_reads_the_requests_ids() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let ask = TokenAsk {
        context_id: 2,
        key: key("acme"),
        delivery: Delivery::Inject,
        force_refresh: false,
    };
    let mut read = false;
    let decision = rig.worker.on_request(&mut rig.host, ask, || {
        read = true;
        RequestIds::default()
    });
    let _ = cached_token(decision);
    assert!(!read, "a hit at info level reads no header");
}

// --- The worker's own bookkeeping ----------------------------------------------------

#[test]
fn the_workers_load_counts_what_it_holds_until_the_fetch_ends() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    let _ = rig.ask(2, "acme");
    rig.tick();
    let lease = rig.sent_one(COMPANION, "/v1/lease");

    let load = rig.worker.load();
    assert_eq!(
        (load.fetches, load.waiters, load.callouts),
        (1, 2, 1),
        "{load:?}"
    );
    rig.answer(&lease, response(200, &lease_granted("lease-1")));
    rig.fetch_from_tenant_service("acme", "tok-acme", 3_600);
    let load = rig.worker.load();
    assert_eq!(
        (load.fetches, load.waiters, load.callouts, load.delivered),
        (0, 0, 1, 2),
        "the commit is in flight, the two resumed requests await their upstream: {load:?}"
    );
    let commit = rig.sent_one(COMPANION, "/v1/commit");
    rig.answer(&commit, response(204, ""));
    rig.worker.on_request_gone(1);
    rig.worker.on_request_gone(2);
    assert_eq!(rig.worker.load(), WorkerLoad::default());
}

#[test]
fn a_worker_waiting_on_a_peer_polls_the_cache_every_millisecond() {
    for envoy in envoys_of_both_caches(DEFAULT_MAX_TENANTS) {
        let (_envoy, _first, second, _lease) = one_leases_the_other_waits(envoy, json!({}));
        assert_eq!(second.host.tick_period_ms, 1);
    }
}

#[test]
fn a_hits_debug_line_follows_the_hosts_log_level_asked_once_a_second() {
    let mut rig = Rig::new(json!({}));
    let _ = rig.ask(1, "acme");
    rig.fetch_with_lease("acme", "tok-acme", 3_600);
    let debug_lines = |rig: &Rig| {
        rig.host
            .logs_at(Level::Debug)
            .iter()
            .filter(|line| line.contains("source=cache"))
            .count()
    };

    rig.host.level = Level::Info;
    let _ = cached_token(rig.ask(2, "acme"));
    rig.host.level = Level::Debug;
    rig.advance(999);
    let _ = cached_token(rig.ask(3, "acme"));
    assert_eq!(
        debug_lines(&rig),
        0,
        "the level read at the first hit holds"
    );
    rig.advance(1);
    let _ = cached_token(rig.ask(4, "acme"));
    assert_eq!(
        debug_lines(&rig),
        1,
        "a second later the level is read again"
    );
    let _ = cached_token(rig.ask(5, "acme"));
    assert_eq!(debug_lines(&rig), 2);
}

#[test]
fn pruning_the_local_mode_limiter_keeps_the_keys_still_limited() {
    let mut rig = Rig::new(json!({
        "companion": {"localFetchesPerMinute": 1, "retryAfterMs": 600_000},
        "negativeCacheMs": 0,
    }));
    rig.host.refused_clusters.insert(COMPANION.to_owned());
    // More keys than the limiter keeps before it drops idle ones, each fetched once.
    for context_id in 1..=4_097 {
        let tenant = format!("t{context_id}");
        let _ = rig.ask(context_id, &tenant);
        rig.tick();
        let credentials = rig.sent_one(
            TENANT_SERVICE,
            &format!("/tenants/{tenant}/credentials/genesys"),
        );
        rig.answer(&credentials, response(404, "{}"));
    }

    let _ = rig.ask(5_000, "t1");
    rig.tick();
    rig.nothing_sent();
    let refused = rig.host.replies.last().unwrap();
    assert_eq!(
        (refused.context_id, refused.body["code"].as_str()),
        (5_000, Some("COMPANION_UNAVAILABLE"))
    );
}

/// The tenants whose purge records the slot table of `envoy` holds.
fn purged_tenants(envoy: &FakeEnvoy, slots: u32) -> BTreeSet<String> {
    (0..slots)
        .filter_map(|slot| envoy.shared_value(&format!("tokengate.v3.p.{slot}")))
        .filter_map(|value| {
            let length = usize::from(*value.first()?);
            let key = String::from_utf8_lossy(value.get(1..=length)?).into_owned();
            Some(key.rsplit(':').next()?.to_owned())
        })
        .collect()
}

/// `count` tenant names, each of which may live in both slots of a two-slot table (its
/// four ways, as `Slots` picks them from its hash, are not all one slot).
fn tenants_using_both_of_two_slots(count: usize) -> Vec<String> {
    let both = |tenant: &String| {
        let hash = key(tenant).stable_hash();
        let slots: BTreeSet<u64> = (0..4u32)
            .map(|way| hash.rotate_right(16 * way).wrapping_add(u64::from(way)) % 2)
            .collect();
        slots.len() == 2
    };
    (0..100)
        .map(|n| format!("k{n}"))
        .filter(both)
        .take(count)
        .collect()
}

#[test]
fn a_purge_record_goes_over_a_spent_one_else_over_the_oldest_still_in_force() {
    let overrides = json!({"cache": {"maxTenants": 2}, "purge": {"minIntervalMs": 10_000}});
    let tenants = tenants_using_both_of_two_slots(3);
    let [a, b, c] = [&tenants[0], &tenants[1], &tenants[2]];
    // `a` is purged at 0 with a token expiring at 100 s, `b` at `b_at` with one expiring
    // at `b_expires`, then `c` at `c_at`: which two purge records are left.
    let survivors = |b_at: u64, b_expires: u64, c_at: u64| {
        let envoy = FakeEnvoy::starting_at(START_MS);
        let mut rig = Rig::on(&envoy, overrides.clone(), 1);
        for (tenant, at, stale_expires) in
            [(a, 0, 100_000), (b, b_at, b_expires), (c, c_at, 100_000)]
        {
            envoy.advance_to(START_MS + at);
            let token = CachedToken {
                access_token: format!("tok-{tenant}").as_str().into(),
                expires_at_ms: START_MS + stale_expires,
            };
            rig.worker
                .on_upstream_status(&mut rig.host, 1, Some((key(tenant), token)), 401);
        }
        purged_tenants(&envoy, 2)
    };
    let [a_and_c, b_and_c] = [a, b].map(|kept| BTreeSet::from([kept.clone(), c.clone()]));

    // `a` still guards its purged token; `b` neither throttles nor guards any more:
    // its token expired before `c`'s purge, or expires at that very moment.
    assert_eq!(survivors(1_000, 19_000, 20_000), a_and_c);
    assert_eq!(survivors(1_000, 20_000, 20_000), a_and_c);
    // Both still throttle, `b` with a token that expired: the older purge gives way.
    assert_eq!(survivors(5_000, 6_000, 8_000), b_and_c);
}

#[test]
fn a_token_that_replaces_an_expired_one_is_no_eviction_and_one_that_replaces_a_live_one_is() {
    for envoy in envoys_of_both_caches(1) {
        let mut rig = Rig::on(&envoy, json!({"cache": {"maxTenants": 1}}), 1);
        let _ = rig.ask(1, "acme");
        rig.fetch_with_lease("acme", "tok-acme", 60);
        let _ = rig.host.take_sent();

        rig.advance(61_000);
        let _ = rig.ask(2, "globex");
        rig.fetch_with_lease("globex", "tok-globex", 3_600);
        let _ = rig.host.take_sent();
        assert_eq!(rig.host.stat(Metric::CacheEvicted), 0, "acme had expired");

        let _ = rig.ask(3, "initech");
        rig.fetch_with_lease("initech", "tok-initech", 3_600);
        assert_eq!(rig.host.stat(Metric::CacheEvicted), 1, "globex was live");
        assert!(rig.cached_entry("globex").is_none());
    }
}
