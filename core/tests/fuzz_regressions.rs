//! Inputs the fuzz targets (`fuzz/`, run by `scripts/fuzz`) found crashing, kept as
//! tests of the behaviour they now get.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use tokengate_core::flow::MAX_RATE_LIMIT_WAIT_MS;
use tokengate_core::oauth::{ExchangeOutcome, classify_response};
use tokengate_core::{
    CalloutResult, Destination, FetchConfig, FetchFlow, Provider, SecretBytes, Step, TenantId,
    TokenKey,
};

/// `oauth_response` and `fetch_flow`: the `Retry-After` the login host sent with a 429.
const HUGE_RETRY_AFTER_SECS: u64 = 12_465_963_768_561_532_935;

#[test]
fn a_huge_retry_after_saturates_instead_of_overflowing() {
    let rate_limit_400 = br#"{"error":"invalid_request","description":"rate limit exceeded"}"#;
    for (status, body) in [(429, &b""[..]), (400, rate_limit_400)] {
        let outcome = classify_response(
            status,
            &SecretBytes::new(body.to_vec()),
            Some(HUGE_RETRY_AFTER_SECS),
            None,
        );
        assert_eq!(
            outcome,
            ExchangeOutcome::RateLimited {
                retry_after_ms: Some(u64::MAX)
            },
            "status {status}"
        );
    }
}

#[test]
fn a_fetch_told_to_retry_after_ages_waits_the_longest_allowed_wait() {
    const START_MS: u64 = 1_800_000_000_000;
    let config = FetchConfig {
        deadline_ms: 2 * MAX_RATE_LIMIT_WAIT_MS,
        ..FetchConfig::default()
    };
    let key = TokenKey::new(Provider::genesys(), TenantId::parse("acme").unwrap());
    let mut flow = FetchFlow::new(key, &config);
    let credentials = br#"{"clientId":"id","clientSecret":"secret","region":"eu-west-1"}"#;
    let answers = [
        (Destination::TenantService, 200, credentials.to_vec(), None),
        (
            Destination::GenesysLogin {
                region: "eu-west-1".into(),
                host: "login.mypurecloud.ie".into(),
            },
            429,
            Vec::new(),
            Some(HUGE_RETRY_AFTER_SECS),
        ),
    ];
    for (destination, status, body, retry_after_secs) in answers {
        let Step::Send(request) = flow.poll(START_MS) else {
            panic!("expected a request to {destination:?}");
        };
        assert_eq!(request.destination, destination);
        flow.handle_response(
            START_MS,
            CalloutResult::Response {
                status,
                body: SecretBytes::new(body),
                retry_after_secs,
            },
        );
    }
    assert!(matches!(
        flow.poll(START_MS),
        Step::WaitUntil { at_ms, .. } if at_ms == START_MS + MAX_RATE_LIMIT_WAIT_MS
    ));
}
