//! The token providers tokengate knows, and the tenant ids it accepts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

use crate::error::{ErrorCode, TokenError};

/// Longest provider name accepted.
pub const MAX_PROVIDER_NAME_LEN: usize = 32;

/// The name of a provider whose tokens tokengate obtains on a tenant's behalf: 1 to
/// [`MAX_PROVIDER_NAME_LEN`] characters of `[a-z0-9_-]`, used in stats, cache keys, the
/// Tenant Service path and the token API's `type`. `genesys` and `whatsapp` are always
/// configured; others are named in the configuration (see [`crate::providers`]), which
/// also says what kind each is. Shared, not copied: every request's key holds one, so
/// a clone is a reference count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provider(Arc<str>);

impl Provider {
    /// Genesys Cloud: client-credentials OAuth exchange against the region's login host.
    pub fn genesys() -> Self {
        Provider(Arc::from(GENESYS))
    }

    /// WhatsApp Business: a static system-user token held by the Tenant Service.
    pub fn whatsapp() -> Self {
        Provider(Arc::from(WHATSAPP))
    }

    /// The name used in URLs, cache keys and JSON.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a provider name, rejecting one that cannot be a name with
    /// `INVALID_REQUEST`. Whether it is configured is [`crate::providers::ProviderTable`]'s
    /// to say.
    pub fn parse(name: &str) -> Result<Self, TokenError> {
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-');
        if name.is_empty() || name.len() > MAX_PROVIDER_NAME_LEN || !name.chars().all(valid_char) {
            return Err(TokenError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "unsupported provider type '{}': a provider name is 1 to {MAX_PROVIDER_NAME_LEN} characters of a-z, 0-9, '_' and '-'",
                    printable(name)
                ),
            ));
        }
        Ok(Provider(Arc::from(name)))
    }
}

/// The built-in Genesys provider's name.
pub const GENESYS: &str = "genesys";
/// The built-in WhatsApp provider's name.
pub const WHATSAPP: &str = "whatsapp";

impl Serialize for Provider {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Provider {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Provider::parse(&raw).map_err(|e| serde::de::Error::custom(e.message))
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest tenant id accepted; longer ones are rejected before any key or callout is built.
pub const MAX_TENANT_ID_LEN: usize = 128;

/// A validated tenant id: 1 to [`MAX_TENANT_ID_LEN`] characters of `[A-Za-z0-9._-]`.
///
/// The charset keeps ids safe to place in a URL path, a cache key and a log line
/// without escaping: no `/`, `:`, `*`, `{}`, whitespace or control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// Validates `raw` as a tenant id (see also `TryFrom<String>`, which keeps the
    /// caller's buffer).
    pub fn parse(raw: &str) -> Result<Self, TokenError> {
        Self::check(raw)?;
        Ok(TenantId(raw.to_owned()))
    }

    /// Why `raw` is not a tenant id, if it is not.
    fn check(raw: &str) -> Result<(), TokenError> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if raw.is_empty() {
            return Err(TokenError::new(
                ErrorCode::InvalidRequest,
                "tenant id is empty",
            ));
        }
        if raw.len() > MAX_TENANT_ID_LEN {
            return Err(TokenError::new(
                ErrorCode::InvalidRequest,
                format!("tenant id is longer than {MAX_TENANT_ID_LEN} characters"),
            ));
        }
        if !raw.chars().all(valid_char) {
            return Err(TokenError::new(
                ErrorCode::InvalidRequest,
                "tenant id may only contain letters, digits, '.', '_' and '-'",
            ));
        }
        Ok(())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = TokenError;

    /// As [`TenantId::parse`], without copying `raw`.
    fn try_from(raw: String) -> Result<Self, TokenError> {
        Self::check(&raw)?;
        Ok(TenantId(raw))
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        TenantId::parse(&raw).map_err(|e| serde::de::Error::custom(e.message))
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies one token: the provider and the tenant it is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenKey {
    /// Which provider issued the token.
    pub provider: Provider,
    /// Which tenant the token acts for.
    pub tenant_id: TenantId,
}

impl TokenKey {
    /// Builds a key from its parts.
    pub fn new(provider: Provider, tenant_id: TenantId) -> Self {
        Self {
            provider,
            tenant_id,
        }
    }

    /// A well-mixed hash of the key, the same in every process, build and version (FNV-1a
    /// of `provider:tenant`, then splitmix64's finaliser): places keys in a bounded cache
    /// and spreads their refresh moments.
    pub fn stable_hash(&self) -> u64 {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let bytes = self
            .provider
            .as_str()
            .bytes()
            .chain([b':'])
            .chain(self.tenant_id.as_str().bytes());
        mix(bytes.fold(OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        }))
    }
}

/// splitmix64's finaliser: every input bit affects every output bit.
pub(crate) fn mix(hash: u64) -> u64 {
    let hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.provider, self.tenant_id)
    }
}

/// Shortens untrusted text for an error message: at most 64 characters, controls replaced.
pub(crate) fn printable(raw: &str) -> String {
    raw.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn tenant_ids_of_the_safe_charset_are_accepted() {
        for id in ["acme", "tenant-42", "a.b_c", &"x".repeat(MAX_TENANT_ID_LEN)] {
            assert_eq!(TenantId::parse(id).map(|t| t.0), Ok(id.to_owned()));
            assert_eq!(TenantId::try_from(id.to_owned()), TenantId::parse(id));
        }
    }

    #[test]
    fn tenant_ids_with_separators_controls_or_excess_length_are_rejected() {
        let long = "x".repeat(MAX_TENANT_ID_LEN + 1);
        for id in ["", "a:b", "a*", "{a}", "a/b", "a b", "a\r\nb", "é", &long] {
            let err = TenantId::parse(id).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{id:?}");
            assert_eq!(TenantId::try_from(id.to_owned()), Err(err), "{id:?}");
        }
    }

    #[test]
    fn provider_names_of_the_safe_charset_are_accepted_and_others_refused() {
        assert_eq!(Provider::parse("whatsapp"), Ok(Provider::whatsapp()));
        assert_eq!(
            Provider::parse("crm_2-eu").map(|p| p.as_str().to_owned()),
            Ok("crm_2-eu".to_owned())
        );
        let long = "x".repeat(MAX_PROVIDER_NAME_LEN + 1);
        for name in ["", "CRM", "a:b", "a b", "a/b", "é", &long] {
            let err = Provider::parse(name).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidRequest, "{name:?}");
            assert!(
                err.message.starts_with("unsupported provider type"),
                "{name:?}"
            );
        }
    }
}
