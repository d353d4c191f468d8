//! The authorization server the end-to-end tests run (oidc-provider, see
//! `tokengate_tests::authserver`), proved on its own: what it answers to the client
//! credentials requests tokengate makes, and that its record of those requests counts
//! them, says how each client authenticated and what it asked for, and never holds a
//! secret.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use tempfile::TempDir;
use tokengate_tests::authserver::{AuthClient, AuthServer, ClientAuth, RESOURCE};
use tokengate_tests::leak_scan::{Received, receive};

/// A client that authenticates with the `Authorization: Basic` header.
fn basic_client() -> AuthClient {
    AuthClient {
        id: "acme-basic".to_owned(),
        secret: "acme-basic-secret-5f1c9e".to_owned(),
        auth: ClientAuth::Basic,
        scope: "crm.read".to_owned(),
    }
}

/// A client that authenticates with its secret in the form body.
fn post_client() -> AuthClient {
    AuthClient {
        id: "globex-post".to_owned(),
        secret: "globex-post-secret-8d2a71".to_owned(),
        auth: ClientAuth::Post,
        scope: "crm.read crm.write".to_owned(),
    }
}

/// A server with [`basic_client`] and [`post_client`], and the folder of its files.
async fn start() -> (AuthServer, TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temporary folder: {e}"));
    let server = AuthServer::start(dir.path(), &[basic_client(), post_client()]).await;
    (server, dir)
}

/// A client credentials request from `client` as it was registered (its secret and its
/// authentication method), with the extra form fields `form`.
async fn request_token(
    server: &AuthServer,
    client: &AuthClient,
    form: &[(&str, &str)],
) -> Received {
    request_token_as(server, client, &client.secret, client.auth, form).await
}

/// A client credentials request naming `client`, with `secret` sent the way `auth`
/// says, and the extra form fields `form`.
async fn request_token_as(
    server: &AuthServer,
    client: &AuthClient,
    secret: &str,
    auth: ClientAuth,
    form: &[(&str, &str)],
) -> Received {
    let mut fields = vec![("grant_type", "client_credentials")];
    fields.extend_from_slice(form);
    let request = reqwest::Client::new().post(server.token_url());
    let request = match auth {
        ClientAuth::Basic => request.basic_auth(&client.id, Some(secret)),
        ClientAuth::Post => {
            fields.extend([("client_id", client.id.as_str()), ("client_secret", secret)]);
            request
        }
    };
    let response = request
        .form(&fields)
        .send()
        .await
        .unwrap_or_else(|e| panic!("token request: {e}"));
    receive(response).await
}

/// Fails unless `answer` is a bearer token answer (RFC 6749 §5.1) with a lifetime.
fn assert_token(answer: &Received) {
    let json = answer.json();
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        json["access_token"]
            .as_str()
            .is_some_and(|token| !token.is_empty()),
        "no access_token"
    );
    let token_type = json["token_type"].as_str().unwrap_or_default();
    assert!(
        token_type.eq_ignore_ascii_case("bearer"),
        "token_type {token_type}"
    );
    let expires_in = json["expires_in"].as_u64().unwrap_or_default();
    assert!(expires_in > 0, "expires_in {}", json["expires_in"]);
}

#[tokio::test]
async fn each_client_gets_a_bearer_token_with_the_scope_it_asked_for() {
    let (server, _dir) = start().await;
    assert_eq!(server.token_path(), "/token");
    assert_eq!(
        server.token_url(),
        format!("http://{}/token", server.authority())
    );
    for client in [basic_client(), post_client()] {
        let answer = request_token(&server, &client, &[("scope", &client.scope)]).await;
        assert_token(&answer);
        assert_eq!(answer.json()["expires_in"], 3600, "{:?}", client.auth);
        assert_eq!(answer.json()["scope"], client.scope, "{:?}", client.auth);
    }
    let seen = server.token_requests().await;
    let auth: Vec<&str> = seen.iter().map(|request| request.auth.as_str()).collect();
    assert_eq!(auth, ["basic", "post"]);
}

#[tokio::test]
async fn wrong_secret_is_invalid_client_and_counted() {
    let (server, _dir) = start().await;
    let client = basic_client();
    for auth in [ClientAuth::Basic, ClientAuth::Post] {
        let answer = request_token_as(&server, &client, "not-the-secret", auth, &[]).await;
        assert_eq!(answer.status, 401, "{auth:?}: {}", answer.text);
        assert_eq!(answer.json()["error"], "invalid_client", "{auth:?}");
    }
    let seen = server.token_requests().await;
    assert_eq!(server.token_calls(&client.id).await, 2);
    assert!(
        seen.iter()
            .all(|request| request.status == 401
                && request.error.as_deref() == Some("invalid_client")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn scope_the_client_is_not_allowed_is_invalid_scope() {
    let (server, _dir) = start().await;
    let client = basic_client();
    let answer = request_token(&server, &client, &[("scope", "crm.read crm.write")]).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json()["error"], "invalid_scope");
}

/// oidc-provider accepts `client_secret_basic` and `client_secret_post` for a client
/// registered with either (RFC 6749 §2.3.1 lets a server take both); tokengate must not
/// count on a server refusing the other one.
#[tokio::test]
async fn secret_in_header_or_body_is_accepted_whichever_was_registered() {
    let (server, _dir) = start().await;
    for (client, auth) in [
        (basic_client(), ClientAuth::Post),
        (post_client(), ClientAuth::Basic),
    ] {
        let answer = request_token_as(&server, &client, &client.secret, auth, &[]).await;
        assert_token(&answer);
    }
}

#[tokio::test]
async fn resource_gets_a_jwt_for_that_audience_and_an_unknown_one_is_invalid_target() {
    let (server, _dir) = start().await;
    let client = basic_client();
    let form = [("scope", "crm.read"), ("resource", RESOURCE)];
    let answer = request_token(&server, &client, &form).await;
    assert_token(&answer);
    let token = answer.json()["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let payload = token
        .split('.')
        .nth(1)
        .and_then(|part| URL_SAFE_NO_PAD.decode(part).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .unwrap_or_else(|| panic!("not a JWT: {token}"));
    assert_eq!(payload["aud"], RESOURCE);
    assert_eq!(payload["scope"], "crm.read");
    assert_eq!(payload["client_id"], client.id);

    let form = [("resource", "https://elsewhere.example")];
    let answer = request_token(&server, &client, &form).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json()["error"], "invalid_target");
}

#[tokio::test]
async fn calls_report_auth_method_scope_and_resource_and_never_a_secret() {
    let (server, _dir) = start().await;
    let (basic, post) = (basic_client(), post_client());
    let first = request_token(
        &server,
        &basic,
        &[
            ("scope", "crm.read"),
            ("resource", RESOURCE),
            ("audience", RESOURCE),
        ],
    )
    .await;
    let second = request_token(&server, &post, &[("scope", "crm.write")]).await;
    assert_token(&first);
    assert_token(&second);

    let seen = server.token_requests().await;
    let summary: Vec<_> = seen
        .iter()
        .map(|request| {
            (
                request.client_id.as_deref(),
                request.auth.as_str(),
                request.scope.as_deref(),
                request.status,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                Some(basic.id.as_str()),
                ClientAuth::Basic.seen(),
                Some("crm.read"),
                200
            ),
            (
                Some(post.id.as_str()),
                ClientAuth::Post.seen(),
                Some("crm.write"),
                200
            ),
        ]
    );
    assert_eq!(seen[0].resource, [RESOURCE]);
    assert_eq!(seen[0].audience, [RESOURCE]);
    assert_eq!(seen[0].grant_type.as_deref(), Some("client_credentials"));
    assert!(seen[1].resource.is_empty() && seen[1].audience.is_empty());

    let calls = reqwest::get(server.calls_url())
        .await
        .unwrap_or_else(|e| panic!("calls: {e}"))
        .text()
        .await
        .unwrap_or_default();
    let log = server.process.log_text();
    assert!(log.contains("authserver listening on"), "{log}");
    let tokens = [&first, &second].map(|answer| answer.json()["access_token"].to_string());
    let basic_header = STANDARD.encode(format!("{}:{}", basic.id, basic.secret));
    for (name, text) in [("the calls record", &calls), ("the server's log", &log)] {
        for secret in [&basic.secret, &post.secret, &basic_header] {
            assert!(
                !text.contains(secret.as_str()),
                "{name} holds a client secret"
            );
        }
        for token in &tokens {
            assert!(
                !text.contains(token.trim_matches('"')),
                "{name} holds an access token"
            );
        }
    }
}
