//! The companion's internal API, shared by the filter (client) and the companion (server).
//!
//! All bodies are JSON in camelCase. The flow for one token key:
//!
//! 1. `POST /v1/lease` ([`LeaseRequest`]) answers a [`LeaseResponse`]:
//!    `hit` (the cluster cache has a token), or `fetch` (the caller now holds the
//!    cluster-wide lock and must fetch). A leaser that finds the lock held is not
//!    answered until the holder commits (then `hit`), or the lock is freed (then
//!    `fetch`), or the wait budget runs out (`503 LOCK_ACQUISITION_FAILED`).
//! 2. The lock holder ends its lease with exactly one of
//!    `POST /v1/commit` ([`CommitRequest`]: store the token, release the lock, wake waiters) or
//!    `POST /v1/abort` ([`AbortRequest`]: release the lock so a waiter takes over; a
//!    fetch that failed with rejected or missing credentials says so, and the companion
//!    answers that error to every lease of the key for a while: negative caching).
//!
//! 3. `POST /v1/invalidate` ([`InvalidateRequest`]) drops a token from the cluster cache
//!    (an upstream rejected it, or a caller forces a refresh).
//!
//! Errors come back with the status of their [`crate::ErrorCode`] and an [`crate::ErrorBody`].

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::provider::{Provider, TenantId};
use crate::secret::SecretString;

/// Path of the lease call.
pub const LEASE_PATH: &str = "/v1/lease";
/// Path of the commit call.
pub const COMMIT_PATH: &str = "/v1/commit";
/// Path of the abort call.
pub const ABORT_PATH: &str = "/v1/abort";
/// Path of the invalidate call.
pub const INVALIDATE_PATH: &str = "/v1/invalidate";

/// Asks for a token, or for the right to fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    /// The token's provider.
    pub provider: Provider,
    /// The tenant the token is for.
    pub tenant_id: TenantId,
    /// Skip the cluster cache: the caller wants a newly fetched token.
    #[serde(default)]
    pub force_refresh: bool,
    /// Only a token that expires after this answers the lease (refresh-ahead and purges
    /// ask for a token newer than the one they hold); an older cached one is treated
    /// as absent, without fetching again when another lease already brought a newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_expires_at_ms: Option<u64>,
}

/// The companion's answer to a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum LeaseResponse {
    /// A valid token is cached cluster-wide: use it.
    #[serde(rename_all = "camelCase")]
    Hit {
        /// The bearer token.
        access_token: SecretString,
        /// When the token expires, in milliseconds since the Unix epoch.
        expires_at_ms: u64,
    },
    /// The caller holds the lock: fetch the token, then commit or abort.
    #[serde(rename_all = "camelCase")]
    Fetch {
        /// Names this lease in the commit or abort that ends it.
        lease_id: LeaseId,
        /// The lock expires this many milliseconds after it was granted.
        lease_ttl_ms: u64,
    },
}

/// Read through a flat struct rather than serde's internally tagged enums, which buffer
/// the whole object first: the same answers, in a fraction of the filter's code size.
impl<'de> Deserialize<'de> for LeaseResponse {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let answer = LeaseAnswer::deserialize(deserializer)?;
        let missing = |field: &'static str| D::Error::missing_field(field);
        Ok(match answer.outcome {
            LeaseOutcomeTag::Hit => LeaseResponse::Hit {
                access_token: answer.access_token.ok_or_else(|| missing("accessToken"))?,
                expires_at_ms: answer.expires_at_ms.ok_or_else(|| missing("expiresAtMs"))?,
            },
            LeaseOutcomeTag::Fetch => LeaseResponse::Fetch {
                lease_id: answer.lease_id.ok_or_else(|| missing("leaseId"))?,
                lease_ttl_ms: answer.lease_ttl_ms.ok_or_else(|| missing("leaseTtlMs"))?,
            },
        })
    }
}

/// [`LeaseResponse`] as it travels: the outcome and the fields of either variant.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseAnswer {
    outcome: LeaseOutcomeTag,
    access_token: Option<SecretString>,
    expires_at_ms: Option<u64>,
    lease_id: Option<LeaseId>,
    lease_ttl_ms: Option<u64>,
}

/// The `outcome` of a [`LeaseAnswer`].
enum LeaseOutcomeTag {
    Hit,
    Fetch,
}
crate::deserialize_unit_enum!(LeaseOutcomeTag { "hit" => Hit, "fetch" => Fetch });

/// Stores a fetched token and releases the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitRequest {
    /// The token's provider.
    pub provider: Provider,
    /// The tenant the token is for.
    pub tenant_id: TenantId,
    /// The lease being ended.
    pub lease_id: LeaseId,
    /// The bearer token.
    pub access_token: SecretString,
    /// When the token expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Releases the lock without storing anything (the fetch failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortRequest {
    /// The token's provider.
    pub provider: Provider,
    /// The tenant the token is for.
    pub tenant_id: TenantId,
    /// The lease being ended.
    pub lease_id: LeaseId,
    /// Why the fetch failed, when asking again cannot fix it
    /// ([`crate::ErrorCode::is_negatively_cached`]): the companion then answers this
    /// error to the key's leases for its `--negative-cache-ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<FetchFailure>,
}

/// The error a fetch ended with, as an abort reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchFailure {
    /// The error code.
    pub code: crate::ErrorCode,
    /// The message the clients were answered (never a secret).
    pub message: String,
}

impl FetchFailure {
    /// The report of `error` if it is one to cache, else `None`.
    pub fn of(error: &crate::TokenError) -> Option<Self> {
        error.code.is_negatively_cached().then(|| Self {
            code: error.code,
            message: error.message.clone(),
        })
    }
}

/// Drops a token from the cluster cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvalidateRequest {
    /// The token's provider.
    pub provider: Provider,
    /// The tenant the token is for.
    pub tenant_id: TenantId,
    /// Drop the cached token only if it is this one, so that purging a rejected token
    /// never drops the fresh token that already replaced it. `None` drops whatever is cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<SecretString>,
}

/// The unique value a lock holder proves itself with.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub String);

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn only_failures_worth_caching_are_reported_and_a_lease_id_shows_in_debug() {
        let rejected = crate::TokenError::new(crate::ErrorCode::OauthInvalidGrant, "rejected");
        let reported = FetchFailure::of(&rejected).unwrap();
        assert_eq!(reported.code, crate::ErrorCode::OauthInvalidGrant);
        assert_eq!(reported.message, "rejected");
        let flaky = crate::TokenError::new(crate::ErrorCode::OauthExchangeFailed, "502");
        assert_eq!(FetchFailure::of(&flaky), None);
        assert_eq!(format!("{:?}", LeaseId("l1".into())), "LeaseId(l1)");
    }

    #[test]
    fn lease_responses_are_tagged_by_outcome() {
        let hit: LeaseResponse =
            serde_json::from_str(r#"{"outcome":"hit","accessToken":"t","expiresAtMs":5}"#).unwrap();
        assert_eq!(
            hit,
            LeaseResponse::Hit {
                access_token: SecretString::from("t"),
                expires_at_ms: 5
            }
        );
        let fetch = LeaseResponse::Fetch {
            lease_id: LeaseId("l1".into()),
            lease_ttl_ms: 9,
        };
        assert_eq!(
            serde_json::to_value(&fetch).unwrap(),
            serde_json::json!({"outcome":"fetch","leaseId":"l1","leaseTtlMs":9})
        );
    }

    #[test]
    fn lease_responses_missing_their_variants_fields_do_not_parse() {
        for body in [
            r#"{"outcome":"hit","expiresAtMs":5}"#,
            r#"{"outcome":"fetch","leaseTtlMs":9}"#,
            r#"{"outcome":"wait","leaseId":"l1","leaseTtlMs":9}"#,
            r#"{"leaseId":"l1","leaseTtlMs":9}"#,
        ] {
            assert!(
                serde_json::from_str::<LeaseResponse>(body).is_err(),
                "{body}"
            );
        }
        let fetch: LeaseResponse =
            serde_json::from_str(r#"{"leaseTtlMs":9,"outcome":"fetch","leaseId":"l1","x":1}"#)
                .unwrap();
        assert_eq!(
            fetch,
            LeaseResponse::Fetch {
                lease_id: LeaseId("l1".into()),
                lease_ttl_ms: 9
            }
        );
    }

    #[test]
    fn a_lease_for_an_invalid_tenant_does_not_parse() {
        let bad =
            serde_json::from_str::<LeaseRequest>(r#"{"provider":"genesys","tenantId":"a:b"}"#);
        assert!(bad.is_err());
    }
}
