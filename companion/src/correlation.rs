//! Correlation ids: every request is served inside a tracing span carrying its
//! `request_id`, so every log line it causes (Redis, upstream calls, the lease) names
//! it; the id is echoed back in the `x-request-id` response header and in error bodies
//! (`correlationId`).
//!
//! The id is the request's own `x-request-id` when it has a usable one (1 to 128
//! visible ASCII characters, e.g. Envoy's UUIDs), else a new UUID v4.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header a correlation id travels in, both ways.
pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `x-request-id` taken over from a request.
pub const MAX_REQUEST_ID_LEN: usize = 128;

tokio::task_local! {
    /// The correlation id of the request being served by this task.
    static REQUEST_ID: String;
}

/// The correlation id of the request the current task serves, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// The id to use for a request carrying `header` (its `x-request-id`, if any).
pub fn request_id(header: Option<&HeaderValue>) -> String {
    header
        .and_then(|value| value.to_str().ok())
        .filter(|id| {
            (1..=MAX_REQUEST_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

/// Middleware: serves the request inside its `request` span and task-local id, and
/// echoes the id in the response.
pub async fn layer(request: Request, next: Next) -> Response {
    let id = request_id(request.headers().get(&REQUEST_ID_HEADER));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = tokio::time::Instant::now();
    let mut response = REQUEST_ID
        .scope(id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.in_scope(|| {
        tracing::debug!(
            status = response.status().as_u16(),
            took_ms,
            "request served"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(REQUEST_ID_HEADER.clone(), value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usable_request_id_is_kept_and_others_are_replaced() {
        let kept = HeaderValue::from_static("req-42");
        assert_eq!(request_id(Some(&kept)), "req-42");
        for bad in [
            HeaderValue::from_static(""),
            HeaderValue::from_static("has space"),
            HeaderValue::from_str(&"x".repeat(129)).unwrap(),
        ] {
            let id = request_id(Some(&bad));
            assert_eq!(id.len(), 36, "{bad:?} -> {id}");
        }
        assert_ne!(request_id(None), request_id(None));
    }

    #[tokio::test]
    async fn the_id_is_visible_inside_its_scope_only() {
        assert_eq!(current(), None);
        let inside = REQUEST_ID
            .scope("abc".to_owned(), async { current() })
            .await;
        assert_eq!(inside.as_deref(), Some("abc"));
    }
}
