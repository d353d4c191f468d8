//! Correlation ids: every request is served inside a tracing span carrying its
//! `request_id`, so every log line it causes (Redis, upstream calls, the lease) names
//! it; the id is echoed back in the `x-request-id` response header and in error bodies
//! (`correlationId`).
//!
//! The id is the request's own `x-request-id` when it has a usable one (1 to 128
//! visible ASCII characters, e.g. Envoy's UUIDs), else a new UUID v4.
//!
//! Trace context: a request carrying a valid W3C `traceparent` has its trace id in the
//! span too (`trace_id`), and the token API's Tenant Service and token endpoint calls
//! for it carry the same `traceparent` ([`traceparent`], [`with_traceparent`]), so the
//! fetch shows in the caller's trace. Only the header is passed on: no secret or token
//! goes into a span.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tokengate_core::Traceparent;
use tracing::Instrument;

/// The header a correlation id travels in, both ways.
pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest `x-request-id` taken over from a request.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The W3C trace context header (<https://www.w3.org/TR/trace-context/>).
pub static TRACEPARENT_HEADER: HeaderName =
    HeaderName::from_static(tokengate_core::trace::TRACEPARENT_HEADER);

tokio::task_local! {
    /// The correlation id of the request being served by this task.
    static REQUEST_ID: String;
    /// The valid `traceparent` of the request being served by this task, if it had one.
    static TRACEPARENT: Option<String>;
}

/// The `traceparent` of the request the current task serves, if it had a valid one.
pub fn traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

/// Runs `future` (a task of its own, such as the token API's fetch) with `traceparent`
/// as its request's, so its upstream calls pass it on.
pub async fn with_traceparent<F: Future>(traceparent: Option<String>, future: F) -> F::Output {
    TRACEPARENT.scope(traceparent, future).await
}

/// A W3C `traceparent` header value, if valid by core's rule ([`Traceparent`]): the
/// value to pass on and its trace id.
pub fn parse_traceparent(header: Option<&HeaderValue>) -> Option<(String, String)> {
    let traceparent = Traceparent::parse(header?.to_str().ok()?)?;
    Some((
        traceparent.as_str().to_owned(),
        traceparent.trace_id().to_owned(),
    ))
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
    let trace = parse_traceparent(request.headers().get(&TRACEPARENT_HEADER));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        trace_id = tracing::field::Empty,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let traceparent = trace.map(|(traceparent, trace_id)| {
        span.record("trace_id", tracing::field::display(&trace_id));
        traceparent
    });
    let started = tokio::time::Instant::now();
    let mut response = REQUEST_ID
        .scope(id.clone(), with_traceparent(traceparent, next.run(request)))
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

    #[test]
    fn a_valid_traceparent_is_kept_with_its_trace_id_and_others_are_dropped() {
        // The rule itself is core's (`tokengate_core::trace`), tested there.
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(Some(&HeaderValue::from_static(valid))),
            Some((
                valid.to_owned(),
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned()
            ))
        );
        let not_text = HeaderValue::from_bytes(b"00-\xff").unwrap();
        for bad in [HeaderValue::from_static("00-4bf92f35"), not_text] {
            assert_eq!(parse_traceparent(Some(&bad)), None, "{bad:?}");
        }
        assert_eq!(parse_traceparent(None), None);
    }

    #[tokio::test]
    async fn the_traceparent_is_visible_inside_its_scope_only() {
        assert_eq!(traceparent(), None);
        let inside = with_traceparent(Some("00-ab".to_owned()), async { traceparent() }).await;
        assert_eq!(inside.as_deref(), Some("00-ab"));
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
