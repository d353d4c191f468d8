//! The OAuth response classifier: `oauth::classify_response`, fed a status, a
//! `Retry-After` value in seconds (as the drivers read it from the header) and a body.
//!
//! Checks: each status class maps to the outcomes it may have, a token is never empty
//! and its lifetime stays within 1 s to 48 h, a `Retry-After` is carried over (in
//! milliseconds), text quoted from the IdP is short and free of control characters,
//! and the outcome's `Debug` never shows the access token.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::SecretBytes;
use tokengate_core::oauth::{ExchangeOutcome, MAX_EXPIRES_IN_SECS, classify_response};
use tokengate_fuzz::{Response, assert_hidden, plant_secret};

fuzz_target!(|answer: Response| {
    check(&answer, answer.body.0, None);
    // An `oauth2` provider with a default lifetime for answers without `expires_in`.
    check(&answer, answer.body.0, Some(3_600));
    if answer.status == 200
        && let Some(planted) = plant_secret(answer.body.0, &["/access_token"])
    {
        let outcome = check(&answer, &planted, None);
        assert_hidden("the classified token answer", &format!("{outcome:?}"));
    }
});

fn check(
    answer: &Response<'_>,
    body: &[u8],
    default_expires_in_secs: Option<u64>,
) -> ExchangeOutcome {
    let outcome = classify_response(
        answer.status,
        &SecretBytes::new(body.to_vec()),
        answer.retry_after_secs,
        default_expires_in_secs,
    );
    let expected_retry_after_ms = answer.retry_after_secs.map(|s| s.saturating_mul(1000));
    match &outcome {
        ExchangeOutcome::Token {
            access_token,
            expires_in_secs,
        } => {
            assert_eq!(answer.status, 200);
            assert!(!access_token.is_empty());
            assert!((1..=MAX_EXPIRES_IN_SECS).contains(expires_in_secs));
        }
        ExchangeOutcome::Transient { .. } => {
            assert!(answer.status == 200 || (500..=599).contains(&answer.status));
        }
        ExchangeOutcome::RateLimited { retry_after_ms } => {
            assert!(matches!(answer.status, 400 | 401 | 403 | 429));
            assert_eq!(*retry_after_ms, expected_retry_after_ms);
        }
        ExchangeOutcome::CredentialsRejected { description } => {
            assert!(matches!(answer.status, 400 | 401 | 403));
            assert_log_safe(description);
        }
        ExchangeOutcome::Fatal { reason } => {
            // A 200 is fatal only for a token that is not a Bearer token.
            let not_bearer = answer.status == 200 && reason.contains("not Bearer");
            assert!(not_bearer || (answer.status != 200 && !(500..=599).contains(&answer.status)));
            assert_log_safe(reason);
        }
    }
    if answer.status == 429 {
        assert_eq!(
            outcome,
            ExchangeOutcome::RateLimited {
                retry_after_ms: expected_retry_after_ms
            }
        );
    }
    outcome
}

/// Text quoted from the IdP: at most 64 characters of it, no control characters.
fn assert_log_safe(text: &str) {
    assert!(!text.chars().any(char::is_control), "{text:?}");
    // The longest wording around a quote: "login answered token_type '…', not Bearer".
    let wording = "login answered 65535 "
        .len()
        .max("login answered token_type '', not Bearer".len());
    assert!(text.chars().count() <= 64 + wording, "{text:?}");
}
