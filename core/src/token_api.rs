//! The original service's token API: `POST /auth/token` with a JSON body, or the
//! legacy `GET /auth/token` with the type in `X-Credential-Type`, answered with a
//! `TokenResponse`. Served by the filter in endpoint mode and by the companion.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, TokenError};
use crate::flow::FetchedToken;
use crate::provider::{TenantId, TokenKey};
use crate::providers::ProviderTable;
use crate::rfc3339::{format_rfc3339_ms, parse_rfc3339_ms};
use crate::secret::SecretString;

/// Path of the token API, for `POST` and the legacy `GET`.
pub const TOKEN_PATH: &str = "/auth/token";
/// Header naming the provider in the legacy `GET`.
pub const CREDENTIAL_TYPE_HEADER: &str = "x-credential-type";

/// The body of `POST /auth/token`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequestBody {
    tenant_id: Option<String>,
    #[serde(rename = "type")]
    provider: Option<String>,
    #[serde(default)]
    force_refresh: bool,
    #[serde(default)]
    min_expires_at_ms: Option<u64>,
}

/// A validated token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The token asked for.
    pub key: TokenKey,
    /// Skip the caches and fetch a new token.
    pub force_refresh: bool,
    /// Only a token expiring after this will do (`minExpiresAtMs`, an extension of the
    /// original API that the filter's refresh-ahead uses in `fetch: companion` mode).
    pub min_expires_at_ms: Option<u64>,
}

impl TokenRequest {
    /// Reads a `POST /auth/token` body: `{"tenantId","type","forceRefresh"}`, whose
    /// `type` must be one of `providers`.
    pub fn from_json(body: &[u8], providers: &ProviderTable) -> Result<Self, TokenError> {
        // serde would also take the fields in order from an array.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(TokenError::new(
                ErrorCode::InvalidRequest,
                "the body is not a token request: expected a JSON object",
            ));
        }
        let body: TokenRequestBody = serde_json::from_slice(body).map_err(|error| {
            TokenError::new(
                ErrorCode::InvalidRequest,
                format!("the body is not a token request: {error}"),
            )
        })?;
        let tenant_id = body
            .tenant_id
            .ok_or_else(|| TokenError::new(ErrorCode::InvalidRequest, "tenantId is required"))?;
        let provider = body
            .provider
            .ok_or_else(|| TokenError::new(ErrorCode::InvalidRequest, "type is required"))?;
        Ok(Self {
            key: TokenKey::new(providers.resolve(&provider)?, TenantId::parse(&tenant_id)?),
            force_refresh: body.force_refresh,
            min_expires_at_ms: body.min_expires_at_ms,
        })
    }

    /// Reads a legacy `GET /auth/token`: the tenant from its header, the type from
    /// `X-Credential-Type` (Genesys when absent, as the original service did), one of
    /// `providers`.
    pub fn from_headers(
        tenant: Option<&str>,
        credential_type: Option<&str>,
        providers: &ProviderTable,
    ) -> Result<Self, TokenError> {
        let tenant_id = TenantId::parse(tenant.unwrap_or_default())?;
        let provider = providers.resolve(credential_type.unwrap_or(crate::provider::GENESYS))?;
        Ok(Self {
            key: TokenKey::new(provider, tenant_id),
            force_refresh: false,
            min_expires_at_ms: None,
        })
    }
}

/// Where a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenSource {
    /// A cache (the gateway's or the cluster's).
    Cache,
    /// Fetched for this request.
    Fresh,
}
crate::deserialize_unit_enum!(TokenSource { "cache" => Cache, "fresh" => Fresh });

/// The answer of the token API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenResponse {
    /// The bearer token.
    pub access_token: SecretString,
    /// Seconds until it expires (may be <= 0 for a WhatsApp token served once).
    pub expires_in: i64,
    /// Always `Bearer`.
    pub token_type: String,
    /// `cache` or `fresh`.
    pub source: TokenSource,
    /// Expiry as ISO-8601 UTC with milliseconds.
    pub expires_at: String,
}

impl TokenResponse {
    /// A response for a token that expires at `expires_at_ms`, answered at `now_ms`.
    pub fn new(
        access_token: SecretString,
        expires_at_ms: u64,
        now_ms: u64,
        source: TokenSource,
    ) -> Self {
        let remaining_ms = i128::from(expires_at_ms) - i128::from(now_ms);
        Self {
            access_token,
            expires_in: i64::try_from(remaining_ms.div_euclid(1000)).unwrap_or(0),
            token_type: "Bearer".to_owned(),
            source,
            expires_at: format_rfc3339_ms(expires_at_ms),
        }
    }

    /// Serializes to JSON. The bytes carry the token: wipe or send them at once.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The token this response hands out, as the result of a request sent at
    /// `sent_at_ms`: expiring at `expiresAt` (or, if that cannot be read, `expiresIn`
    /// after the request was sent, however late the answer is handled), and cacheable
    /// only while it has life left (a WhatsApp token inside its safety buffer is served
    /// once, never cached).
    pub fn into_fetched(self, sent_at_ms: u64) -> FetchedToken {
        let expires_at_ms = parse_rfc3339_ms(&self.expires_at).unwrap_or_else(|| {
            let expires_in_ms = self.expires_in.max(0).unsigned_abs().saturating_mul(1000);
            sent_at_ms.saturating_add(expires_in_ms)
        });
        FetchedToken {
            access_token: self.access_token,
            expires_in_secs: self.expires_in,
            expires_at_ms,
            cacheable: self.expires_in > 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Provider;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn a_post_body_is_read_with_its_force_refresh_flag() {
        let request = TokenRequest::from_json(
            br#"{"tenantId":"acme","type":"whatsapp","forceRefresh":true}"#,
            &ProviderTable::default(),
        )
        .unwrap();
        assert_eq!(request.key.provider, Provider::whatsapp());
        assert_eq!(request.key.tenant_id.as_str(), "acme");
        assert!(request.force_refresh);
        let request = TokenRequest::from_json(
            br#"{"tenantId":"acme","type":"genesys"}"#,
            &ProviderTable::default(),
        )
        .unwrap();
        assert!(!request.force_refresh);
    }

    #[test]
    fn bad_bodies_are_invalid_requests() {
        for body in [
            &b"not json"[..],
            br#"{"type":"genesys"}"#,
            br#"{"tenantId":"acme"}"#,
            br#"{"tenantId":"acme","type":"slack"}"#,
            br#"{"tenantId":"a/b","type":"genesys"}"#,
            br#"{"tenantId":"acme","type":"genesys","forceRefresh":"yes"}"#,
            br#"["acme","genesys"]"#,
            b"",
        ] {
            let error = TokenRequest::from_json(body, &ProviderTable::default()).unwrap_err();
            assert_eq!(
                error.code,
                ErrorCode::InvalidRequest,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_legacy_get_defaults_to_genesys() {
        let request =
            TokenRequest::from_headers(Some("acme"), None, &ProviderTable::default()).unwrap();
        assert_eq!(request.key.provider, Provider::genesys());
        assert_eq!(
            TokenRequest::from_headers(Some("acme"), Some("fax"), &ProviderTable::default())
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            TokenRequest::from_headers(None, None, &ProviderTable::default())
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn a_response_becomes_the_token_it_hands_out() {
        let response = TokenResponse::new(
            SecretString::from("t"),
            1_893_456_000_000,
            1_893_455_000_000,
            TokenSource::Cache,
        );
        let token = response.into_fetched(1_893_455_000_500);
        assert_eq!(token.access_token.expose(), "t");
        assert_eq!(token.expires_at_ms, 1_893_456_000_000, "from expiresAt");
        assert!(token.cacheable);

        let mut unreadable = TokenResponse::new(SecretString::from("t"), 0, 0, TokenSource::Fresh);
        unreadable.expires_at = "soon".to_owned();
        unreadable.expires_in = 30;
        assert_eq!(
            unreadable.into_fetched(1_000).expires_at_ms,
            31_000,
            "from expiresIn"
        );

        let spent = TokenResponse::new(SecretString::from("t"), 1_000, 2_000, TokenSource::Fresh);
        assert!(
            !spent.into_fetched(2_000).cacheable,
            "no life left: served, not cached"
        );
        let ending = TokenResponse::new(SecretString::from("t"), 2_999, 2_000, TokenSource::Fresh);
        assert_eq!(ending.expires_in, 0);
        assert!(
            !ending.into_fetched(2_000).cacheable,
            "less than a second left: served, not cached"
        );
    }

    #[test]
    fn the_response_is_camel_case_with_an_iso_expiry() {
        let response = TokenResponse::new(
            SecretString::from("t"),
            1_893_456_000_000,
            1_893_455_000_000,
            TokenSource::Fresh,
        );
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&response.to_json()).unwrap(),
            serde_json::json!({"accessToken":"t","expiresIn":1000,"tokenType":"Bearer","source":"fresh","expiresAt":"2030-01-01T00:00:00.000Z"})
        );
    }
}
