//! The Genesys login stand-in: `POST /oauth/token`, client-credentials grant (FACTS §4).
//!
//! A request is accepted only when all of these hold, checked in this order:
//!
//! 1. the host (a single `Host` header, or the URI authority under HTTP/2) is the
//!    login host of some Genesys region (`login.<domain>`; port and letter case
//!    ignored), else HTTP 400 `invalid_request` / `wrong host`;
//! 2. a single `Authorization: Basic base64(clientId:clientSecret)` names a fixture
//!    client with that secret, else HTTP 400 `invalid_client` / `client not found`.
//!    A request without any `Authorization` header may instead carry the client
//!    credentials in its form body, `client_id` and `client_secret` exactly once each
//!    (RFC 6749 §2.3.1; this is how Envoy's oauth2 credential injector sends them);
//!    when it has an `Authorization` header, only that header counts;
//! 3. the host is the login host of *that client's* region, else `wrong host` again;
//! 4. a single `Content-Type: application/x-www-form-urlencoded` (parameters such as
//!    `charset` allowed), else 400 `invalid_request`;
//! 5. the form has exactly one `grant_type`, else 400 `invalid_request`, and it is
//!    `client_credentials`, else 400 `unsupported_grant_type`.
//!
//! Every wrong-host request is counted (see `StandIns::wrong_host_calls`), even when
//! an injected fault answers it. Success is
//! `200 {"access_token":"gen-<tenant>-<n>-<hex>","token_type":"bearer","expires_in":86399}`
//! with no refresh token; issued tokens are recorded per tenant.

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

use super::faults::{Dialect, Endpoint};
use super::fixture::GenesysClient;
use super::regions::region_of_login_host;
use super::server::{self, LogClientId, MAX_BODY_BYTES, ServerCtx, Shared};

/// Path of the token endpoint.
pub const TOKEN_PATH: &str = "/oauth/token";

pub(crate) fn router(ctx: ServerCtx) -> Router {
    server::router(ctx, handle)
}

async fn handle(State(ctx): State<ServerCtx>, request: Request) -> Response {
    let shared = &ctx.shared;
    let arrival = shared.arrive(Endpoint::Login, request.headers());
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, MAX_BODY_BYTES).await;
    let client_id = body
        .as_ref()
        .ok()
        .and_then(|body| client_credentials(&parts, body))
        .map(|(id, _)| id);

    let verdict = match &body {
        Ok(body) => check(shared, &parts, body),
        Err(_) => Err(Rejection::UnreadableBody),
    };
    let mut response = match shared.settle(arrival, &Dialect::Login).await {
        Some(response) => response,
        None => match verdict {
            Ok(client) => grant(shared, client),
            Err(rejection) => rejection.into_response(),
        },
    };
    if let Some(client_id) = client_id {
        response.extensions_mut().insert(LogClientId(client_id));
    }
    response
}

/// Why the login refused a token request; rendered once, as a Genesys error body.
#[derive(Debug)]
enum Rejection {
    /// Not `/oauth/token`.
    NoRoute(String),
    /// `/oauth/token` with another method than POST.
    MethodNotAllowed(Method),
    /// Not the login host of the client's region (detail in `error_description`).
    WrongHost(String),
    /// Basic credentials missing, malformed, unknown or with the wrong secret.
    InvalidClient,
    /// Body not declared as a form.
    NotAForm,
    /// No `grant_type` in the form.
    MissingGrantType,
    /// `grant_type` more than once.
    RepeatedGrantType,
    /// A `grant_type` other than `client_credentials`.
    UnsupportedGrantType,
    /// Body over [`MAX_BODY_BYTES`] or broken off.
    UnreadableBody,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, code, description, detail) = match self {
            Rejection::NoRoute(path) => (
                StatusCode::NOT_FOUND,
                "not_found",
                "not found",
                format!("no route for {path}"),
            ),
            Rejection::MethodNotAllowed(method) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "method not allowed",
                format!("{method} is not allowed on {TOKEN_PATH}"),
            ),
            Rejection::WrongHost(detail) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "wrong host",
                detail,
            ),
            Rejection::InvalidClient => (
                StatusCode::BAD_REQUEST,
                "invalid_client",
                "client not found",
                "client not found".to_owned(),
            ),
            Rejection::NotAForm => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "invalid content type",
                "content type must be application/x-www-form-urlencoded".to_owned(),
            ),
            Rejection::MissingGrantType => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "missing grant_type",
                "missing grant_type".to_owned(),
            ),
            Rejection::RepeatedGrantType => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type given more than once",
                "grant_type given more than once".to_owned(),
            ),
            Rejection::UnsupportedGrantType => (
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "unsupported grant type",
                "unsupported grant type".to_owned(),
            ),
            Rejection::UnreadableBody => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "request body too large or unreadable",
                "request body too large or unreadable".to_owned(),
            ),
        };
        let body =
            json!({ "error": code, "description": description, "error_description": detail });
        (status, axum::Json(body)).into_response()
    }
}

/// Runs the checks listed in the module doc: the client to issue a token to, or why not.
fn check<'s>(
    shared: &'s Shared,
    parts: &Parts,
    body: &[u8],
) -> Result<&'s GenesysClient, Rejection> {
    if parts.uri.path() != TOKEN_PATH {
        return Err(Rejection::NoRoute(parts.uri.path().to_owned()));
    }
    if parts.method != Method::POST {
        return Err(Rejection::MethodNotAllowed(parts.method.clone()));
    }

    let host = request_host(parts);
    let Some(host_region) = host.as_deref().and_then(region_of_login_host) else {
        shared.record_wrong_host();
        return Err(Rejection::WrongHost(format!(
            "host '{}' is not a Genesys login host",
            host.as_deref().unwrap_or("")
        )));
    };

    let client = client_credentials(parts, body)
        .and_then(|(id, secret)| {
            shared
                .fixture
                .genesys_client_by_id(&id)
                .filter(|client| client.client_secret == secret)
        })
        .ok_or(Rejection::InvalidClient)?;
    if client.region != host_region {
        shared.record_wrong_host();
        return Err(Rejection::WrongHost(format!(
            "client '{}' is in region '{}', not '{host_region}'",
            client.client_id, client.region
        )));
    }

    if !is_form_urlencoded(single(parts, header::CONTENT_TYPE)) {
        return Err(Rejection::NotAForm);
    }
    let grant_types: Vec<String> = form_urlencoded::parse(body)
        .filter(|(name, _)| name == "grant_type")
        .map(|(_, value)| value.into_owned())
        .collect();
    match grant_types.as_slice() {
        [grant] if grant == "client_credentials" => Ok(client),
        [_] => Err(Rejection::UnsupportedGrantType),
        [] => Err(Rejection::MissingGrantType),
        _ => Err(Rejection::RepeatedGrantType),
    }
}

/// Issues a token to the client: the Genesys success answer.
fn grant(shared: &Shared, client: &GenesysClient) -> Response {
    let (token, expires_in) = shared.issue_token(&client.tenant);
    let body = json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": expires_in,
    });
    (
        StatusCode::OK,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        axum::Json(body),
    )
        .into_response()
}

/// The host the request was sent to, without port: the URI authority (HTTP/2
/// `:authority`, absolute-form HTTP/1 targets) or else the `Host` header.
fn request_host(parts: &Parts) -> Option<String> {
    if let Some(authority) = parts.uri.authority() {
        return Some(authority.host().to_owned());
    }
    let host = single(parts, header::HOST)?.to_str().ok()?;
    let without_port = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    Some(without_port.to_owned())
}

/// The value of a header sent exactly once; `None` if absent or repeated.
fn single(parts: &Parts, name: header::HeaderName) -> Option<&HeaderValue> {
    let mut values = parts.headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// The `(client id, secret)` the request authenticates with: from the `Authorization`
/// header when there is one, else from the form body (RFC 6749 §2.3.1).
fn client_credentials(parts: &Parts, body: &[u8]) -> Option<(String, String)> {
    if parts.headers.contains_key(header::AUTHORIZATION) {
        basic_credentials(parts)
    } else {
        form_credentials(parts, body)
    }
}

/// `(client id, secret)` from a form body holding `client_id` and `client_secret`
/// exactly once each; `None` if the body is not declared as a form.
fn form_credentials(parts: &Parts, body: &[u8]) -> Option<(String, String)> {
    if !is_form_urlencoded(single(parts, header::CONTENT_TYPE)) {
        return None;
    }
    let only = |name: &str| {
        let mut values = form_urlencoded::parse(body)
            .filter(|(field, _)| field == name)
            .map(|(_, value)| value.into_owned());
        let first = values.next()?;
        values.next().is_none().then_some(first)
    };
    Some((only("client_id")?, only("client_secret")?))
}

/// `(client id, secret)` from a single `Authorization: Basic …`, if well-formed.
fn basic_credentials(parts: &Parts) -> Option<(String, String)> {
    let value = single(parts, header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn is_form_urlencoded(content_type: Option<&HeaderValue>) -> bool {
    content_type
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| {
            essence
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::standins::{Fault, Fixture, StandIns};

    const FORM: &str = "application/x-www-form-urlencoded";

    async fn start() -> (StandIns, reqwest::Client) {
        let standins = StandIns::start(Fixture::default_fixture())
            .await
            .expect("stand-ins start");
        (standins, reqwest::Client::new())
    }

    /// A token request, correct by default; tests change one field at a time.
    /// (Each header is sent once: reqwest's `.header()` appends.)
    #[derive(Debug, Clone)]
    struct TokenRequest {
        host: String,
        authorization: Option<String>,
        content_type: String,
        body: String,
    }

    impl TokenRequest {
        fn for_tenant(standins: &StandIns, tenant: &str) -> TokenRequest {
            let genesys = standins
                .fixture()
                .genesys_client(tenant)
                .expect("tenant has a genesys client");
            TokenRequest {
                host: genesys.login_host().unwrap_or_default(),
                authorization: Some(genesys.basic_authorization()),
                content_type: FORM.to_owned(),
                body: "grant_type=client_credentials".to_owned(),
            }
        }

        fn builder(
            &self,
            standins: &StandIns,
            client: &reqwest::Client,
        ) -> reqwest::RequestBuilder {
            let mut builder = client
                .post(format!("{}{TOKEN_PATH}", standins.url(Endpoint::Login)))
                .header(header::HOST, &self.host)
                .header(header::CONTENT_TYPE, &self.content_type)
                .body(self.body.clone());
            if let Some(authorization) = &self.authorization {
                builder = builder.header(header::AUTHORIZATION, authorization);
            }
            builder
        }

        async fn send(&self, standins: &StandIns, client: &reqwest::Client) -> reqwest::Response {
            self.builder(standins, client)
                .send()
                .await
                .expect("request")
        }

        async fn send_json(&self, standins: &StandIns, client: &reqwest::Client) -> (u16, Value) {
            let response = self.send(standins, client).await;
            let status = response.status().as_u16();
            (status, response.json().await.expect("json body"))
        }
    }

    #[tokio::test]
    async fn correct_request_gets_a_genesys_shaped_token() {
        let (standins, client) = start().await;
        let response = TokenRequest::for_tenant(&standins, "acme")
            .send(&standins, &client)
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 86399);
        assert!(body.get("refresh_token").is_none());
        assert_eq!(body.as_object().expect("object").len(), 3, "{body}");
        let token = body["access_token"].as_str().expect("token");
        assert!(token.starts_with("gen-acme-1-"), "{token}");
        assert_eq!(standins.tokens_issued_to("acme"), vec![token.to_owned()]);
        assert_eq!(
            standins.tokens_issued_to("acme-client"),
            vec![token.to_owned()]
        );
        assert_eq!(standins.calls(Endpoint::Login), 1);
        assert_eq!(standins.wrong_host_calls(), 0);
    }

    #[tokio::test]
    async fn every_tenant_logs_in_at_its_own_regions_host_with_unique_tokens() {
        let (standins, client) = start().await;
        let tenants = ["acme", "globex", "initech", "umbrella", "hooli", "wayne"];
        let mut tokens = std::collections::HashSet::new();
        for tenant in tenants {
            for _ in 0..2 {
                let (status, body) = TokenRequest::for_tenant(&standins, tenant)
                    .send_json(&standins, &client)
                    .await;
                assert_eq!(status, 200, "{tenant}: {body}");
                let token = body["access_token"].as_str().expect("token").to_owned();
                assert!(token.starts_with(&format!("gen-{tenant}-")), "{token}");
                assert!(tokens.insert(token));
            }
            assert_eq!(standins.tokens_issued_to(tenant).len(), 2);
        }
        assert_eq!(standins.tokens_issued(), 12);
        assert_eq!(standins.wrong_host_calls(), 0);
    }

    #[tokio::test]
    async fn host_with_port_or_other_case_is_accepted() {
        let (standins, client) = start().await;
        let mut request = TokenRequest::for_tenant(&standins, "initech");
        request.host = "LOGIN.mypurecloud.com:443".to_owned();
        assert_eq!(request.send(&standins, &client).await.status(), 200);
    }

    #[tokio::test]
    async fn wrong_host_is_rejected_and_counted() {
        let (standins, client) = start().await;
        // acme is in eu-west-1 (login.mypurecloud.ie).
        for host in [
            "login.mypurecloud.com",
            "api.mypurecloud.ie",
            "127.0.0.1",
            "",
        ] {
            let mut request = TokenRequest::for_tenant(&standins, "acme");
            request.host = host.to_owned();
            let (status, body) = request.send_json(&standins, &client).await;
            assert_eq!(status, 400, "{host}");
            assert_eq!(body["error"], "invalid_request");
            assert_eq!(body["description"], "wrong host");
            assert!(body["error_description"].is_string());
        }
        assert_eq!(standins.wrong_host_calls(), 4);
        assert!(standins.tokens_issued_to("acme").is_empty());
    }

    #[tokio::test]
    async fn duplicated_host_header_is_a_wrong_host() {
        let (standins, client) = start().await;
        let request = TokenRequest::for_tenant(&standins, "acme");
        let response = request
            .builder(&standins, &client)
            .header(header::HOST, "login.mypurecloud.ie")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 400);
        assert_eq!(standins.wrong_host_calls(), 1);
    }

    #[tokio::test]
    async fn unknown_region_client_can_never_log_in() {
        let (standins, client) = start().await;
        let lostco = standins
            .fixture()
            .genesys_client("lostco")
            .expect("lostco")
            .clone();
        let request = TokenRequest {
            host: "login.mypurecloud.com".to_owned(),
            authorization: Some(lostco.basic_authorization()),
            content_type: FORM.to_owned(),
            body: "grant_type=client_credentials".to_owned(),
        };
        let (status, body) = request.send_json(&standins, &client).await;
        assert_eq!((status, &body["description"]), (400, &json!("wrong host")));
        assert_eq!(standins.wrong_host_calls(), 1);
    }

    #[tokio::test]
    async fn bad_or_missing_basic_auth_is_invalid_client() {
        let (standins, client) = start().await;
        let acme_with_globex_secret = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("acme-client:globex-secret-02be44")
        );
        for authorization in [
            Some(acme_with_globex_secret.as_str()),
            Some("Basic bm9ib2R5Om5vdGhpbmc="), // nobody:nothing
            Some("Bearer acme-secret-7f3a9c"),
            Some("Basic !!!not-base64"),
            None,
        ] {
            let mut request = TokenRequest::for_tenant(&standins, "acme");
            request.authorization = authorization.map(str::to_owned);
            let (status, body) = request.send_json(&standins, &client).await;
            assert_eq!(status, 400, "{authorization:?}");
            assert_eq!(
                body,
                json!({"error": "invalid_client", "description": "client not found", "error_description": "client not found"})
            );
        }
        assert!(standins.tokens_issued_to("acme").is_empty());
        assert_eq!(standins.wrong_host_calls(), 0);
    }

    #[tokio::test]
    async fn client_credentials_in_the_form_body_are_accepted_without_basic_auth() {
        let (standins, client) = start().await;
        let acme = standins
            .fixture()
            .genesys_client("acme")
            .expect("acme")
            .clone();
        let form = |id: &str, secret: &str| {
            let mut request = TokenRequest::for_tenant(&standins, "acme");
            request.authorization = None;
            request.body = form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", "client_credentials")
                .append_pair("client_id", id)
                .append_pair("client_secret", secret)
                .finish();
            request
        };
        // As Envoy's oauth2 credential injector sends it.
        let (status, body) = form(&acme.client_id, &acme.client_secret)
            .send_json(&standins, &client)
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["access_token"]
                .as_str()
                .is_some_and(|token| token.starts_with("gen-acme-1-")),
            "{body}"
        );

        let mut rejected = vec![
            form(&acme.client_id, "wrong-secret"),
            form("nobody", &acme.client_secret),
        ];
        // Each field exactly once.
        let mut repeated = form(&acme.client_id, &acme.client_secret);
        repeated.body.push_str("&client_id=acme-client");
        rejected.push(repeated);
        let mut missing_secret = form(&acme.client_id, &acme.client_secret);
        missing_secret.body = "grant_type=client_credentials&client_id=acme-client".to_owned();
        rejected.push(missing_secret);
        // Not a form: the body is not read for credentials.
        let mut not_a_form = form(&acme.client_id, &acme.client_secret);
        not_a_form.content_type = "text/plain".to_owned();
        rejected.push(not_a_form);
        // With an Authorization header, only the header counts.
        let mut bad_header = form(&acme.client_id, &acme.client_secret);
        bad_header.authorization = Some("Basic bm9ib2R5Om5vdGhpbmc=".to_owned()); // nobody:nothing
        rejected.push(bad_header);
        for request in rejected {
            let (status, answer) = request.send_json(&standins, &client).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some("invalid_client")),
                "{request:?}"
            );
        }

        // The region check still applies to body credentials.
        let mut wrong_host = form(&acme.client_id, &acme.client_secret);
        wrong_host.host = "login.mypurecloud.com".to_owned();
        let (status, answer) = wrong_host.send_json(&standins, &client).await;
        assert_eq!(
            (status, &answer["description"]),
            (400, &json!("wrong host"))
        );
        assert_eq!(standins.tokens_issued_to("acme").len(), 1);
    }

    #[tokio::test]
    async fn body_must_be_a_form_with_the_client_credentials_grant() {
        let (standins, client) = start().await;
        let cases = [
            (
                "application/json",
                r#"{"grant_type":"client_credentials"}"#,
                "invalid_request",
            ),
            (
                "text/plain",
                "grant_type=client_credentials",
                "invalid_request",
            ),
            (FORM, "grant_type=password", "unsupported_grant_type"),
            (FORM, "", "invalid_request"),
            (
                FORM,
                "grant_type=client_credentials&grant_type=client_credentials",
                "invalid_request",
            ),
        ];
        for (content_type, body, error) in cases {
            let mut request = TokenRequest::for_tenant(&standins, "acme");
            request.content_type = content_type.to_owned();
            request.body = body.to_owned();
            let (status, answer) = request.send_json(&standins, &client).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(error)),
                "{content_type} {body}"
            );
        }
        let mut charset = TokenRequest::for_tenant(&standins, "acme");
        charset.content_type = "application/x-www-form-urlencoded; charset=UTF-8".to_owned();
        charset.body = "scope=&grant_type=client_credentials".to_owned();
        assert_eq!(charset.send(&standins, &client).await.status(), 200);
    }

    #[tokio::test]
    async fn rate_limited_fault_is_a_genesys_400_then_normal_service_resumes() {
        let (standins, client) = start().await;
        let request = TokenRequest::for_tenant(&standins, "acme");
        standins.push_fault(Endpoint::Login, Fault::RateLimited);
        standins.push_fault(Endpoint::Login, Fault::InvalidClient);
        let (status, body) = request.send_json(&standins, &client).await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            json!({"error": "invalid_request", "description": "rate limit exceeded", "error_description": "rate limit exceeded"})
        );
        let (status, body) = request.send_json(&standins, &client).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_client"))
        );
        let (status, _) = request.send_json(&standins, &client).await;
        assert_eq!(status, 200);
        assert_eq!(standins.tokens_issued_to("acme").len(), 1);
        assert_eq!(standins.calls(Endpoint::Login), 3);
    }

    #[tokio::test]
    async fn too_many_requests_carries_retry_after_when_asked() {
        let (standins, client) = start().await;
        let request = TokenRequest::for_tenant(&standins, "acme");
        standins.push_fault(
            Endpoint::Login,
            Fault::TooManyRequests {
                retry_after_secs: Some(7),
            },
        );
        standins.push_fault(
            Endpoint::Login,
            Fault::TooManyRequests {
                retry_after_secs: None,
            },
        );
        let first = request.send(&standins, &client).await;
        assert_eq!(first.status(), 429);
        assert_eq!(first.headers()[header::RETRY_AFTER], "7");
        let second = request.send(&standins, &client).await;
        assert_eq!(second.status(), 429);
        assert!(second.headers().get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn status_raw_empty_and_garbage_faults_issue_no_token() {
        let (standins, client) = start().await;
        let request = TokenRequest::for_tenant(&standins, "acme");
        standins.push_fault(Endpoint::Login, Fault::Status(503));
        standins.push_fault(
            Endpoint::Login,
            Fault::StatusWithBody(502, "upstream".into()),
        );
        standins.push_fault(Endpoint::Login, Fault::EmptyOk);
        standins.push_fault(Endpoint::Login, Fault::GarbageOk);
        let (status, body) = request.send_json(&standins, &client).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("temporarily_unavailable"))
        );
        let raw = request.send(&standins, &client).await;
        assert_eq!(raw.status(), 502);
        assert_eq!(raw.text().await.expect("body"), "upstream");
        let empty = request.send(&standins, &client).await;
        assert_eq!(empty.status(), 200);
        assert_eq!(empty.text().await.expect("body"), "");
        let garbage = request.send(&standins, &client).await;
        assert_eq!(garbage.status(), 200);
        assert!(serde_json::from_str::<Value>(&garbage.text().await.expect("body")).is_err());
        assert!(standins.tokens_issued_to("acme").is_empty());
        assert_eq!(standins.calls(Endpoint::Login), 4);
    }

    #[tokio::test]
    async fn expires_in_is_configurable() {
        let (standins, client) = start().await;
        standins.set_expires_in(300);
        let (_, body) = TokenRequest::for_tenant(&standins, "acme")
            .send_json(&standins, &client)
            .await;
        assert_eq!(body["expires_in"], 300);
    }

    #[tokio::test]
    async fn wrong_host_is_counted_even_when_a_fault_answers() {
        let (standins, client) = start().await;
        standins.push_fault(Endpoint::Login, Fault::Status(500));
        let mut request = TokenRequest::for_tenant(&standins, "acme");
        request.host = "login.mypurecloud.de".to_owned();
        assert_eq!(request.send(&standins, &client).await.status(), 500);
        assert_eq!(standins.wrong_host_calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hang_lasts_until_the_client_gives_up_then_service_resumes() {
        let (standins, client) = start().await;
        let request = TokenRequest::for_tenant(&standins, "acme");
        standins.push_fault(Endpoint::Login, Fault::Hang);
        let started = tokio::time::Instant::now();
        let hung = request
            .builder(&standins, &client)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        assert!(hung.expect_err("no answer").is_timeout());
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert_eq!(standins.calls(Endpoint::Login), 1);

        assert_eq!(request.send(&standins, &client).await.status(), 200);
        assert_eq!(standins.calls(Endpoint::Login), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn delay_fault_delays_one_answer_and_latency_every_answer() {
        let (standins, client) = start().await;
        let request = TokenRequest::for_tenant(&standins, "acme");
        standins.push_fault(Endpoint::Login, Fault::Delay(Duration::from_secs(4)));
        let started = tokio::time::Instant::now();
        assert_eq!(request.send(&standins, &client).await.status(), 200);
        assert!(started.elapsed() >= Duration::from_secs(4));

        let started = tokio::time::Instant::now();
        assert_eq!(request.send(&standins, &client).await.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(4));

        standins.set_latency(Endpoint::Login, Duration::from_secs(2));
        for _ in 0..2 {
            let started = tokio::time::Instant::now();
            assert_eq!(request.send(&standins, &client).await.status(), 200);
            let elapsed = started.elapsed();
            assert!(
                elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(4),
                "{elapsed:?}"
            );
        }
    }

    #[tokio::test]
    async fn hanging_request_is_released_by_shutdown() {
        let (standins, client) = start().await;
        standins.push_fault(Endpoint::Login, Fault::Hang);
        let pending = tokio::spawn(
            TokenRequest::for_tenant(&standins, "acme")
                .builder(&standins, &client)
                .send(),
        );
        // Let the request reach the stand-in, without sleeping.
        while standins.calls(Endpoint::Login) == 0 {
            tokio::task::yield_now().await;
        }
        standins.shutdown().await;
        let answer = pending.await.expect("task");
        assert_eq!(answer.expect("released").status(), 503);
    }
}
