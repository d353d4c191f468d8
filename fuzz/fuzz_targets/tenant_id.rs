//! Tenant-id validation: `TenantId::parse`, applied to the tenant header of every
//! request, and `Provider::parse` beside it.
//!
//! Checks: an id is accepted exactly when it is 1 to 128 characters of
//! `[A-Za-z0-9._-]`; an accepted id is kept unchanged, round-trips through JSON and
//! forms a `provider:tenant` key that splits back into its parts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate_core::provider::MAX_TENANT_ID_LEN;
use tokengate_core::{ErrorCode, Provider, TenantId, TokenKey};

fuzz_target!(|raw: &[u8]| {
    let text = String::from_utf8_lossy(raw);
    let allowed = (1..=MAX_TENANT_ID_LEN).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match TenantId::parse(&text) {
        Ok(tenant) => {
            assert!(allowed, "accepted {text:?}");
            assert_eq!(tenant.as_str(), text);
            assert_eq!(tenant.to_string(), text);
            let json = serde_json::to_string(&tenant).expect("a tenant id serializes");
            assert_eq!(
                serde_json::from_str::<TenantId>(&json).ok(),
                Some(tenant.clone())
            );
            let key = TokenKey::new(Provider::whatsapp(), tenant).to_string();
            assert_eq!(key.split_once(':'), Some(("whatsapp", text.as_ref())));
        }
        Err(error) => {
            assert!(!allowed, "rejected {text:?}: {error}");
            assert_eq!(error.code, ErrorCode::InvalidRequest);
        }
    }
    match Provider::parse(&text) {
        Ok(provider) => assert_eq!(provider.as_str(), text),
        Err(error) => {
            assert_eq!(error.code, ErrorCode::InvalidRequest);
            assert!(
                error.message.chars().all(|c| !c.is_control()),
                "the message quotes the name without control characters: {:?}",
                error.message
            );
        }
    }
});
