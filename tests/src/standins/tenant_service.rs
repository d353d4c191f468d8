//! The Tenant Service stand-in: `GET /tenants/{id}/credentials/{type}`.
//!
//! Answers 200 with the fixture's JSON for that tenant and type, byte for byte, and
//! 404 `{"error":"not_found","message":…}` when the tenant or the type is absent or the
//! path is anything else. Records the `X-Service-Name` header of the last request.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::faults::{Dialect, Endpoint, lock};
use super::fixture::Fixture;
use super::server::{self, ServerCtx};

/// Header the gateway must send to identify itself.
pub const SERVICE_NAME_HEADER: &str = "x-service-name";

pub(crate) fn router(ctx: ServerCtx) -> Router {
    server::router(ctx, handle)
}

async fn handle(State(ctx): State<ServerCtx>, request: Request) -> Response {
    let shared = &ctx.shared;
    let arrival = shared.arrive(Endpoint::TenantService, request.headers());
    let service_name = request
        .headers()
        .get(SERVICE_NAME_HEADER)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    *lock(&shared.last_service_name) = service_name;

    let answer = answer(&shared.fixture, request.method(), request.uri().path());
    if let Some(response) = shared.settle(arrival, &Dialect::TenantService).await {
        return response;
    }
    answer
}

/// The normal answer to a request, from the fixture.
fn answer(fixture: &Fixture, method: &Method, path: &str) -> Response {
    let dialect = Dialect::TenantService;
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["tenants", tenant, "credentials", credential_type] = segments.as_slice() else {
        return dialect.error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}"),
        );
    };
    if method != Method::GET {
        return dialect.error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{method} is not allowed on {path}"),
        );
    }
    if !fixture.has_tenant(tenant) {
        return dialect.error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("tenant '{tenant}' not found"),
        );
    }
    match fixture.credentials(tenant, credential_type) {
        Some(raw) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            raw.to_owned(),
        )
            .into_response(),
        None => dialect.error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("tenant '{tenant}' has no '{credential_type}' credentials"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::standins::{Fault, StandIns};

    async fn start() -> (StandIns, reqwest::Client) {
        let standins = StandIns::start(Fixture::default_fixture())
            .await
            .expect("stand-ins start");
        (standins, reqwest::Client::new())
    }

    fn url(standins: &StandIns, tenant: &str, kind: &str) -> String {
        format!(
            "{}/tenants/{tenant}/credentials/{kind}",
            standins.url(Endpoint::TenantService)
        )
    }

    #[tokio::test]
    async fn answers_fixture_json_verbatim_for_both_genesys_shapes() {
        let (standins, client) = start().await;
        for (tenant, kind) in [
            ("acme", "genesys"),
            ("acme", "whatsapp"),
            ("globex", "genesys"),
            ("umbrella", "whatsapp"),
        ] {
            let response = client
                .get(url(&standins, tenant, kind))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = response.text().await.expect("body");
            assert_eq!(
                Some(body.as_str()),
                standins.fixture().credentials(tenant, kind)
            );
        }
        let globex: Value = client
            .get(url(&standins, "globex", "genesys"))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(globex["data"]["clientId"], "globex-client");
        assert_eq!(standins.calls(Endpoint::TenantService), 5);
    }

    #[tokio::test]
    async fn unknown_tenant_or_type_or_path_is_404_not_found() {
        let (standins, client) = start().await;
        for path in [
            url(&standins, "nobody", "genesys"),
            url(&standins, "wonka", "genesys"),
            url(&standins, "acme", "slack"),
            format!("{}/tenants/acme", standins.url(Endpoint::TenantService)),
        ] {
            let response = client.get(&path).send().await.expect("request");
            assert_eq!(response.status(), 404, "{path}");
            let body: Value = response.json().await.expect("json");
            assert_eq!(body["error"], "not_found");
            assert!(body["message"].is_string());
        }
        assert_eq!(standins.calls(Endpoint::TenantService), 4);
    }

    #[tokio::test]
    async fn records_the_service_name_of_the_last_call() {
        let (standins, client) = start().await;
        assert_eq!(standins.last_service_name(), None);
        client
            .get(url(&standins, "acme", "genesys"))
            .header("X-Service-Name", "tokengate")
            .send()
            .await
            .expect("request");
        assert_eq!(standins.last_service_name().as_deref(), Some("tokengate"));
        client
            .get(url(&standins, "acme", "genesys"))
            .send()
            .await
            .expect("request");
        assert_eq!(standins.last_service_name(), None);
    }

    #[tokio::test]
    async fn queued_faults_hit_the_next_requests_in_order_then_normal_answers_resume() {
        let (standins, client) = start().await;
        standins.push_fault(Endpoint::TenantService, Fault::Status(503));
        standins.push_fault(Endpoint::TenantService, Fault::GarbageOk);
        let first = client
            .get(url(&standins, "acme", "genesys"))
            .send()
            .await
            .expect("request");
        assert_eq!(first.status(), 503);
        let body: Value = first.json().await.expect("json");
        assert_eq!(body["error"], "service_unavailable");

        let second = client
            .get(url(&standins, "acme", "genesys"))
            .send()
            .await
            .expect("request");
        assert_eq!(second.status(), 200);
        assert!(serde_json::from_str::<Value>(&second.text().await.expect("body")).is_err());

        let third = client
            .get(url(&standins, "acme", "genesys"))
            .send()
            .await
            .expect("request");
        assert_eq!(third.status(), 200);
        assert_eq!(
            Some(third.text().await.expect("body").as_str()),
            standins.fixture().credentials("acme", "genesys")
        );
        assert_eq!(standins.calls(Endpoint::TenantService), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_added_to_every_answer() {
        let (standins, client) = start().await;
        standins.set_latency(Endpoint::TenantService, Duration::from_secs(3));
        for _ in 0..2 {
            let started = tokio::time::Instant::now();
            let response = client
                .get(url(&standins, "acme", "whatsapp"))
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 200);
            assert!(started.elapsed() >= Duration::from_secs(3));
        }
    }
}
