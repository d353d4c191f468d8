//! The client-credentials exchange (RFC 6749 section 4.4): the request to send and how
//! to read the answer.
//!
//! Genesys: `POST /oauth/token` on the region's login host, `Authorization: Basic
//! base64(clientId:clientSecret)`, form body `grant_type=client_credentials`.
//! An `oauth2` provider: `POST` to its token endpoint, the id and secret form-encoded
//! before Base64 (`client_secret_basic`, RFC 6749 section 2.3.1) or in the body
//! (`client_secret_post`), with its `scope`, `audience`, `resource` and extra parameters.
//!
//! Answers are classified per RFC 6749 section 5.2 and the way Genesys actually behaves
//! (FACTS §4): `invalid_client` / `unauthorized_client` (or a `401`)
//! reject the credentials, rate limiting is a `429` or Genesys' `400 invalid_request`
//! with "rate limit exceeded", and a `200` must carry a usable Bearer token.

use serde::Deserialize;
use zeroize::Zeroizing;

use crate::providers::{ClientAuth, OAuth2Spec};
use crate::secret::{SecretBytes, SecretString};

/// The form body of a client-credentials grant.
pub const CLIENT_CREDENTIALS_BODY: &[u8] = b"grant_type=client_credentials";

/// Longest token lifetime accepted; Genesys allows at most 48 hours.
pub const MAX_EXPIRES_IN_SECS: u64 = 48 * 3600;

/// The `Authorization` header value `Basic base64(clientId:clientSecret)` as Genesys
/// takes it, built and kept only in wiped buffers.
pub fn basic_authorization(client_id: &SecretString, client_secret: &SecretString) -> SecretString {
    basic_of(client_id.expose(), client_secret.expose())
}

/// RFC 6749 section 2.3.1's `client_secret_basic`: id and secret each form-encoded,
/// then `Basic base64(id:secret)`.
pub fn form_encoded_basic_authorization(
    client_id: &SecretString,
    client_secret: &SecretString,
) -> SecretString {
    let mut id = Zeroizing::new(String::new());
    let mut secret = Zeroizing::new(String::new());
    push_form_encoded(&mut id, client_id.expose());
    push_form_encoded(&mut secret, client_secret.expose());
    basic_of(&id, &secret)
}

/// `Basic base64(id:secret)` (standard alphabet, padded), encoded straight into a
/// buffer of its final size: no copy of the pair, no reallocation leaving one behind.
/// Hand-written because the `base64` crate costs the wasm module some 2 KB for this.
fn basic_of(id: &str, secret: &str) -> SecretString {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let pair_len = id.len() + 1 + secret.len();
    let mut header = String::with_capacity("Basic ".len() + pair_len.div_ceil(3) * 4);
    header.push_str("Basic ");
    let mut pair = id.bytes().chain([b':']).chain(secret.bytes());
    while let Some(first) = pair.next() {
        let (second, third) = (pair.next(), pair.next());
        let group = u32::from(first) << 16
            | u32::from(second.unwrap_or(0)) << 8
            | u32::from(third.unwrap_or(0));
        let digit = |shift: u32| char::from(ALPHABET[(group >> shift & 63) as usize]);
        header.push(digit(18));
        header.push(digit(12));
        header.push(second.map_or('=', |_| digit(6)));
        header.push(third.map_or('=', |_| digit(0)));
    }
    SecretString::new(header)
}

/// Appends `value` form-encoded (`application/x-www-form-urlencoded`) to `out`.
fn push_form_encoded(out: &mut String, value: &str) {
    for piece in form_urlencoded::byte_serialize(value.as_bytes()) {
        out.push_str(piece);
    }
}

/// The form body of an `oauth2` provider's client-credentials request: `grant_type`,
/// the id and secret with `client_secret_post`, then `scope`, `audience`, `resource`
/// and the extra parameters. Built in a wiped buffer.
pub fn client_credentials_form(
    spec: &OAuth2Spec,
    client_id: &SecretString,
    client_secret: &SecretString,
) -> SecretBytes {
    let mut body = Zeroizing::new(String::from("grant_type=client_credentials"));
    let mut field = |name: &str, value: &str| {
        body.push('&');
        push_form_encoded(&mut body, name);
        body.push('=');
        push_form_encoded(&mut body, value);
    };
    if spec.client_auth == ClientAuth::ClientSecretPost {
        field("client_id", client_id.expose());
        field("client_secret", client_secret.expose());
    }
    for (name, value) in [
        ("scope", &spec.scope),
        ("audience", &spec.audience),
        ("resource", &spec.resource),
    ] {
        if let Some(value) = value {
            field(name, value);
        }
    }
    for (name, value) in &spec.extra_params {
        field(name, value);
    }
    SecretBytes::new(body.as_bytes().to_vec())
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
    token_type: Option<String>,
    /// Any JSON number, integers included (as `serde_json::Number::as_f64` reads them).
    expires_in: Option<f64>,
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

/// Classifies one answer of the token endpoint. `default_expires_in_secs` is the
/// lifetime of a token answered without `expires_in` (RFC 6749 makes it optional);
/// without one, such an answer is unusable.
pub fn classify_response(
    status: u16,
    body: &SecretBytes,
    retry_after_secs: Option<u64>,
    default_expires_in_secs: Option<u64>,
) -> ExchangeOutcome {
    match status {
        200 => read_token(body.expose(), default_expires_in_secs),
        429 => ExchangeOutcome::RateLimited {
            retry_after_ms: retry_after_secs.map(|s| s.saturating_mul(1000)),
        },
        400 | 401 | 403 => {
            let error: ErrorDocument = serde_json::from_slice(body.expose()).unwrap_or_default();
            // The most specific reason the IdP gave: its description, else its error
            // code, else the status alone (a bare `401`).
            let description = [&error.error_description, &error.description, &error.error]
                .into_iter()
                .find(|text| !text.trim().is_empty())
                .map_or_else(|| format!("login answered {status}"), Clone::clone);
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

fn read_token(body: &[u8], default_expires_in_secs: Option<u64>) -> ExchangeOutcome {
    let transient = |reason: &str| ExchangeOutcome::Transient {
        reason: reason.to_owned(),
    };
    let Ok(document) = serde_json::from_slice::<TokenDocument>(body) else {
        return transient("login answered 200 with a body that is not a token document");
    };
    let Some(access_token) = document.access_token.filter(|t| !t.is_empty()) else {
        return transient("login answered 200 without access_token");
    };
    // A token of another type (`mac`, `DPoP`, ...) cannot be sent as `Bearer`.
    if let Some(token_type) = document
        .token_type
        .filter(|token_type| !token_type.eq_ignore_ascii_case("bearer"))
    {
        return ExchangeOutcome::Fatal {
            reason: format!(
                "login answered token_type '{}', not Bearer",
                crate::provider::printable(&token_type)
            ),
        };
    }
    if document.expires_in.is_none() {
        if let Some(secs) = default_expires_in_secs {
            return ExchangeOutcome::Token {
                access_token,
                expires_in_secs: secs.min(MAX_EXPIRES_IN_SECS),
            };
        }
    }
    match document.expires_in {
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
    use base64::Engine as _;
    use std::collections::BTreeMap;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn classify(status: u16, body: &str) -> ExchangeOutcome {
        classify_response(
            status,
            &SecretBytes::new(body.as_bytes().to_vec()),
            None,
            None,
        )
    }

    fn secret(text: &str) -> SecretString {
        SecretString::from(text)
    }

    #[test]
    fn basic_authorization_encodes_id_colon_secret() {
        let header = basic_authorization(&secret("id"), &secret("secret"));
        assert_eq!(header.expose(), "Basic aWQ6c2VjcmV0");
    }

    #[test]
    fn client_secret_basic_form_encodes_id_and_secret_before_base64() {
        // RFC 6749 section 2.3.1: "a b:c" -> "a+b%3Ac", "s&=/" -> "s%26%3D%2F".
        let header = form_encoded_basic_authorization(&secret("a b:c"), &secret("s&=/"));
        let encoded = header.expose().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, b"a+b%3Ac:s%26%3D%2F");
    }

    #[test]
    fn basic_encodes_as_the_base64_crate_does() {
        let text = "aZ09+/ é€𝄞:%\u{0}\u{7f}~";
        for id_len in 0..=text.len() {
            for secret_len in [0, 1, 2, 3, 7, text.len()] {
                let (Some(id), Some(secret)) = (text.get(..id_len), text.get(secret_len..)) else {
                    continue;
                };
                let expected = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
                );
                let header = basic_of(id, secret);
                assert_eq!(header.expose(), expected, "{id:?} {secret:?}");
            }
        }
    }

    #[test]
    fn the_form_carries_post_credentials_scope_audience_resource_and_extras_encoded() {
        let spec = OAuth2Spec {
            token_url: None,
            allowed_token_hosts: vec!["idp.example".into()],
            client_auth: ClientAuth::ClientSecretPost,
            scope: Some("crm.read crm.write".into()),
            audience: Some("https://api.example/".into()),
            resource: None,
            extra_params: [("tenant".to_owned(), "eu&1".to_owned())].into(),
            default_expires_in_secs: None,
            timeout_ms: None,
            retries: None,
        };
        let body = client_credentials_form(&spec, &secret("id 1"), &secret("p+w"));
        assert_eq!(
            std::str::from_utf8(body.expose()).unwrap(),
            "grant_type=client_credentials&client_id=id+1&client_secret=p%2Bw\
             &scope=crm.read+crm.write&audience=https%3A%2F%2Fapi.example%2F&tenant=eu%261"
        );
        let basic = OAuth2Spec {
            client_auth: ClientAuth::ClientSecretBasic,
            scope: None,
            audience: None,
            extra_params: BTreeMap::new(),
            ..spec
        };
        let body = client_credentials_form(&basic, &secret("id"), &secret("pw"));
        assert_eq!(body.expose(), b"grant_type=client_credentials");
    }

    #[test]
    fn token_type_is_compared_without_case_and_must_be_bearer() {
        for token_type in ["bearer", "Bearer", "BEARER"] {
            let body =
                format!(r#"{{"access_token":"t","token_type":"{token_type}","expires_in":60}}"#);
            assert!(
                matches!(classify(200, &body), ExchangeOutcome::Token { .. }),
                "{token_type}"
            );
        }
        let mac = classify(
            200,
            r#"{"access_token":"t","token_type":"mac","expires_in":60}"#,
        );
        assert!(matches!(mac, ExchangeOutcome::Fatal { .. }), "{mac:?}");
    }

    #[test]
    fn a_missing_expires_in_takes_the_providers_default_lifetime_when_it_has_one() {
        let body = SecretBytes::new(br#"{"access_token":"t","token_type":"Bearer"}"#.to_vec());
        assert_eq!(
            classify_response(200, &body, None, Some(600)),
            ExchangeOutcome::Token {
                access_token: SecretString::from("t"),
                expires_in_secs: 600
            }
        );
        assert!(matches!(
            classify_response(200, &body, None, None),
            ExchangeOutcome::Transient { .. }
        ));
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
            r#"{"access_token":"t","expires_in":0.5}"#,
            r#"{"access_token":"t","expires_in":1e400}"#,
            r#"{"access_token":"t","expires_in":true}"#,
            r#"{"access_token":"t","expires_in":null}"#,
        ] {
            assert!(
                matches!(classify(200, body), ExchangeOutcome::Transient { .. }),
                "{body}"
            );
        }
    }

    #[test]
    fn lifetimes_are_truncated_to_whole_seconds_and_clamped_to_48_hours() {
        for (expires_in, secs) in [
            ("3599.9", 3599),
            ("1.0", 1),
            ("3.6e3", 3600),
            ("1e12", MAX_EXPIRES_IN_SECS),
            ("18446744073709551616", MAX_EXPIRES_IN_SECS),
        ] {
            let body = format!(r#"{{"access_token":"t","expires_in":{expires_in}}}"#);
            assert_eq!(
                classify(200, &body),
                ExchangeOutcome::Token {
                    access_token: SecretString::from("t"),
                    expires_in_secs: secs
                },
                "{expires_in}"
            );
        }
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
    fn a_rejection_without_description_names_the_error_code_or_the_status() {
        assert_eq!(
            classify(400, r#"{"error":"invalid_client"}"#),
            ExchangeOutcome::CredentialsRejected {
                description: "invalid_client".into()
            }
        );
        assert_eq!(
            classify(401, r#"{"error":"invalid_client","error_description":" "}"#),
            ExchangeOutcome::CredentialsRejected {
                description: "invalid_client".into()
            }
        );
        for body in ["", "<html>denied</html>", "{}"] {
            assert_eq!(
                classify(401, body),
                ExchangeOutcome::CredentialsRejected {
                    description: "login answered 401".into()
                },
                "{body}"
            );
        }
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
        let with_header = classify_response(429, &SecretBytes::new(Vec::new()), Some(3), None);
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
        for error in [
            "unsupported_grant_type",
            "invalid_scope",
            "invalid_request",
            "invalid_grant",
        ] {
            let body = format!(r#"{{"error":"{error}"}}"#);
            assert!(matches!(
                classify(400, &body),
                ExchangeOutcome::Fatal { .. }
            ));
        }
        assert!(matches!(classify(404, ""), ExchangeOutcome::Fatal { .. }));
    }
}
