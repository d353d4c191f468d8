//! The error codes tokengate answers with, their HTTP statuses, and the one JSON body
//! shape (`code`, `message`, `tenantId`, `correlationId`) used by the filter and the
//! companion alike.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A stable, machine-readable error code (the seed service's `ErrorCode`s plus ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The request was malformed: bad tenant id, unknown provider, bad JSON body.
    InvalidRequest,
    /// The Tenant Service has no usable credentials for this tenant and provider.
    CredentialsNotFound,
    /// The Tenant Service could not be reached or kept failing.
    TenantServiceUnavailable,
    /// The tenant's Genesys region is not one tokengate knows.
    UnknownRegion,
    /// The identity provider rejected the tenant's client credentials.
    OauthInvalidGrant,
    /// The identity provider kept failing, timing out or rate limiting.
    OauthExchangeFailed,
    /// Another instance holds the fetch lock and did not finish within the wait budget.
    LockAcquisitionFailed,
    /// Redis is unavailable and the degraded-mode limiter refused the fetch.
    CacheUnavailable,
    /// The companion could not be reached or answered something unexpected.
    CompanionUnavailable,
    /// The caller is not allowed to use the companion's internal API.
    Unauthorized,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// An unexpected failure inside tokengate.
    InternalError,
}
crate::deserialize_unit_enum!(ErrorCode {
    "INVALID_REQUEST" => InvalidRequest,
    "CREDENTIALS_NOT_FOUND" => CredentialsNotFound,
    "TENANT_SERVICE_UNAVAILABLE" => TenantServiceUnavailable,
    "UNKNOWN_REGION" => UnknownRegion,
    "OAUTH_INVALID_GRANT" => OauthInvalidGrant,
    "OAUTH_EXCHANGE_FAILED" => OauthExchangeFailed,
    "LOCK_ACQUISITION_FAILED" => LockAcquisitionFailed,
    "CACHE_UNAVAILABLE" => CacheUnavailable,
    "COMPANION_UNAVAILABLE" => CompanionUnavailable,
    "UNAUTHORIZED" => Unauthorized,
    "NOT_FOUND" => NotFound,
    "METHOD_NOT_ALLOWED" => MethodNotAllowed,
    "INTERNAL_ERROR" => InternalError,
});

impl ErrorCode {
    /// Every code, e.g. to define one stat per failure cause.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::InvalidRequest,
        ErrorCode::CredentialsNotFound,
        ErrorCode::TenantServiceUnavailable,
        ErrorCode::UnknownRegion,
        ErrorCode::OauthInvalidGrant,
        ErrorCode::OauthExchangeFailed,
        ErrorCode::LockAcquisitionFailed,
        ErrorCode::CacheUnavailable,
        ErrorCode::CompanionUnavailable,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::InternalError,
    ];

    /// Whether a fetch that failed with this code is answered from memory for a while
    /// (negative caching): the IdP rejected the tenant's credentials, or the Tenant
    /// Service has none. Asking again at once would get the same answer and cost the
    /// IdP a failed login (which IdPs answer by locking the client). Failures that may
    /// heal on the next call (5xx, timeouts, rate limits, the cache or companion
    /// unavailable) never are.
    pub fn is_negatively_cached(self) -> bool {
        matches!(
            self,
            ErrorCode::OauthInvalidGrant | ErrorCode::CredentialsNotFound
        )
    }

    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::CredentialsNotFound | ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::UnknownRegion
            | ErrorCode::OauthInvalidGrant
            | ErrorCode::OauthExchangeFailed => 502,
            ErrorCode::TenantServiceUnavailable
            | ErrorCode::LockAcquisitionFailed
            | ErrorCode::CacheUnavailable
            | ErrorCode::CompanionUnavailable => 503,
            ErrorCode::InternalError => 500,
        }
    }

    /// The code as it appears in JSON (`CREDENTIALS_NOT_FOUND`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::CredentialsNotFound => "CREDENTIALS_NOT_FOUND",
            ErrorCode::TenantServiceUnavailable => "TENANT_SERVICE_UNAVAILABLE",
            ErrorCode::UnknownRegion => "UNKNOWN_REGION",
            ErrorCode::OauthInvalidGrant => "OAUTH_INVALID_GRANT",
            ErrorCode::OauthExchangeFailed => "OAUTH_EXCHANGE_FAILED",
            ErrorCode::LockAcquisitionFailed => "LOCK_ACQUISITION_FAILED",
            ErrorCode::CacheUnavailable => "CACHE_UNAVAILABLE",
            ErrorCode::CompanionUnavailable => "COMPANION_UNAVAILABLE",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure to produce a token: a code and a message safe to show a client.
///
/// Messages never contain secrets or tokens; they may name the tenant and provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TokenError {
    /// What went wrong, stable for machines.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl TokenError {
    /// Builds an error from a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of this error's code.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The JSON body a client receives for this error.
    pub fn to_body(&self, tenant_id: Option<&str>, correlation_id: Option<&str>) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
            tenant_id: tenant_id.map(str::to_owned),
            correlation_id: correlation_id.map(str::to_owned),
        }
    }
}

/// The JSON error body: `{"code","message","tenantId","correlationId"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// The stable error code.
    pub code: ErrorCode,
    /// A message for people.
    pub message: String,
    /// The tenant the request was for, when known and valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The request's correlation id (`x-request-id`), when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl ErrorBody {
    /// Serializes the body to JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings cannot fail; fall back to a fixed body anyway.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"code":"INTERNAL_ERROR","message":"error body could not be encoded"}"#.to_vec()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn error_body_uses_camel_case_and_screaming_codes() {
        let body = TokenError::new(ErrorCode::CredentialsNotFound, "none")
            .to_body(Some("acme"), Some("req-1"));
        let json: serde_json::Value = serde_json::from_slice(&body.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code":"CREDENTIALS_NOT_FOUND","message":"none","tenantId":"acme","correlationId":"req-1"})
        );
    }

    #[test]
    fn as_str_matches_the_serialized_code_and_reads_back() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
            let json = format!("\"{}\"", code.as_str());
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }
}
