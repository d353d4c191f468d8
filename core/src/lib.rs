//! tokengate-core: the sans-IO token logic shared by the Envoy filter and the companion.
//!
//! Nothing in this crate does I/O, reads a clock or spawns anything. Callers feed it
//! the current time and the responses they received, and it tells them what to do next
//! (see [`flow`] for the contract).
//!
//! - [`provider`]: provider names, validated tenant ids, token keys.
//! - [`providers`]: the configured providers and their kinds (`genesys`, `whatsapp`,
//!   `oauth2`, `static`).
//! - [`regions`]: the Genesys region table and operator overrides.
//! - [`credentials`]: the Tenant Service's credential documents, normalised.
//! - [`oauth`]: the client-credentials request and how to read its answers.
//! - [`flow`]: one token fetch as a state machine, with the retry and backoff policy.
//! - [`cache`]: the cached form of a token, expiry inside.
//! - [`lease`]: the companion's internal lease / commit / abort API.
//! - [`limit`]: the fetch limiter and the purge / forced-refresh throttle.
//! - [`token_api`]: the original service's `/auth/token` request and response.
//! - [`trace`]: which W3C `traceparent` values are taken and passed on.
//! - [`error`]: error codes, their HTTP statuses and the JSON error body.
//! - [`secret`]: zeroizing, redacted secret types.
//! - [`unit_enum`]: one shared deserialiser for enums of unit variants.

pub mod cache;
pub mod credentials;
pub mod error;
pub mod flow;
pub mod lease;
pub mod limit;
pub mod oauth;
pub mod provider;
pub mod providers;
pub mod regions;
pub mod rfc3339;
pub mod secret;
pub mod token_api;
pub mod trace;
pub mod unit_enum;

pub use cache::{CachedToken, GatewayEntry};
pub use error::{ErrorBody, ErrorCode, TokenError};
pub use flow::{
    CalloutResult, Destination, FetchConfig, FetchFlow, FetchedToken, OutboundRequest, Step,
};
pub use provider::{Provider, TenantId, TokenKey};
pub use regions::RegionTable;
pub use secret::{SecretBytes, SecretString};
pub use trace::Traceparent;
