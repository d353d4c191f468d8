//! tokengate-core: the sans-IO token logic shared by the Envoy filter and the companion.
//!
//! Nothing in this crate does I/O, reads a clock or spawns anything. Callers feed it
//! the current time and the responses they received, and it tells them what to do next.
//!
//! - [`provider`]: providers, validated tenant ids, token keys.
//! - [`error`]: error codes, their HTTP statuses and the JSON error body.
//! - [`secret`]: zeroizing, redacted secret types.
//! - [`lease`]: the companion's internal lease / commit / abort API.

pub mod error;
pub mod lease;
pub mod provider;
pub mod secret;

pub use error::{ErrorBody, ErrorCode, TokenError};
pub use provider::{Provider, TenantId, TokenKey};
pub use secret::{SecretBytes, SecretString};
