//! The Tenant Service's credential documents, normalised.
//!
//! `GET /tenants/{id}/credentials/{type}` (or the provider's `tenantServicePath`)
//! answers a JSON document whose shape varies between tenants: client credentials
//! (Genesys, `oauth2` providers) come as `{clientId, clientSecret, region | tokenUrl}`
//! or wrapped as `{data: {...}}`; static tokens (WhatsApp, `static` providers) as
//! `systemUserToken`, `accessToken` or `token`, with an optional `expiresAt`. Secrets are parsed straight into
//! [`SecretString`]s so no unwiped copy is kept.

use serde::Deserialize;

use crate::error::{ErrorCode, TokenError};
use crate::provider::TokenKey;
use crate::rfc3339::parse_rfc3339_ms;
use crate::secret::SecretString;

/// A tenant's Genesys client credentials.
#[derive(Debug)]
pub struct GenesysCredentials {
    /// The OAuth client id (not secret, but still never logged).
    pub client_id: SecretString,
    /// The OAuth client secret: wiped when this value is dropped.
    pub client_secret: SecretString,
    /// The Genesys region the client lives in, e.g. `eu-west-1`.
    pub region: String,
}

/// Both accepted shapes of client credentials: the fields at the top, or inside `data`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientDocument {
    client_id: Option<SecretString>,
    client_secret: Option<SecretString>,
    region: Option<String>,
    token_url: Option<String>,
    data: Option<Box<ClientDocument>>,
}

/// A client id and secret, both present and not empty.
struct ClientPair {
    client_id: SecretString,
    client_secret: SecretString,
    region: Option<String>,
    token_url: Option<String>,
}

impl ClientDocument {
    /// Reads a Tenant Service answer; `not_found(what)` is the error for a missing part.
    fn read(body: &[u8], not_found: impl Fn(&str) -> TokenError) -> Result<ClientPair, TokenError> {
        let document: ClientDocument = serde_json::from_slice(body)
            .map_err(|_| not_found("credentials (unreadable document)"))?;
        let document = match document {
            ClientDocument {
                client_id: Some(_), ..
            } => document,
            ClientDocument {
                data: Some(inner), ..
            } => *inner,
            _ => return Err(not_found("client id")),
        };
        let client_id = document
            .client_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| not_found("client id"))?;
        let client_secret = document
            .client_secret
            .filter(|s| !s.is_empty())
            .ok_or_else(|| not_found("client secret"))?;
        Ok(ClientPair {
            client_id,
            client_secret,
            region: document.region,
            token_url: document.token_url,
        })
    }
}

impl GenesysCredentials {
    /// Normalises a Tenant Service answer. `default_region` applies when the document has none.
    pub fn parse(
        key: &TokenKey,
        body: &[u8],
        default_region: Option<&str>,
    ) -> Result<Self, TokenError> {
        let not_found = |what: &str| {
            TokenError::new(
                ErrorCode::CredentialsNotFound,
                format!("no Genesys {what} found for tenant {}", key.tenant_id),
            )
        };
        let pair = ClientDocument::read(body, not_found)?;
        let region = pair
            .region
            .or_else(|| default_region.map(str::to_owned))
            .ok_or_else(|| not_found("region"))?;
        let (client_id, client_secret) = (pair.client_id, pair.client_secret);
        Ok(Self {
            client_id,
            client_secret,
            region,
        })
    }
}

/// A tenant's client credentials for an `oauth2` provider.
#[derive(Debug)]
pub struct OAuth2Credentials {
    /// The OAuth client id (not secret, but still never logged).
    pub client_id: SecretString,
    /// The OAuth client secret: wiped when this value is dropped.
    pub client_secret: SecretString,
    /// The token endpoint the tenant's record names, if any (used only when the
    /// provider allows its host).
    pub token_url: Option<String>,
}

impl OAuth2Credentials {
    /// Normalises a Tenant Service answer for provider `provider` (as messages name it).
    pub fn parse(key: &TokenKey, provider: &str, body: &[u8]) -> Result<Self, TokenError> {
        let not_found = |what: &str| {
            TokenError::new(
                ErrorCode::CredentialsNotFound,
                format!("no {provider} {what} found for tenant {}", key.tenant_id),
            )
        };
        let pair = ClientDocument::read(body, not_found)?;
        Ok(Self {
            client_id: pair.client_id,
            client_secret: pair.client_secret,
            token_url: pair.token_url,
        })
    }
}

/// A tenant's static token (WhatsApp's system-user token, a `static` provider's) and
/// when it stops being valid.
#[derive(Debug)]
pub struct StaticCredentials {
    /// The static bearer token.
    pub token: SecretString,
    /// Expiry in milliseconds since the Unix epoch; `None` when the token does not expire.
    pub expires_at_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WhatsappDocument {
    system_user_token: Option<SecretString>,
    access_token: Option<SecretString>,
    token: Option<SecretString>,
    expires_at: Option<Expiry>,
}

/// `expiresAt` as an ISO-8601 / RFC 3339 string or a number of milliseconds since the epoch.
enum Expiry {
    Millis(i64),
    Text(String),
}

/// Reads what `#[serde(untagged)]` over `i64` then `String` would (an integer within
/// `i64`, or a string), without its buffering, which costs the wasm module some 3 KB.
impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExpiryVisitor;
        impl serde::de::Visitor<'_> for ExpiryVisitor {
            type Value = Expiry;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("milliseconds since the epoch or an RFC 3339 string")
            }
            fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<Expiry, E> {
                Ok(Expiry::Millis(ms))
            }
            fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<Expiry, E> {
                i64::try_from(ms)
                    .map(Expiry::Millis)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(ms), &self))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Expiry, E> {
                Ok(Expiry::Text(text.to_owned()))
            }
        }
        deserializer.deserialize_any(ExpiryVisitor)
    }
}

impl StaticCredentials {
    /// Normalises a Tenant Service answer for provider `provider` (as messages name it,
    /// e.g. `WhatsApp`): the token is the first present of `systemUserToken`,
    /// `accessToken`, `token`.
    pub fn parse(key: &TokenKey, provider: &str, body: &[u8]) -> Result<Self, TokenError> {
        let not_found = |what: &str| {
            TokenError::new(
                ErrorCode::CredentialsNotFound,
                format!("no {provider} {what} found for tenant {}", key.tenant_id),
            )
        };
        let document: WhatsappDocument = serde_json::from_slice(body)
            .map_err(|_| not_found("credentials (unreadable document)"))?;
        let token = [
            document.system_user_token,
            document.access_token,
            document.token,
        ]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or_else(|| not_found("system user token"))?;
        let expires_at_ms = match document.expires_at {
            None => None,
            // Meta reports a non-expiring token as expiry 0.
            Some(Expiry::Millis(ms)) if ms <= 0 => None,
            Some(Expiry::Millis(ms)) => Some(ms.unsigned_abs()),
            Some(Expiry::Text(text)) => Some(parse_rfc3339_ms(&text).ok_or_else(|| {
                TokenError::new(
                    ErrorCode::CredentialsNotFound,
                    format!(
                        "{provider} token of tenant {} has an unreadable expiresAt",
                        key.tenant_id
                    ),
                )
            })?),
        };
        Ok(Self {
            token,
            expires_at_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Provider, TenantId};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn key(provider: Provider) -> TokenKey {
        TokenKey::new(provider, TenantId::parse("acme").unwrap())
    }

    #[test]
    fn genesys_credentials_are_read_at_the_top_level() {
        let body = br#"{"clientId":"id-1","clientSecret":"s3cret","region":"eu-west-1"}"#;
        let creds = GenesysCredentials::parse(&key(Provider::genesys()), body, None).unwrap();
        assert_eq!(
            (creds.client_id.expose(), creds.client_secret.expose()),
            ("id-1", "s3cret")
        );
        assert_eq!(creds.region, "eu-west-1");
    }

    #[test]
    fn genesys_credentials_are_read_inside_data() {
        let body = br#"{"data":{"clientId":"id-2","clientSecret":"s","region":"ap-south-1"}}"#;
        let creds = GenesysCredentials::parse(&key(Provider::genesys()), body, None).unwrap();
        assert_eq!(
            (creds.client_id.expose(), creds.region.as_str()),
            ("id-2", "ap-south-1")
        );
    }

    #[test]
    fn missing_client_id_secret_or_region_is_credentials_not_found() {
        for body in [
            &br#"{"clientSecret":"s","region":"eu-west-1"}"#[..],
            br#"{"data":{"clientSecret":"s"}}"#,
            br#"{"clientId":"id","region":"eu-west-1"}"#,
            br#"{"clientId":"id","clientSecret":"s"}"#,
            br#"not json"#,
            br#"null"#,
        ] {
            let err = GenesysCredentials::parse(&key(Provider::genesys()), body, None).unwrap_err();
            assert_eq!(
                err.code,
                ErrorCode::CredentialsNotFound,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_default_region_fills_a_missing_one() {
        let body = br#"{"clientId":"id","clientSecret":"s"}"#;
        let creds =
            GenesysCredentials::parse(&key(Provider::genesys()), body, Some("us-west-2")).unwrap();
        assert_eq!(creds.region, "us-west-2");
    }

    #[test]
    fn whatsapp_token_is_taken_from_any_of_the_three_fields() {
        for (body, token) in [
            (&br#"{"systemUserToken":"a","accessToken":"b"}"#[..], "a"),
            (br#"{"accessToken":"b","token":"c"}"#, "b"),
            (br#"{"token":"c"}"#, "c"),
        ] {
            let creds =
                StaticCredentials::parse(&key(Provider::whatsapp()), "WhatsApp", body).unwrap();
            assert_eq!(creds.token.expose(), token);
            assert_eq!(creds.expires_at_ms, None);
        }
        let err =
            StaticCredentials::parse(&key(Provider::whatsapp()), "WhatsApp", b"{}").unwrap_err();
        assert_eq!(err.code, ErrorCode::CredentialsNotFound);
    }

    #[test]
    fn whatsapp_expiry_is_read_as_rfc3339_or_millis() {
        let body = br#"{"token":"t","expiresAt":"2030-01-01T00:00:00Z"}"#;
        let creds = StaticCredentials::parse(&key(Provider::whatsapp()), "WhatsApp", body).unwrap();
        assert_eq!(creds.expires_at_ms, Some(1_893_456_000_000));
        let body = br#"{"token":"t","expiresAt":1893456000000}"#;
        assert_eq!(
            StaticCredentials::parse(&key(Provider::whatsapp()), "WhatsApp", body)
                .unwrap()
                .expires_at_ms,
            Some(1_893_456_000_000)
        );
        for unreadable in [
            r#""soon""#,
            "1.5e12",
            "true",
            "[1]",
            "{}",
            "9223372036854775808",
        ] {
            let body = format!(r#"{{"token":"t","expiresAt":{unreadable}}}"#);
            let parsed =
                StaticCredentials::parse(&key(Provider::whatsapp()), "WhatsApp", body.as_bytes());
            assert!(parsed.is_err(), "{unreadable}");
        }
        for (expires_at, expected) in [
            ("null", None),
            ("0", None),
            ("-5", None),
            ("9223372036854775807", Some(9_223_372_036_854_775_807)),
            (r#""2030-01-01T00:00:00\u005a""#, Some(1_893_456_000_000)),
        ] {
            let body = format!(r#"{{"token":"t","expiresAt":{expires_at}}}"#);
            let parsed =
                StaticCredentials::parse(&key(Provider::whatsapp()), "WhatsApp", body.as_bytes());
            assert_eq!(parsed.unwrap().expires_at_ms, expected, "{expires_at}");
        }
    }

    #[test]
    fn oauth2_credentials_are_read_with_the_tenants_token_url_if_any() {
        let crm = TokenKey::new(
            Provider::parse("crm").unwrap(),
            TenantId::parse("acme").unwrap(),
        );
        let body = br#"{"data":{"clientId":"id-3","clientSecret":"s","tokenUrl":"https://idp.a.example/t"}}"#;
        let creds = OAuth2Credentials::parse(&crm, "crm", body).unwrap();
        assert_eq!(
            (creds.client_id.expose(), creds.token_url.as_deref()),
            ("id-3", Some("https://idp.a.example/t"))
        );
        let err = OAuth2Credentials::parse(&crm, "crm", br#"{"clientId":"id"}"#).unwrap_err();
        assert_eq!(err.code, ErrorCode::CredentialsNotFound);
        assert_eq!(err.message, "no crm client secret found for tenant acme");
    }

    #[test]
    fn debug_of_credentials_shows_no_secret() {
        let body = br#"{"clientId":"id-1","clientSecret":"s3cret","region":"eu-west-1"}"#;
        let creds = GenesysCredentials::parse(&key(Provider::genesys()), body, None).unwrap();
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("id-1"),
            "{shown}"
        );
    }
}
