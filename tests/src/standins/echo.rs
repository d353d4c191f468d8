//! The echo upstream: stands in for the app behind the gateway and shows what it received.
//!
//! Any method, any path answers 200 with
//! `{"method":"GET","path":"/x","query":null,"headers":{"authorization":"Bearer …"},"body":""}`.
//! Header names are lower-case; a header sent several times becomes an array of its
//! values in order, so tests can see duplicated `Authorization` headers. The path
//! `/status/{code}` (200..=599) answers that status with the same JSON, e.g. `/status/401`
//! for purge-on-401 tests.

use std::collections::BTreeMap;

use axum::body::to_bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::faults::{Dialect, Endpoint};
use super::server::{self, MAX_BODY_BYTES, ServerCtx};

pub(crate) fn router(ctx: ServerCtx) -> Router {
    server::router(ctx, handle)
}

async fn handle(State(ctx): State<ServerCtx>, request: Request) -> Response {
    let shared = &ctx.shared;
    let arrival = shared.arrive(Endpoint::Echo, request.headers());
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, MAX_BODY_BYTES).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large or unreadable",
        )
            .into_response();
    };
    let echo = echo_of(&parts, &body);
    if let Some(response) = shared.settle(arrival, &Dialect::Echo(echo.clone())).await {
        return response;
    }
    let status = status_from_path(parts.uri.path()).unwrap_or(StatusCode::OK);
    (status, Json(echo)).into_response()
}

/// The JSON description of a request.
fn echo_of(parts: &Parts, body: &[u8]) -> Value {
    let mut headers: BTreeMap<String, Value> = BTreeMap::new();
    for name in parts.headers.keys() {
        let mut values: Vec<Value> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|value| Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned()))
            .collect();
        let value = if values.len() == 1 {
            values.remove(0)
        } else {
            Value::Array(values)
        };
        headers.insert(name.as_str().to_owned(), value);
    }
    json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(body),
    })
}

/// `/status/{code}` -> that status, when it is a final one (200..=599).
fn status_from_path(path: &str) -> Option<StatusCode> {
    let code: u16 = path.strip_prefix("/status/")?.parse().ok()?;
    if !(200..=599).contains(&code) {
        return None;
    }
    StatusCode::from_u16(code).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standins::{Fault, Fixture, StandIns};

    async fn start() -> (StandIns, reqwest::Client) {
        let standins = StandIns::start(Fixture::default_fixture())
            .await
            .expect("stand-ins start");
        (standins, reqwest::Client::new())
    }

    #[tokio::test]
    async fn echoes_method_path_query_headers_and_body() {
        let (standins, client) = start().await;
        let response = client
            .put(format!("{}/v1/messages?x=1", standins.url(Endpoint::Echo)))
            .header("Authorization", "Bearer abc")
            .header("X-Tenant-Id", "acme")
            .body("hello")
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        let echo: Value = response.json().await.expect("json");
        assert_eq!(echo["method"], "PUT");
        assert_eq!(echo["path"], "/v1/messages");
        assert_eq!(echo["query"], "x=1");
        assert_eq!(echo["headers"]["authorization"], "Bearer abc");
        assert_eq!(echo["headers"]["x-tenant-id"], "acme");
        assert_eq!(echo["body"], "hello");
        assert_eq!(standins.calls(Endpoint::Echo), 1);
    }

    #[tokio::test]
    async fn repeated_header_becomes_an_array() {
        let (standins, client) = start().await;
        let echo: Value = client
            .get(format!("{}/x", standins.url(Endpoint::Echo)))
            .header("authorization", "Bearer one")
            .header("authorization", "Bearer two")
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        assert_eq!(
            echo["headers"]["authorization"],
            json!(["Bearer one", "Bearer two"])
        );
    }

    #[tokio::test]
    async fn status_path_and_status_fault_answer_that_status_with_the_echo() {
        let (standins, client) = start().await;
        let response = client
            .get(format!("{}/status/401", standins.url(Endpoint::Echo)))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 401);
        let echo: Value = response.json().await.expect("json");
        assert_eq!(echo["path"], "/status/401");

        standins.push_fault(Endpoint::Echo, Fault::Status(401));
        let faulted = client
            .get(format!("{}/orders", standins.url(Endpoint::Echo)))
            .send()
            .await
            .expect("request");
        assert_eq!(faulted.status(), 401);
        let echo: Value = faulted.json().await.expect("json");
        assert_eq!(echo["path"], "/orders");

        let normal = client
            .get(format!("{}/orders", standins.url(Endpoint::Echo)))
            .send()
            .await
            .expect("request");
        assert_eq!(normal.status(), 200);
        assert_eq!(standins.calls(Endpoint::Echo), 3);
    }

    #[test]
    fn only_final_statuses_are_taken_from_the_path() {
        assert_eq!(
            status_from_path("/status/503"),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(status_from_path("/status/101"), None);
        assert_eq!(status_from_path("/status/abc"), None);
        assert_eq!(status_from_path("/statuses/401"), None);
    }
}
