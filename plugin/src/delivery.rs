//! Handing a token to a request: the header value inject mode writes and the body
//! endpoint mode answers. Shared by the filter's hit path and the worker's resumed
//! requests, so both deliver the same bytes.

use tokengate_core::token_api::{TokenResponse, TokenSource};
use tokengate_core::{CachedToken, SecretBytes, SecretString};

/// The authorization scheme the header value starts with.
pub const BEARER: &str = "Bearer ";

/// The authorization header's value: `Bearer <token>`, built in a buffer of its final
/// size (a secret is never left behind in a grown-out allocation).
pub fn bearer(token: &CachedToken) -> SecretString {
    let token = token.access_token.expose();
    let mut value = String::with_capacity(BEARER.len() + token.len());
    value.push_str(BEARER);
    value.push_str(token);
    SecretString::new(value)
}

/// Endpoint mode's `200` body: a `TokenResponse` for `token` answered at `now_ms`.
pub fn token_response(token: &CachedToken, now_ms: u64, source: TokenSource) -> SecretBytes {
    let response = TokenResponse::new(
        token.access_token.clone(),
        token.expires_at_ms,
        now_ms,
        source,
    );
    SecretBytes::new(response.to_json())
}
