//! A whole fetch: `FetchFlow` driven through fuzzed Tenant Service and login answers,
//! response delays and configuration, the way the filter and the companion drive it.
//!
//! Checks: the flow ends within its retry budget, never waits backwards or past its
//! deadline, never gives a request more time than the deadline leaves, answers the same
//! result once done, and no step, request or result shows a planted secret.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokengate_core::flow::MIN_ATTEMPT_MS;
use tokengate_core::{
    CalloutResult, FetchConfig, FetchFlow, Provider, SecretBytes, Step, TenantId, TokenKey,
};
use tokengate_fuzz::{Response, assert_hidden, holds_secret, plant_secret};

/// Every field of either answer that carries a secret.
const SECRETS: &[&str] = &[
    "/clientId",
    "/clientSecret",
    "/data/clientId",
    "/data/clientSecret",
    "/systemUserToken",
    "/accessToken",
    "/token",
    "/access_token",
];

/// One fetch: its provider, retry and deadline settings, start time and the answers
/// its requests get, in order (missing ones time out).
#[derive(Debug, Arbitrary)]
struct Script<'a> {
    whatsapp: bool,
    tenant_service_retries: u8,
    oauth_retries: u8,
    deadline_ms: u32,
    start_ms: u64,
    answers: Vec<Answer<'a>>,
}

/// What comes back for one request, and how long after it was sent.
#[derive(Debug, Arbitrary)]
struct Answer<'a> {
    delay_ms: u16,
    response: Option<Response<'a>>,
}

fuzz_target!(|script: Script| {
    let mut responses = script.answers.iter().filter_map(|a| a.response.as_ref());
    if responses.any(|response| holds_secret(response.body.0)) {
        return;
    }
    let provider = if script.whatsapp {
        Provider::whatsapp()
    } else {
        Provider::genesys()
    };
    let key = TokenKey::new(
        provider,
        TenantId::parse("acme").expect("a valid tenant id"),
    );
    let config = FetchConfig {
        tenant_service_retries: u32::from(script.tenant_service_retries % 5),
        oauth_retries: u32::from(script.oauth_retries % 5),
        deadline_ms: u64::from(script.deadline_ms),
        ..FetchConfig::default()
    };
    let max_sends = config.tenant_service_retries + config.oauth_retries + 2;
    let deadline_at_ms = script.start_ms.saturating_add(config.deadline_ms);
    let mut flow = FetchFlow::new(key, &config);
    let mut answers = script.answers.into_iter();
    let mut now_ms = script.start_ms;
    let mut sends = 0;
    let result = loop {
        let step = flow.poll(now_ms);
        assert_hidden("a step", &format!("{step:?}"));
        match step {
            Step::Send(request) => {
                sends += 1;
                assert!(sends <= max_sends, "more requests than retries allow");
                let budget_ms = deadline_at_ms.saturating_sub(now_ms).max(1);
                assert!((1..=budget_ms).contains(&request.timeout_ms), "{request:?}");
                // Like the drivers: no answer within the request's timeout is no answer.
                let (delay_ms, response) = match answers.next() {
                    Some(answer) if u64::from(answer.delay_ms) <= request.timeout_ms => {
                        (answer.delay_ms.into(), answer.response)
                    }
                    _ => (request.timeout_ms, None),
                };
                now_ms = now_ms.saturating_add(delay_ms);
                flow.handle_response(now_ms, callout_result(response));
            }
            Step::WaitUntil { at_ms, .. } => {
                assert!(at_ms > now_ms, "waits for a moment already past");
                assert!(
                    at_ms.saturating_add(MIN_ATTEMPT_MS) <= deadline_at_ms,
                    "waits past the deadline"
                );
                now_ms = at_ms;
            }
            Step::AwaitResponse => panic!("awaits a response after it was fed"),
            Step::Done(result) => break result,
        }
    };
    assert_hidden("the flow", &format!("{flow:?}"));
    match &result {
        Ok(token) => {
            assert!(!token.access_token.is_empty());
            assert_eq!(token.cacheable, token.expires_in_secs > 0);
            assert!(!token.cacheable || token.expires_at_ms > now_ms || now_ms == u64::MAX);
        }
        Err(error) => assert_hidden("the fetch error", &format!("{error} {error:?}")),
    }
    assert!(matches!(flow.poll(now_ms), Step::Done(again) if again == result));
});

/// The driver's callout result, with a planted secret in every secret field present.
fn callout_result(response: Option<Response<'_>>) -> CalloutResult {
    match response {
        Some(response) => CalloutResult::Response {
            status: response.status,
            body: SecretBytes::new(
                plant_secret(response.body.0, SECRETS).unwrap_or_else(|| response.body.0.to_vec()),
            ),
            retry_after_secs: response.retry_after_secs,
        },
        None => CalloutResult::NoResponse,
    }
}
