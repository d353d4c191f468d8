//! Bad input, through real Envoy with the filter: malformed requests, oversized
//! headers and bodies, invalid tenant ids and provider names, invalid JSON in endpoint
//! mode, unknown routes and methods. Each gets a 4xx with the JSON error body
//! (`code`, `message`) and none reaches a callout or a cache key: the stand-ins count
//! no call, Redis holds no key and the filter counts no cache lookup.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{Value, json};
use tokengate_tests::harness::{Envoy, Stack};
use tokengate_tests::leak_scan::receive;
use tokengate_tests::standins::Endpoint;

/// What the client saw.
#[derive(Debug)]
struct Seen {
    status: u16,
    content_type: String,
    body: Value,
}

/// A request sent with reqwest.
async fn send(request: reqwest::RequestBuilder) -> Seen {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"));
    let received = receive(response).await;
    let content_type = received
        .headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Seen {
        status: received.status,
        content_type,
        body: received.json(),
    }
}

/// Bytes written to Envoy's listener as they are, for requests no client library sends.
fn send_raw(port: u16, request: &[u8]) -> Seen {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot connect to Envoy: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{e}"));
    stream
        .write_all(request)
        .unwrap_or_else(|e| panic!("cannot write: {e}"));
    let mut answer = Vec::new();
    // Envoy closes the connection after a protocol error; a read error ends it too.
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    tokengate_tests::leak_scan::record_body(status, body);
    Seen {
        status,
        content_type,
        body: serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    }
}

/// The cases that did not get the JSON error they should have; reported all at once.
#[derive(Debug, Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Notes a problem unless `seen` is the JSON error `(status, code)` with a message.
    fn expect_json_error(&mut self, case: &str, seen: &Seen, status: u16, code: &str) {
        let has_message = seen.body["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty());
        if (seen.status, seen.body["code"].as_str()) != (status, Some(code))
            || !seen.content_type.starts_with("application/json")
            || !has_message
        {
            self.0.push(format!(
                "{case}: expected {status} {code} as JSON with a message, got {seen:?}"
            ));
        }
    }

    /// Notes a problem unless the answer's message contains `part`.
    fn expect_message(&mut self, case: &str, seen: &Seen, part: &str) {
        let message = seen.body["message"].as_str().unwrap_or_default();
        if !message.contains(part) {
            self.0.push(format!(
                "{case}: expected a message with {part:?}, got {message:?}"
            ));
        }
    }

    /// Fails with every problem noted.
    fn assert_none(&self) {
        assert!(self.0.is_empty(), "{}", self.0.join("\n"));
    }
}

/// Nothing got past the filter: no callout, no Redis key, no cache lookup, no request
/// at the app.
async fn assert_nothing_reached_a_callout_or_a_cache_key(stack: &Stack) {
    for endpoint in [Endpoint::TenantService, Endpoint::Login, Endpoint::Echo] {
        assert_eq!(stack.standins.calls(endpoint), 0, "{endpoint:?} was called");
    }
    assert_eq!(
        stack.redis.cli(&["DBSIZE"]).trim(),
        "0",
        "Redis holds a key"
    );
    for stat in ["tokengate.cache_hit", "tokengate.cache_miss"] {
        assert_eq!(stack.envoy.stat(stat).await, 0, "{stat}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_in_inject_mode_are_json_4xx_before_any_callout() {
    let stack = Stack::start().await;
    let mut problems = Problems::default();
    let url = format!("{}/api/conversations", stack.envoy.url());
    let client = reqwest::Client::new();
    let get = |tenant: Option<&[u8]>| {
        let request = client.get(&url);
        match tenant {
            Some(tenant) => request.header(
                "x-tenant-id",
                reqwest::header::HeaderValue::from_bytes(tenant).unwrap_or_else(|e| panic!("{e}")),
            ),
            None => request,
        }
    };

    let long = "a".repeat(129);
    let bad_tenants: [(&str, &[u8]); 10] = [
        ("empty tenant id", b""),
        ("129-character tenant id", long.as_bytes()),
        ("colon", b"acme:admin"),
        ("slash and dots", b"acme/../globex"),
        ("space", b"acme globex"),
        ("wildcard", b"*"),
        ("braces", b"{acme}"),
        ("percent-encoded CRLF", b"acme%0d%0aX-Evil:1"),
        ("non-ASCII", "acmé".as_bytes()),
        ("not UTF-8", b"acme\xff"),
    ];
    for (case, tenant) in bad_tenants {
        let seen = send(get(Some(tenant))).await;
        problems.expect_json_error(case, &seen, 400, "INVALID_REQUEST");
    }
    let seen = send(get(None)).await;
    problems.expect_json_error("no tenant header", &seen, 400, "INVALID_REQUEST");
    let seen = send(
        client
            .get(&url)
            .header("x-tenant-id", "acme")
            .header("x-tenant-id", "globex"),
    )
    .await;
    problems.expect_json_error("two tenant headers", &seen, 400, "INVALID_REQUEST");
    problems.expect_message("two tenant headers", &seen, "more than once");
    for (case, values) in [
        ("a tenant header and an empty one", ["acme", ""]),
        ("an empty tenant header and another", ["", "acme"]),
        ("the same tenant twice", ["acme", "acme"]),
    ] {
        let request = values.iter().fold(client.get(&url), |request, value| {
            request.header("x-tenant-id", *value)
        });
        let seen = send(request).await;
        problems.expect_json_error(case, &seen, 400, "INVALID_REQUEST");
        problems.expect_message(case, &seen, "more than once");
    }

    // Envoy's own refusals (its codec, before any filter) speak the same JSON.
    let huge = "h".repeat(70 * 1024);
    let seen = send(
        client
            .get(&url)
            .header("x-tenant-id", "acme")
            .header("x-padding", huge),
    )
    .await;
    problems.expect_json_error("headers over Envoy's 60 KiB", &seen, 431, "INVALID_REQUEST");
    let port = stack.envoy.port;
    for (case, raw) in [
        ("not HTTP", &b"HELLO THERE\r\n\r\n"[..]),
        (
            "header without a colon",
            b"GET /api HTTP/1.1\r\nHost: a\r\nx-tenant-id acme\r\n\r\n",
        ),
        (
            "bad content-length",
            b"POST /api HTTP/1.1\r\nHost: a\r\nx-tenant-id: acme\r\nContent-Length: ten\r\n\r\n",
        ),
    ] {
        let seen = send_raw(port, raw);
        problems.expect_json_error(case, &seen, 400, "INVALID_REQUEST");
    }

    problems.assert_none();
    assert_nothing_reached_a_callout_or_a_cache_key(&stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_requests_in_endpoint_mode_are_json_4xx_before_any_callout() {
    let stack =
        Stack::start_with(Envoy::filter_config_with(json!({ "mode": "endpoint" })), 1).await;
    let mut problems = Problems::default();
    let token_url = format!("{}/auth/token", stack.envoy.url());
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        client
            .post(&token_url)
            .header("content-type", "application/json")
            .body(body)
    };

    let bad_bodies: [(&str, Vec<u8>); 9] = [
        ("not JSON", b"tenantId=acme".to_vec()),
        (
            "truncated JSON",
            br#"{"tenantId":"acme","type":"gen"#.to_vec(),
        ),
        ("a JSON array", br#"["acme","genesys"]"#.to_vec()),
        (
            "a number for the tenant",
            br#"{"tenantId":5,"type":"genesys"}"#.to_vec(),
        ),
        ("no tenant", br#"{"type":"genesys"}"#.to_vec()),
        ("no type", br#"{"tenantId":"acme"}"#.to_vec()),
        (
            "unknown provider",
            br#"{"tenantId":"acme","type":"slack"}"#.to_vec(),
        ),
        (
            "invalid tenant id",
            br#"{"tenantId":"acme/../globex","type":"genesys"}"#.to_vec(),
        ),
        (
            "a 32 KiB body",
            format!(
                r#"{{"tenantId":"acme","type":"genesys","pad":"{}"}}"#,
                "x".repeat(32 * 1024)
            )
            .into_bytes(),
        ),
    ];
    for (case, body) in bad_bodies {
        let seen = send(post(body)).await;
        problems.expect_json_error(case, &seen, 400, "INVALID_REQUEST");
    }
    let seen = send(client.post(&token_url)).await;
    problems.expect_json_error("no body", &seen, 400, "INVALID_REQUEST");
    let seen = send(post(vec![b'x'; 2 * 1024 * 1024])).await;
    problems.expect_json_error("a 2 MiB body", &seen, 400, "INVALID_REQUEST");

    let seen = send(
        client
            .get(&token_url)
            .header("x-credential-type", "genesys"),
    )
    .await;
    problems.expect_json_error("GET without a tenant", &seen, 400, "INVALID_REQUEST");
    let seen = send(
        client
            .get(&token_url)
            .header("x-tenant-id", "acme")
            .header("x-credential-type", "slack"),
    )
    .await;
    problems.expect_json_error(
        "GET with an unknown provider",
        &seen,
        400,
        "INVALID_REQUEST",
    );

    let seen = send(client.put(&token_url).body("{}")).await;
    problems.expect_json_error("PUT", &seen, 405, "METHOD_NOT_ALLOWED");
    let seen = send(client.get(format!("{}/auth/other", stack.envoy.url()))).await;
    problems.expect_json_error("unknown route", &seen, 404, "NOT_FOUND");

    problems.assert_none();
    assert_nothing_reached_a_callout_or_a_cache_key(&stack).await;
}
