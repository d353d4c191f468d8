//! The token API's request parsers: `TokenRequest::from_json` (the `POST /auth/token`
//! body) and `TokenRequest::from_headers` (the legacy `GET`).
//!
//! Checks: every rejection is `INVALID_REQUEST`; an accepted request names a configured
//! provider (the built-in ones and an `oauth2` one) and a tenant id that validates again
//! on its own.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use tokengate_core::providers::{ProviderDocument, ProviderTable};
use tokengate_core::token_api::TokenRequest;
use tokengate_core::{ErrorCode, Provider, TenantId, TokenError};

/// `genesys`, `whatsapp` and the `oauth2` provider `crm`.
static PROVIDERS: LazyLock<ProviderTable> = LazyLock::new(|| {
    let documents: BTreeMap<String, ProviderDocument> = serde_json::from_str(
        r#"{"crm":{"kind":"oauth2","tokenUrl":"https://idp.crm.example/token"}}"#,
    )
    .expect("a providers document");
    ProviderTable::from_documents(&documents).expect("valid providers")
});

fuzz_target!(|body: &[u8]| {
    check(TokenRequest::from_json(body, &PROVIDERS));
    let text = String::from_utf8_lossy(body);
    let (tenant, credential_type) = text.split_once('\n').unwrap_or((&text, "genesys"));
    check(TokenRequest::from_headers(
        Some(tenant),
        Some(credential_type),
        &PROVIDERS,
    ));
});

fn check(parsed: Result<TokenRequest, TokenError>) {
    match parsed {
        Ok(request) => {
            let tenant = request.key.tenant_id.as_str();
            assert_eq!(TenantId::parse(tenant).as_ref(), Ok(&request.key.tenant_id));
            let provider = request.key.provider;
            assert_eq!(Provider::parse(provider.as_str()).as_ref(), Ok(&provider));
            assert!(PROVIDERS.get(&provider).is_some(), "{provider}");
        }
        Err(error) => assert_eq!(error.code, ErrorCode::InvalidRequest, "{error}"),
    }
}
