//! The cached form of a token: the expiry travels inside the value, because the
//! caches it lives in (Envoy shared data) have no TTL of their own.

use crate::provider::TokenKey;
use crate::secret::SecretString;

/// Format version of [`CachedToken::encode`]; bump when the layout changes.
const FORMAT_VERSION: u8 = 1;

/// A token and the moment it stops being usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedToken {
    /// The bearer token.
    pub access_token: SecretString,
    /// When to stop using it, in milliseconds since the epoch.
    pub expires_at_ms: u64,
}

impl CachedToken {
    /// Whether the token may still be injected at `now_ms`, keeping `margin_ms` in hand
    /// so it does not expire on its way to the upstream.
    pub fn is_fresh(&self, now_ms: u64, margin_ms: u64) -> bool {
        now_ms.saturating_add(margin_ms) < self.expires_at_ms
    }

    /// Encodes as `[version][expires_at_ms: u64 big-endian][token bytes]`.
    pub fn encode(&self) -> Vec<u8> {
        let token = self.access_token.expose().as_bytes();
        let mut bytes = Vec::with_capacity(1 + 8 + token.len());
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(&self.expires_at_ms.to_be_bytes());
        bytes.extend_from_slice(token);
        bytes
    }

    /// Decodes [`CachedToken::encode`]'s output; `None` for anything else (an empty
    /// value, another version, a token that is not UTF-8).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT_VERSION || rest.len() <= 8 {
            return None;
        }
        let (expiry, token) = rest.split_at(8);
        let expires_at_ms = u64::from_be_bytes(expiry.try_into().ok()?);
        let access_token = SecretString::new(String::from_utf8(token.to_vec()).ok()?);
        Some(Self {
            access_token,
            expires_at_ms,
        })
    }
}

/// The key under which a token is cached in Envoy shared data.
pub fn shared_data_key(key: &TokenKey) -> String {
    format!(
        "tokengate.v{FORMAT_VERSION}.token.{}.{}",
        key.provider, key.tenant_id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Provider, TenantId};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn encoding_round_trips() {
        let token = CachedToken {
            access_token: SecretString::from("tok-1"),
            expires_at_ms: 1_700_000_000_123,
        };
        assert_eq!(CachedToken::decode(&token.encode()), Some(token));
    }

    #[test]
    fn foreign_or_truncated_values_do_not_decode() {
        assert_eq!(CachedToken::decode(b""), None);
        assert_eq!(
            CachedToken::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 1, b't']),
            None
        );
        assert_eq!(CachedToken::decode(&[1, 0, 0, 0]), None);
        assert_eq!(CachedToken::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn freshness_keeps_the_margin() {
        let token = CachedToken {
            access_token: SecretString::from("t"),
            expires_at_ms: 10_000,
        };
        assert!(token.is_fresh(4_999, 5_000));
        assert!(!token.is_fresh(5_000, 5_000));
        assert!(!token.is_fresh(20_000, 0));
    }

    #[test]
    fn keys_name_provider_and_tenant() {
        let key = TokenKey::new(Provider::Genesys, TenantId::parse("acme").unwrap());
        assert_eq!(shared_data_key(&key), "tokengate.v1.token.genesys.acme");
    }
}
