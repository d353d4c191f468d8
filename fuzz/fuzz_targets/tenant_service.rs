//! The Tenant Service response parsers: `GenesysCredentials::parse` (with and without
//! a default region) and `StaticCredentials::parse`, fed the raw response body.
//!
//! Checks: accepted credentials are never empty, a WhatsApp expiry is positive and
//! survives the RFC 3339 round trip the token API answers with, a rejection is
//! `CREDENTIALS_NOT_FOUND` naming the tenant, and no error or `Debug` output repeats a
//! client id, client secret or token.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::credentials::{GenesysCredentials, StaticCredentials};
use tokengate_core::rfc3339::{format_rfc3339_ms, parse_rfc3339_ms};
use tokengate_core::{ErrorCode, Provider, TenantId, TokenError, TokenKey};
use tokengate_fuzz::{assert_hidden, plant_secret};

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

const GENESYS_SECRETS: &[&str] = &[
    "/clientId",
    "/clientSecret",
    "/data/clientId",
    "/data/clientSecret",
];
const WHATSAPP_SECRETS: &[&str] = &["/systemUserToken", "/accessToken", "/token"];

fuzz_target!(|body: &[u8]| {
    let genesys = key(Provider::genesys());
    let whatsapp = key(Provider::whatsapp());
    for default_region in [None, Some("eu-west-1")] {
        check_genesys(&genesys, body, default_region);
    }
    check_whatsapp(&whatsapp, body);
    if let Some(planted) = plant_secret(body, GENESYS_SECRETS) {
        assert_hidden(
            "Genesys credentials",
            &check_genesys(&genesys, &planted, None),
        );
    }
    if let Some(planted) = plant_secret(body, WHATSAPP_SECRETS) {
        assert_hidden("WhatsApp credentials", &check_whatsapp(&whatsapp, &planted));
    }
});

fn key(provider: Provider) -> TokenKey {
    TokenKey::new(
        provider,
        TenantId::parse("acme").expect("a valid tenant id"),
    )
}

/// Parses a Genesys document, checks the result and returns everything it would show.
fn check_genesys(key: &TokenKey, body: &[u8], default_region: Option<&str>) -> String {
    match GenesysCredentials::parse(key, body, default_region) {
        Ok(credentials) => {
            assert!(
                !credentials.client_id.is_empty() && !credentials.client_secret.is_empty(),
                "empty credentials accepted"
            );
            format!("{credentials:?}")
        }
        Err(error) => shown_rejection(&error),
    }
}

/// Parses a WhatsApp document, checks the result and returns everything it would show.
fn check_whatsapp(key: &TokenKey, body: &[u8]) -> String {
    match StaticCredentials::parse(key, "WhatsApp", body) {
        Ok(credentials) => {
            assert!(!credentials.token.is_empty(), "empty token accepted");
            if let Some(expires_at_ms) = credentials.expires_at_ms {
                assert!(expires_at_ms > 0, "expiry 0 means none");
                if expires_at_ms <= LAST_RFC3339_MS {
                    let text = format_rfc3339_ms(expires_at_ms);
                    assert_eq!(parse_rfc3339_ms(&text), Some(expires_at_ms), "{text}");
                }
            }
            format!("{credentials:?}")
        }
        Err(error) => shown_rejection(&error),
    }
}

fn shown_rejection(error: &TokenError) -> String {
    assert_eq!(error.code, ErrorCode::CredentialsNotFound, "{error}");
    assert!(error.message.contains("tenant acme"), "{error}");
    format!("{error} {error:?}")
}
