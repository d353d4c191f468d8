//! The simulation's companion model (`plugin/tests/sim/companion.rs`) against the real
//! companion on a real `redis-server`: one scripted sequence of leases, commits, aborts,
//! invalidations, waiting leases and a lock's expiry goes to both, and every answer of
//! the real companion must be the model's (lease ids compared by which lease they name).
//! So the model the simulation proves the gateway against cannot drift from the
//! companion without this test failing.

#[path = "../../plugin/tests/sim/companion.rs"]
#[expect(
    dead_code,
    reason = "restarts that drop waiting leases: the simulation's"
)]
mod companion_model;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use companion_model::{CompanionModel, Effect, Reply};
use serde_json::{Value, json};
use tokengate_core::lease::{ABORT_PATH, COMMIT_PATH, INVALIDATE_PATH, LEASE_PATH};
use tokengate_tests::harness::{Companion, Redis, companion_metric, eventually};
use tokio::task::JoinHandle;

/// The companion's flags; the lock outlives the lease wait, so a waiter gives up while
/// the holder's lock still stands.
const LOCK_TTL_MS: u64 = 1_000;
const LEASE_WAIT_MS: u64 = 600;

fn now_ms() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The real companion's answer, read as the model's [`Reply`].
async fn reply_of(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
    let number = |field: &str| body[field].as_u64().unwrap_or_default();
    match (status, body["outcome"].as_str(), body["code"].as_str()) {
        (200, Some("hit"), _) => Reply::Hit {
            access_token: text("accessToken"),
            expires_at_ms: number("expiresAtMs"),
        },
        (200, Some("fetch"), _) => Reply::Fetch {
            lease_id: text("leaseId"),
            lease_ttl_ms: number("leaseTtlMs"),
        },
        (503, _, Some("LOCK_ACQUISITION_FAILED")) => Reply::LockBusy,
        (204, _, _) => Reply::Done,
        (400, _, _) => Reply::BadRequest,
        (404, _, _) => Reply::NotFound,
        _ => panic!("the companion answered {status} {body}, which the model has no word for"),
    }
}

/// One companion and its model, fed the same requests.
struct Both {
    client: reqwest::Client,
    /// The companion's port.
    port: u16,
    base: String,
    model: CompanionModel<&'static str>,
    /// The model's answers not compared yet, by caller.
    expected: HashMap<&'static str, Reply>,
    /// Requests the real companion has not answered yet (waiting leases), by caller.
    waiting: HashMap<&'static str, JoinHandle<Reply>>,
    /// Lease ids: the model's and the companion's for each lease, by caller name.
    leases: HashMap<&'static str, (String, String)>,
    /// When each caller's last request was sent (the model's moment of it).
    sent_at_ms: HashMap<&'static str, u64>,
}

impl Both {
    fn body_for_model(&self, body: &Value) -> Vec<u8> {
        self.with_lease_id(body, |(model, _)| model)
    }

    fn with_lease_id(&self, body: &Value, pick: impl Fn(&(String, String)) -> &String) -> Vec<u8> {
        let mut body = body.clone();
        if let Some(name) = body["leaseId"].as_str() {
            let ids = self
                .leases
                .get(name)
                .unwrap_or_else(|| panic!("the script names lease {name} before it was given"));
            body["leaseId"] = json!(pick(ids));
        }
        body.to_string().into_bytes()
    }

    fn apply(&mut self, effects: Vec<Effect<&'static str>>) {
        for effect in effects {
            if let Effect::Answer(caller, reply) = effect {
                self.expected.insert(caller, reply);
            }
        }
    }

    /// Sends `body` (its `leaseId` names a caller whose lease it means) to `path` as
    /// `caller`, without waiting for the answer.
    async fn send(&mut self, caller: &'static str, path: &'static str, body: Value) {
        let sent_at_ms = now_ms();
        self.sent_at_ms.insert(caller, sent_at_ms);
        let effects = self
            .model
            .handle(sent_at_ms, caller, path, &self.body_for_model(&body));
        self.apply(effects);
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(self.with_lease_id(&body, |(_, real)| real));
        let handle = tokio::spawn(async move {
            match request.send().await {
                Ok(response) => reply_of(response).await,
                Err(error) => panic!("the companion did not answer: {error}"),
            }
        });
        self.waiting.insert(caller, handle);
        // A lease the model makes wait must be waiting at the companion too before the
        // next request goes out, so both see the same order.
        let model_waiting = self
            .waiting
            .keys()
            .filter(|caller| !self.expected.contains_key(*caller))
            .count();
        if model_waiting > 0 {
            let port = self.port;
            eventually(
                "the companion holds the waiting leases",
                Duration::from_secs(5),
                async || {
                    companion_metric(port, "tokengate_companion_leases_waiting").await
                        == model_waiting as f64
                },
            )
            .await;
        }
    }

    /// Waits for `caller`'s answer from the companion and checks it is the model's.
    async fn answered(&mut self, caller: &'static str, step: &str) -> Reply {
        let real = self.real_answer(caller, step).await;
        self.compare(caller, real, step)
    }

    /// Waits for `caller`'s answer from the companion, which comes at the end of its
    /// wait budget, and checks it is what the model answers then.
    async fn answered_after_budget(&mut self, caller: &'static str, step: &str) -> Reply {
        let real = self.real_answer(caller, step).await;
        let sent_at_ms = self.sent_at(caller);
        let budget_ends_ms = sent_at_ms + LEASE_WAIT_MS;
        self.model.expire_locks(budget_ends_ms);
        let effects = self.model.wake(budget_ends_ms);
        self.apply(effects);
        self.compare(caller, real, step)
    }

    async fn real_answer(&mut self, caller: &'static str, step: &str) -> Reply {
        let handle = self
            .waiting
            .remove(caller)
            .unwrap_or_else(|| panic!("{step}: {caller} sent nothing"));
        match tokio::time::timeout(Duration::from_secs(10), handle).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => panic!("{step}: {caller}'s request failed: {error}"),
            Err(_) => panic!("{step}: the companion did not answer {caller} within 10 s"),
        }
    }

    fn compare(&mut self, caller: &'static str, real: Reply, step: &str) -> Reply {
        let model = self.expected.remove(caller).unwrap_or_else(|| {
            panic!("{step}: the companion answered {caller} {real:?}, the model not yet")
        });
        match (&model, &real) {
            (
                Reply::Fetch {
                    lease_id: model_id,
                    lease_ttl_ms: model_ttl,
                },
                Reply::Fetch {
                    lease_id: real_id,
                    lease_ttl_ms: real_ttl,
                },
            ) => {
                assert_eq!(model_ttl, real_ttl, "{step}: {caller}'s lease TTL");
                self.leases
                    .insert(caller, (model_id.clone(), real_id.clone()));
            }
            _ => assert_eq!(real, model, "{step}: {caller}'s answer (real, model)"),
        }
        real
    }

    fn sent_at(&self, caller: &'static str) -> u64 {
        self.sent_at_ms.get(caller).copied().unwrap_or_default()
    }

    /// Sends and checks the answer.
    async fn call(
        &mut self,
        caller: &'static str,
        path: &'static str,
        body: Value,
        step: &str,
    ) -> Reply {
        self.send(caller, path, body).await;
        self.answered(caller, step).await
    }

    /// Commits `token` with the lease `caller` was given, then checks what a plain
    /// lease of the tenant is answered; returns that answer.
    async fn commit_then_lease(
        &mut self,
        (tenant, lease): (&str, &str),
        (token, expires_at_ms): (&str, u64),
        step: &str,
    ) -> Reply {
        let body = commit(tenant, lease, token, expires_at_ms);
        self.call("c", COMMIT_PATH, body, step).await;
        self.call(
            "r",
            LEASE_PATH,
            json!({ "provider": "genesys", "tenantId": tenant }),
            step,
        )
        .await
    }

    /// The model's timers now (a lock's TTL ended).
    fn timers_now(&mut self) {
        let now = now_ms();
        self.model.expire_locks(now);
        let effects = self.model.wake(now);
        self.apply(effects);
    }
}

fn lease(tenant: &str) -> Value {
    json!({ "provider": "genesys", "tenantId": tenant })
}

fn commit(tenant: &str, lease: &str, token: &str, expires_at_ms: u64) -> Value {
    json!({ "provider": "genesys", "tenantId": tenant, "leaseId": lease,
            "accessToken": token, "expiresAtMs": expires_at_ms })
}

fn abort(tenant: &str, lease: &str) -> Value {
    json!({ "provider": "genesys", "tenantId": tenant, "leaseId": lease })
}

fn hit(token: &str, expires_at_ms: u64) -> Reply {
    Reply::Hit {
        access_token: token.to_owned(),
        expires_at_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulations_companion_model_answers_as_the_real_companion_does() {
    let dir = tempfile::Builder::new()
        .prefix("tokengate-model-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder: {e}"));
    let redis = Redis::start(dir.path()).await;
    let args = [
        "--lock-ttl-ms",
        &LOCK_TTL_MS.to_string(),
        "--lease-wait-ms",
        &LEASE_WAIT_MS.to_string(),
        "--recheck-interval-ms",
        "50",
        "--fetch-deadline-ms",
        "500",
    ]
    .map(|arg| arg.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut companion = Companion::start(dir.path(), &redis.url(), &args).await;
    let mut both = Both {
        client: reqwest::Client::new(),
        port: companion.port,
        base: format!("http://127.0.0.1:{}", companion.port),
        model: CompanionModel::new(LOCK_TTL_MS, LEASE_WAIT_MS),
        expected: HashMap::new(),
        waiting: HashMap::new(),
        leases: HashMap::new(),
        sent_at_ms: HashMap::new(),
    };
    let start = now_ms();
    let (in_60s, in_30s, in_20s, in_10s, in_5s) = (
        start + 60_000,
        start + 30_000,
        start + 20_000,
        start + 10_000,
        start + 5_000,
    );

    // A first lease takes the lock; a second waits, and the commit answers it.
    let first = both.call("a", LEASE_PATH, lease("t1"), "first lease").await;
    assert!(
        matches!(first, Reply::Fetch { .. }),
        "first lease: {first:?}"
    );
    both.send("w1", LEASE_PATH, lease("t1")).await;
    assert!(!both.expected.contains_key("w1"), "the model makes w1 wait");
    both.call(
        "c",
        COMMIT_PATH,
        commit("t1", "a", "tok-1", in_60s),
        "commit of a",
    )
    .await;
    assert_eq!(
        both.answered("w1", "the waiter").await,
        hit("tok-1", in_60s)
    );
    both.call("r1", LEASE_PATH, lease("t1"), "a lease after the commit")
        .await;

    // A lease that wants a newer token than the cached one fetches; its abort frees the
    // lock for the next one.
    let newer = json!({ "provider": "genesys", "tenantId": "t1", "minExpiresAtMs": in_60s });
    both.call("b", LEASE_PATH, newer, "a lease for a newer token")
        .await;
    both.call("c", ABORT_PATH, abort("t1", "b"), "abort of b")
        .await;

    // A forced lease fetches; another forced one waits for a token newer than the one
    // it skipped; a plain one is still answered the cached token meanwhile.
    let forced = json!({ "provider": "genesys", "tenantId": "t1", "forceRefresh": true });
    both.call("f", LEASE_PATH, forced.clone(), "a forced lease")
        .await;
    both.send("w2", LEASE_PATH, forced).await;
    both.call(
        "r2",
        LEASE_PATH,
        lease("t1"),
        "a plain lease during a forced fetch",
    )
    .await;
    // The holder's commit is stored even though it expires sooner; the forced waiter,
    // which wants one newer than tok-1, takes the freed lock.
    both.call(
        "c",
        COMMIT_PATH,
        commit("t1", "f", "tok-2", in_30s),
        "commit of f",
    )
    .await;
    let forced_waiter = both.answered("w2", "the forced waiter").await;
    assert!(
        matches!(forced_waiter, Reply::Fetch { .. }),
        "{forced_waiter:?}"
    );
    both.call(
        "r3",
        LEASE_PATH,
        lease("t1"),
        "a lease after the forced commit",
    )
    .await;
    // A forced waiter takes a newer token than the one it skipped.
    let forced = json!({ "provider": "genesys", "tenantId": "t1", "forceRefresh": true });
    both.send("w2b", LEASE_PATH, forced).await;
    let newer_commit = commit("t1", "w2", "tok-2b", in_30s + 1);
    both.call("c", COMMIT_PATH, newer_commit, "commit of w2")
        .await;
    let forced_hit = both
        .answered("w2b", "a forced waiter after a newer token")
        .await;
    assert_eq!(forced_hit, hit("tok-2b", in_30s + 1));

    // An invalidation that names another token leaves the cached one; one that names
    // it deletes it.
    let other = json!({ "provider": "genesys", "tenantId": "t1", "accessToken": "tok-other" });
    both.call("c", INVALIDATE_PATH, other, "invalidation of another token")
        .await;
    both.call("r4", LEASE_PATH, lease("t1"), "a lease after it")
        .await;
    let named = json!({ "provider": "genesys", "tenantId": "t1", "accessToken": "tok-2b" });
    both.call("c", INVALIDATE_PATH, named, "invalidation of tok-2b")
        .await;
    both.call("e", LEASE_PATH, lease("t1"), "a lease after it")
        .await;

    // A waiter whose holder neither commits nor aborts gives up at its wait budget.
    both.send("w3", LEASE_PATH, lease("t1")).await;
    let gave_up = both
        .answered_after_budget("w3", "a waiter without a commit")
        .await;
    assert_eq!(gave_up, Reply::LockBusy);

    // The lock expires at its TTL: the next lease takes it; the late commit of the
    // lease that lost it is still stored (nothing cached), the holder's one replaces it,
    // and a later non-holder's commit of a shorter-lived token does not.
    let expired_at = both.sent_at("e") + LOCK_TTL_MS;
    tokio::time::sleep(Duration::from_millis(
        (expired_at + 200).saturating_sub(now_ms()),
    ))
    .await;
    both.timers_now();
    both.call("g", LEASE_PATH, lease("t1"), "a lease after the lock's TTL")
        .await;
    let late = ("t1", "e");
    both.commit_then_lease(late, ("tok-3", in_20s), "late commit of e")
        .await;
    both.commit_then_lease(("t1", "g"), ("tok-4", in_10s), "commit of g")
        .await;
    let kept = both
        .commit_then_lease(late, ("tok-5", in_5s), "another commit of e")
        .await;
    assert_eq!(kept, hit("tok-4", in_10s));

    // An expired token is not stored; an abort wakes a waiter, which takes the lock.
    both.call("h", LEASE_PATH, lease("t2"), "a first lease of t2")
        .await;
    both.send("w4", LEASE_PATH, lease("t2")).await;
    both.call(
        "c",
        COMMIT_PATH,
        commit("t2", "h", "tok-old", start),
        "commit of an expired token",
    )
    .await;
    let after_expired = both.answered("w4", "the waiter after it").await;
    assert!(
        matches!(after_expired, Reply::Fetch { .. }),
        "{after_expired:?}"
    );
    both.send("w5", LEASE_PATH, lease("t2")).await;
    both.call("c", ABORT_PATH, abort("t2", "w4"), "abort of w4")
        .await;
    let after_abort = both.answered("w5", "the waiter after the abort").await;
    assert!(
        matches!(after_abort, Reply::Fetch { .. }),
        "{after_abort:?}"
    );

    // A token that is not valid beyond the companion's usable margin answers no lease.
    let short = both
        .commit_then_lease(("t2", "w5"), ("tok-short", now_ms() + 500), "a short token")
        .await;
    assert!(matches!(short, Reply::Fetch { .. }), "{short:?}");
    both.commit_then_lease(("t2", "r"), ("tok-6", in_60s), "commit of r")
        .await;

    // Redis keeps the tokens across a companion restart.
    companion.restart().await;
    both.call("r8", LEASE_PATH, lease("t2"), "a lease after a restart")
        .await;

    // Requests the companion refuses.
    both.call(
        "x",
        LEASE_PATH,
        json!({ "tenantId": "t1" }),
        "a lease without provider",
    )
    .await;
    assert!(both.waiting.is_empty() && both.expected.is_empty());
}
