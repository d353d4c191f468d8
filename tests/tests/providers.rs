//! Named providers end to end: Genesys and WhatsApp (stand-ins) and generic `oauth2`
//! providers on a real authorization server (oidc-provider, `tests/src/authserver.rs`)
//! behind the same Envoy, each route getting its own provider's token by its name.
//!
//! What is proved at the authorization server itself: how many token requests it saw,
//! how each authenticated (`client_secret_basic` or `client_secret_post`), the scope and
//! resource asked for, and what it answered.

use std::path::Path;

use serde_json::{Value, json};
use tokengate_tests::authserver::{AuthClient, AuthServer, ClientAuth, RESOURCE};
use tokengate_tests::harness::{Answer, Cluster, Envoy};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::{Endpoint, Fixture};

/// acme's `crm` client: registered for `client_secret_basic`, scope `crm.read`.
const ACME_CRM_SECRET: &str = "acme-crm-secret-5c1d0e";
/// globex's `erp` client: registered for `client_secret_post`.
const GLOBEX_ERP_SECRET: &str = "globex-erp-secret-77ab12";
/// What the Tenant Service holds for initech's `crm` client: not its secret.
const INITECH_WRONG_SECRET: &str = "initech-stale-secret-0f0f";

fn clients() -> Vec<AuthClient> {
    let client = |id: &str, secret: &str, auth, scope: &str| AuthClient {
        id: id.to_owned(),
        secret: secret.to_owned(),
        auth,
        scope: scope.to_owned(),
    };
    vec![
        client("acme-crm", ACME_CRM_SECRET, ClientAuth::Basic, "crm.read"),
        client(
            "globex-erp",
            GLOBEX_ERP_SECRET,
            ClientAuth::Post,
            "crm.read crm.write",
        ),
        client(
            "initech-crm",
            "initech-crm-secret-1a2b",
            ClientAuth::Basic,
            "crm.read",
        ),
    ]
}

/// The default tenants plus their `crm` and `erp` credentials at the Tenant Service.
fn fixture() -> Fixture {
    Fixture::default_fixture()
        .with_answer(
            "acme",
            "crm",
            &json!({"clientId": "acme-crm", "clientSecret": ACME_CRM_SECRET}),
        )
        .with_answer(
            "globex",
            "erp",
            &json!({"data": {"clientId": "globex-erp", "clientSecret": GLOBEX_ERP_SECRET}}),
        )
        .with_answer(
            "initech",
            "crm",
            &json!({"clientId": "initech-crm", "clientSecret": INITECH_WRONG_SECRET}),
        )
}

/// The providers `crm` (basic, `crm.read`) and `erp` (post, both scopes and a
/// resource) at `auth`, as the filter and the companion read them.
fn providers(auth: &AuthServer) -> Value {
    json!({
        "crm": {"kind": "oauth2", "tokenUrl": auth.token_url(), "scope": "crm.read"},
        "erp": {
            "kind": "oauth2",
            "tokenUrl": auth.token_url(),
            "clientAuth": "client_secret_post",
            "scope": "crm.read crm.write",
            "resource": RESOURCE,
        },
    })
}

/// Genesys by default, WhatsApp on route `whatsapp-api`, `crm` on route `crm-api`
/// (see `envoy/local.yaml.tmpl`), and `overrides`.
fn filter_config(auth: &AuthServer, overrides: Value) -> Value {
    let mut config = Envoy::filter_config_with(json!({
        "providers": providers(auth),
        "tokenEndpointClusters": { auth.authority(): "oauth_idp" },
        "routes": {"whatsapp-api": "whatsapp", "crm-api": "crm"},
    }));
    if let (Some(config), Value::Object(overrides)) = (config.as_object_mut(), overrides) {
        config.extend(overrides);
    }
    config
}

/// A real authorization server (logging into `dir`) and a cluster of `envoys` Envoys
/// whose `oauth_idp` cluster is that server.
async fn start(dir: &Path, envoys: usize, overrides: Value) -> (AuthServer, Cluster) {
    let auth = AuthServer::start(dir, &clients()).await;
    let config = filter_config(&auth, overrides);
    let addr = Some(([127, 0, 0, 1], auth.port).into());
    let cluster = Cluster::start_with_fixture(fixture(), addr, envoys, 2, 1, &config, &[]).await;
    (auth, cluster)
}

/// Every `*.log` in `dirs`, as text.
fn logs(dirs: &[&Path]) -> String {
    let mut text = String::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|ext| ext == "log") {
                text.push_str(&String::from_utf8_lossy(
                    &std::fs::read(entry.path()).unwrap_or_default(),
                ));
            }
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_providers_serve_three_routes_of_one_envoy() {
    let auth_dir = tempfile::tempdir().unwrap();
    let (auth, mut cluster) = start(auth_dir.path(), 1, json!({})).await;
    let envoy = &cluster.envoys[0];

    let genesys = envoy.get("/genesys/queues", "acme").await;
    let whatsapp = envoy.get("/whatsapp/messages", "acme").await;
    let crm = envoy.get("/crm/contacts", "acme").await;
    let crm_again = envoy.get("/crm/deals", "acme").await;
    let default_route = envoy.get("/orders", "acme").await;

    let statuses = [&genesys, &whatsapp, &crm, &crm_again, &default_route].map(|a| a.status);
    assert_eq!(statuses, [200; 5], "{crm:?}");
    let issued = cluster.standins.tokens_issued_to("acme");
    assert_eq!(genesys.authorization, Some(format!("Bearer {}", issued[0])));
    assert_eq!(
        whatsapp.authorization.as_deref(),
        Some("Bearer wa-acme-token-51d2")
    );
    assert_eq!(
        default_route.authorization, genesys.authorization,
        "other routes get the default provider"
    );
    let crm_bearer = crm.authorization.clone().unwrap_or_default();
    let crm_token = crm_bearer.strip_prefix("Bearer ").unwrap_or_default();
    assert!(crm_token.len() >= 20, "{crm_bearer}");
    assert!(![&genesys.authorization, &whatsapp.authorization].contains(&&crm.authorization));
    assert_eq!(
        crm_again.authorization, crm.authorization,
        "the crm token is cached"
    );

    let seen = auth.token_requests().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let request = &seen[0];
    assert_eq!(
        (
            request.client_id.as_deref(),
            request.auth.as_str(),
            request.grant_type.as_deref(),
            request.scope.as_deref(),
            request.status,
        ),
        (
            Some("acme-crm"),
            ClientAuth::Basic.seen(),
            Some("client_credentials"),
            Some("crm.read"),
            200
        )
    );
    assert_eq!(cluster.standins.calls(Endpoint::Login), 1);
    // One fetch per provider: Genesys', WhatsApp's, crm's; each counted under its name.
    assert_eq!(envoy.stat("tokengate.fetch_started").await, 3);
    for provider in ["genesys", "whatsapp", "crm"] {
        let stat = |event: &str| format!("tokengate.provider.{provider}.{event}");
        assert_eq!(envoy.stat(&stat("fetch_started")).await, 1, "{provider}");
        assert_eq!(envoy.stat(&stat("fetch_succeeded")).await, 1, "{provider}");
    }
    assert_eq!(envoy.stat("tokengate.provider.erp.fetch_started").await, 0);

    // The real server's token and the client secrets are in no log.
    for envoy in &mut cluster.envoys {
        envoy.process.kill();
    }
    for companion in &mut cluster.companions {
        companion.process.kill();
    }
    let text = logs(&[cluster.dir.path(), auth_dir.path()]);
    assert!(!text.is_empty());
    for secret in [crm_token, ACME_CRM_SECRET] {
        assert!(!text.contains(secret), "a log holds a secret");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_across_two_envoys_make_one_call_to_the_authorization_server() {
    let auth_dir = tempfile::tempdir().unwrap();
    let (auth, cluster) = start(auth_dir.path(), 2, json!({})).await;

    let requests = (0..20).map(|n| cluster.envoys[n % 2].get("/crm/contacts", "acme"));
    let answers = futures::future::join_all(requests).await;

    let bearers: Vec<&Option<String>> = answers.iter().map(|a| &a.authorization).collect();
    assert!(answers.iter().all(|a| a.status == 200), "{answers:?}");
    assert!(bearers[0].is_some());
    assert!(bearers.iter().all(|bearer| *bearer == bearers[0]));
    assert_eq!(auth.token_calls("acme-crm").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_secret_post_sends_the_scope_and_resource_and_gets_a_token_for_it() {
    let auth_dir = tempfile::tempdir().unwrap();
    let (auth, cluster) = start(auth_dir.path(), 1, json!({"provider": "erp"})).await;

    let Answer {
        status,
        body,
        authorization: bearer,
    } = cluster.envoys[0].get("/orders", "globex").await;

    assert_eq!(status, 200, "{body}");
    // A token for the resource is a JWT (header.claims.signature).
    let token = bearer.unwrap_or_default();
    let token = token.strip_prefix("Bearer ").unwrap_or_default();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let seen = auth.token_requests().await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (
            seen[0].auth.as_str(),
            seen[0].scope.as_deref(),
            seen[0].resource.as_slice(),
            seen[0].status
        ),
        (
            ClientAuth::Post.seen(),
            Some("crm.read crm.write"),
            [RESOURCE.to_owned()].as_slice(),
            200
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_secret_is_refused_once_and_never_retried() {
    let auth_dir = tempfile::tempdir().unwrap();
    let (auth, cluster) = start(auth_dir.path(), 1, json!({})).await;

    let Answer { status, body, .. } = cluster.envoys[0].get("/crm/contacts", "initech").await;

    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "OAUTH_INVALID_GRANT");
    let failed = cluster.envoys[0]
        .stat("tokengate.provider.crm.fetch_failed")
        .await;
    assert_eq!(failed, 1);
    assert_eq!(
        body["message"],
        "crm rejected the OAuth credentials of tenant initech: client authentication failed"
    );
    let seen = auth.token_requests().await;
    assert_eq!(seen.len(), 1, "never retried: {seen:?}");
    assert_eq!(
        (seen[0].status, seen[0].error.as_deref()),
        (401, Some("invalid_client"))
    );
    assert!(!body.to_string().contains(INITECH_WRONG_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_companion_token_api_serves_a_named_provider() {
    let auth_dir = tempfile::tempdir().unwrap();
    let auth = AuthServer::start(auth_dir.path(), &clients()).await;
    let providers_file = auth_dir.path().join("providers.json");
    std::fs::write(&providers_file, providers(&auth).to_string()).unwrap();
    let file_arg = providers_file.display().to_string();
    let cluster = Cluster::start_with_fixture(
        fixture(),
        None,
        0,
        1,
        1,
        &Envoy::default_filter_config(),
        &["--providers-file", &file_arg],
    )
    .await;
    let url = format!("http://127.0.0.1:{}/auth/token", cluster.companions[0].port);
    let post = |body: Value| {
        let url = url.clone();
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("companion: {e}"));
            let received = receive(response).await;
            (received.status, received.json())
        }
    };

    let fresh = post(json!({"tenantId": "acme", "type": "crm"})).await;
    let cached = post(json!({"tenantId": "acme", "type": "crm"})).await;
    let unknown = post(json!({"tenantId": "acme", "type": "billing"})).await;

    assert_eq!((fresh.0, fresh.1["source"].as_str()), (200, Some("fresh")));
    assert_eq!(
        (cached.0, cached.1["source"].as_str()),
        (200, Some("cache"))
    );
    assert_eq!(cached.1["accessToken"], fresh.1["accessToken"]);
    assert_eq!(auth.token_calls("acme-crm").await, 1);
    assert_eq!(unknown.0, 400);
    assert_eq!(
        unknown.1["message"],
        "unsupported provider type 'billing': must be one of 'crm', 'erp', 'genesys', 'whatsapp'"
    );
}
