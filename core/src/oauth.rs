//! The Genesys client-credentials exchange: the request to send and how to read the answer.
//!
//! Request: `POST /oauth/token` on the region's login host, `Authorization: Basic
//! base64(clientId:clientSecret)`, form body `grant_type=client_credentials`.
//! Answers are classified the way Genesys actually behaves (FACTS §4): a bad secret is
//! `400 invalid_client` (some deployments `401`), rate limiting is `400 invalid_request`
//! with "rate limit exceeded" (or a plain `429`), and a `200` must carry a usable token.

use base64::Engine as _;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::credentials::GenesysCredentials;
use crate::secret::{SecretBytes, SecretString};

/// The form body of a client-credentials grant.
pub const CLIENT_CREDENTIALS_BODY: &[u8] = b"grant_type=client_credentials";

/// Longest token lifetime accepted; Genesys allows at most 48 hours.
pub const MAX_EXPIRES_IN_SECS: u64 = 48 * 3600;

/// The `Authorization` header value `Basic base64(clientId:clientSecret)`, built and
/// kept only in wiped buffers.
pub fn basic_authorization(credentials: &GenesysCredentials) -> SecretString {
    let mut pair = Zeroizing::new(String::with_capacity(
        credentials.client_id.expose().len() + credentials.client_secret.expose().len() + 1,
    ));
    pair.push_str(credentials.client_id.expose());
    pair.push(':');
    pair.push_str(credentials.client_secret.expose());
    let mut header = String::from("Basic ");
    base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut header);
    SecretString::new(header)
}

/// What an answer of the token endpoint means for the fetch.
#[derive(Debug, PartialEq, Eq)]
pub enum ExchangeOutcome {
    /// A usable token.
    Token {
        /// The bearer token.
        access_token: SecretString,
        /// Lifetime in seconds, clamped to [`MAX_EXPIRES_IN_SECS`].
        expires_in_secs: u64,
    },
    /// The client credentials were rejected: never retried.
    CredentialsRejected {
        /// The IdP's `error_description`, safe to show (it names no secret).
        description: String,
    },
    /// Rate limited: retry after the given delay, or the rate-limit backoff when `None`.
    RateLimited {
        /// `Retry-After`, in milliseconds (saturated), when the IdP sent one.
        retry_after_ms: Option<u64>,
    },
    /// A transient failure (5xx, unusable 200 body): retry with the normal backoff.
    Transient {
        /// What was wrong, for logs and the final error.
        reason: String,
    },
    /// A failure that retrying cannot fix (an unexpected 4xx).
    Fatal {
        /// What was wrong, for logs and the final error.
        reason: String,
    },
}

#[derive(Deserialize)]
struct TokenDocument {
    access_token: Option<SecretString>,
    expires_in: Option<serde_json::Number>,
}

#[derive(Deserialize, Default)]
struct ErrorDocument {
    #[serde(default)]
    error: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    error_description: String,
}

/// Classifies one answer of the token endpoint.
pub fn classify_response(
    status: u16,
    body: &SecretBytes,
    retry_after_secs: Option<u64>,
) -> ExchangeOutcome {
    match status {
        200 => read_token(body.expose()),
        429 => ExchangeOutcome::RateLimited {
            retry_after_ms: retry_after_secs.map(|s| s.saturating_mul(1000)),
        },
        400 | 401 | 403 => {
            let error: ErrorDocument = serde_json::from_slice(body.expose()).unwrap_or_default();
            let description = if error.error_description.is_empty() {
                error.description.clone()
            } else {
                error.error_description.clone()
            };
            let rate_limited = [&error.description, &error.error_description]
                .iter()
                .any(|text| text.to_ascii_lowercase().contains("rate limit exceeded"));
            if rate_limited {
                ExchangeOutcome::RateLimited {
                    retry_after_ms: retry_after_secs.map(|s| s.saturating_mul(1000)),
                }
            } else if status == 401
                || matches!(
                    error.error.as_str(),
                    "invalid_client" | "unauthorized_client"
                )
            {
                ExchangeOutcome::CredentialsRejected {
                    description: crate::provider::printable(&description),
                }
            } else {
                ExchangeOutcome::Fatal {
                    reason: format!(
                        "login answered {status} {}",
                        crate::provider::printable(&error.error)
                    ),
                }
            }
        }
        500..=599 => ExchangeOutcome::Transient {
            reason: format!("login answered {status}"),
        },
        _ => ExchangeOutcome::Fatal {
            reason: format!("login answered {status}"),
        },
    }
}

fn read_token(body: &[u8]) -> ExchangeOutcome {
    let transient = |reason: &str| ExchangeOutcome::Transient {
        reason: reason.to_owned(),
    };
    let Ok(document) = serde_json::from_slice::<TokenDocument>(body) else {
        return transient("login answered 200 with a body that is not a token document");
    };
    let Some(access_token) = document.access_token.filter(|t| !t.is_empty()) else {
        return transient("login answered 200 without access_token");
    };
    let expires_in = document.expires_in.and_then(|n| n.as_f64());
    match expires_in {
        Some(secs) if secs >= 1.0 && secs.is_finite() => ExchangeOutcome::Token {
            access_token,
            // Truncation is intended: fractional seconds are dropped, huge values clamped.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            expires_in_secs: (secs as u64).min(MAX_EXPIRES_IN_SECS),
        },
        Some(_) => transient("login answered 200 with an expires_in below one second"),
        None => transient("login answered 200 without a numeric expires_in"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn classify(status: u16, body: &str) -> ExchangeOutcome {
        classify_response(status, &SecretBytes::new(body.as_bytes().to_vec()), None)
    }

    #[test]
    fn basic_authorization_encodes_id_colon_secret() {
        let creds = GenesysCredentials {
            client_id: SecretString::from("id"),
            client_secret: SecretString::from("secret"),
            region: "eu-west-1".into(),
        };
        assert_eq!(basic_authorization(&creds).expose(), "Basic aWQ6c2VjcmV0");
    }

    #[test]
    fn a_genesys_token_document_is_a_token() {
        let outcome = classify(
            200,
            r#"{"access_token":"tok","token_type":"bearer","expires_in":86399}"#,
        );
        assert_eq!(
            outcome,
            ExchangeOutcome::Token {
                access_token: SecretString::from("tok"),
                expires_in_secs: 86399
            }
        );
    }

    #[test]
    fn unusable_200_bodies_are_transient_never_tokens() {
        for body in [
            "",
            "<html>",
            "{}",
            r#"{"access_token":""}"#,
            r#"{"access_token":"t"}"#,
            r#"{"access_token":"t","expires_in":0}"#,
            r#"{"access_token":"t","expires_in":-5}"#,
            r#"{"access_token":"t","expires_in":"3600"}"#,
        ] {
            assert!(
                matches!(classify(200, body), ExchangeOutcome::Transient { .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn huge_lifetimes_are_clamped_to_48_hours() {
        let outcome = classify(200, r#"{"access_token":"t","expires_in":1e12}"#);
        assert_eq!(
            outcome,
            ExchangeOutcome::Token {
                access_token: SecretString::from("t"),
                expires_in_secs: MAX_EXPIRES_IN_SECS
            }
        );
    }

    #[test]
    fn invalid_client_and_401_are_credential_rejections() {
        let body = r#"{"error":"invalid_client","description":"client not found","error_description":"client not found"}"#;
        assert_eq!(
            classify(400, body),
            ExchangeOutcome::CredentialsRejected {
                description: "client not found".into()
            }
        );
        assert!(matches!(
            classify(400, r#"{"error":"unauthorized_client"}"#),
            ExchangeOutcome::CredentialsRejected { .. }
        ));
        assert!(matches!(
            classify(401, ""),
            ExchangeOutcome::CredentialsRejected { .. }
        ));
    }

    #[test]
    fn genesys_rate_limit_400_and_429_are_rate_limits() {
        let body = r#"{"error":"invalid_request","description":"rate limit exceeded","error_description":"rate limit exceeded"}"#;
        assert_eq!(
            classify(400, body),
            ExchangeOutcome::RateLimited {
                retry_after_ms: None
            }
        );
        let with_header = classify_response(429, &SecretBytes::new(Vec::new()), Some(3));
        assert_eq!(
            with_header,
            ExchangeOutcome::RateLimited {
                retry_after_ms: Some(3000)
            }
        );
    }

    #[test]
    fn server_errors_are_transient_and_other_4xx_fatal() {
        assert!(matches!(
            classify(503, ""),
            ExchangeOutcome::Transient { .. }
        ));
        assert!(matches!(
            classify(400, r#"{"error":"unsupported_grant_type"}"#),
            ExchangeOutcome::Fatal { .. }
        ));
        assert!(matches!(classify(404, ""), ExchangeOutcome::Fatal { .. }));
    }
}
