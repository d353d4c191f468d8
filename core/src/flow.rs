//! The fetch of one token as a sans-IO state machine.
//!
//! A [`FetchFlow`] knows the whole procedure: ask the Tenant Service for the tenant's
//! credentials (at the provider's `tenantServicePath`), then exchange them for a token
//! (Genesys: at the region's login host; `oauth2`: at the provider's token endpoint), or
//! read the static token (WhatsApp, `static`); retry and back off as the original
//! service specified. It
//! never does I/O and never reads a clock. A driver (the Envoy filter, the companion,
//! a test) runs it:
//!
//! ```text
//! let mut flow = FetchFlow::new(key, &config);
//! loop {
//!     match flow.poll(now) {
//!         Step::Send(request)        => { dispatch it now; later flow.handle_response(now, result) }
//!         Step::WaitUntil { at_ms, .. } => { arm a timer; poll again at at_ms }
//!         Step::AwaitResponse        => { a response is still outstanding: wait for it }
//!         Step::Done(result)         => break result,
//!     }
//! }
//! ```
//!
//! A token's life starts when its request was sent, not when its answer was handled:
//! the flow takes the `now` of the [`FetchFlow::poll`] that returned a [`Step::Send`] as
//! the moment the request left, so a driver must dispatch it at once. An answer handled
//! late (a worker busy, or with no traffic to run on) then yields a token that expires
//! when the issuer says it does, `sent + expires_in`, never later. A static token's
//! `expiresAt`, the issuer's own time, is used as it is.
//!
//! Retry policy (seed 001, corrected by FACTS §4):
//! - Tenant Service: up to `tenant_service_retries` retries on 5xx, 429 or no response,
//!   backoff 500 ms x 2^n capped at 4 s; 404 -> `CREDENTIALS_NOT_FOUND`, 400 ->
//!   `INVALID_REQUEST`, never retried; retries exhausted -> `TENANT_SERVICE_UNAVAILABLE` (503).
//! - OAuth: up to `oauth_retries` retries on no response, 5xx or an unusable 200, same
//!   backoff; rate limiting (429, or Genesys' `400 invalid_request` "rate limit exceeded")
//!   backs off 1 s x 2^n capped at 8 s, or `Retry-After`; credentials rejected ->
//!   `OAUTH_INVALID_GRANT` after exactly one call; retries exhausted -> `OAUTH_EXCHANGE_FAILED`.

use crate::credentials::{GenesysCredentials, OAuth2Credentials, StaticCredentials};
use crate::error::{ErrorCode, TokenError};
use crate::oauth::{self, ExchangeOutcome};
use crate::provider::{Provider, TokenKey};
use crate::providers::{
    ClientAuth, EndpointUrl, OAuth2Spec, ProviderKind, ProviderSpec, ProviderTable, StaticSpec,
};
use crate::regions::{OAUTH_TOKEN_PATH, RegionTable};
use crate::secret::{SecretBytes, SecretString};

/// How a fetch is done: timeouts, retries, regions, WhatsApp lifetimes, providers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Sent to the Tenant Service as `X-Service-Name`.
    pub service_name: String,
    /// Per-attempt timeout of a Tenant Service call.
    pub tenant_service_timeout_ms: u64,
    /// Retries after the first Tenant Service attempt.
    pub tenant_service_retries: u32,
    /// Per-attempt timeout of an OAuth call.
    pub oauth_timeout_ms: u64,
    /// Retries after the first OAuth attempt.
    pub oauth_retries: u32,
    /// Genesys regions and the operator's login-host overrides.
    pub regions: RegionTable,
    /// Region used when the credentials name none.
    pub default_region: Option<String>,
    /// A WhatsApp token is treated as expired this long before its `expiresAt`.
    pub whatsapp_safety_buffer_secs: u64,
    /// Lifetime given to a WhatsApp token that has no `expiresAt`.
    pub whatsapp_default_ttl_secs: u64,
    /// The whole fetch (every attempt, timeout and backoff) ends within this long; no
    /// retry starts that could not finish in time. A lock guarding a fetch must outlive it.
    pub deadline_ms: u64,
    /// The providers by name, and their kinds.
    pub providers: ProviderTable,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            service_name: "tokengate".to_owned(),
            tenant_service_timeout_ms: 5_000,
            tenant_service_retries: 2,
            oauth_timeout_ms: 10_000,
            oauth_retries: 2,
            regions: RegionTable::default(),
            default_region: None,
            whatsapp_safety_buffer_secs: 300,
            whatsapp_default_ttl_secs: 3_600,
            deadline_ms: 25_000,
            providers: ProviderTable::default(),
        }
    }
}

/// Backoff before retry number `attempt + 1` after a failure: 500 ms x 2^attempt, at most 4 s.
pub fn retry_backoff_ms(attempt: u32) -> u64 {
    500u64.saturating_mul(1u64 << attempt.min(16)).min(4_000)
}

/// Backoff after a rate limit: 1 s x 2^attempt, at most 8 s.
pub fn rate_limit_backoff_ms(attempt: u32) -> u64 {
    1_000u64.saturating_mul(1u64 << attempt.min(16)).min(8_000)
}

/// The longest wait a `Retry-After` may impose.
pub const MAX_RATE_LIMIT_WAIT_MS: u64 = 30_000;

/// A retry is only started when at least this much of the deadline is left for it.
pub const MIN_ATTEMPT_MS: u64 = 100;

/// Where an [`OutboundRequest`] goes; the driver maps it to an Envoy cluster or a URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The Tenant Service.
    TenantService,
    /// A Genesys login host.
    GenesysLogin {
        /// The tenant's region, e.g. `eu-west-1` (selects the cluster).
        region: String,
        /// The login host, e.g. `login.mypurecloud.ie` (the `:authority` to send).
        host: String,
    },
    /// An `oauth2` provider's token endpoint (the request's path is the URL's).
    TokenEndpoint {
        /// The provider.
        provider: Provider,
        /// The endpoint (its authority selects the filter's cluster; the companion
        /// calls the URL).
        url: EndpointUrl,
    },
}

/// An HTTP request the driver must send. Header values and body are wiped on drop:
/// drop the request as soon as it is dispatched.
#[derive(Debug)]
pub struct OutboundRequest {
    /// Where it goes.
    pub destination: Destination,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Path and query.
    pub path: String,
    /// Headers besides `:method`, `:path` and `:authority`.
    pub headers: Vec<(&'static str, SecretString)>,
    /// The body; empty for `GET`.
    pub body: SecretBytes,
    /// Give up waiting for the answer after this long.
    pub timeout_ms: u64,
}

/// What came back for an [`OutboundRequest`].
#[derive(Debug)]
pub enum CalloutResult {
    /// An HTTP answer.
    Response {
        /// The status code.
        status: u16,
        /// The body (may carry a secret or token: wiped on drop).
        body: SecretBytes,
        /// The `Retry-After` header in seconds, when present and numeric.
        retry_after_secs: Option<u64>,
    },
    /// No answer: connection failure, reset or timeout.
    NoResponse,
}

/// A token ready to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedToken {
    /// The bearer token.
    pub access_token: SecretString,
    /// Seconds the token is valid for from the moment it was fetched (may be <= 0 for a
    /// WhatsApp token about to expire).
    pub expires_in_secs: i64,
    /// When to stop using it, in milliseconds since the epoch.
    pub expires_at_ms: u64,
    /// Whether it may be cached (a token with no remaining lifetime is served once only).
    pub cacheable: bool,
}

/// What the driver should do next.
#[derive(Debug)]
#[must_use]
pub enum Step {
    /// Send this request and feed its result to [`FetchFlow::handle_response`].
    Send(OutboundRequest),
    /// Do nothing until `at_ms`, then poll again.
    WaitUntil {
        /// When to poll again, in milliseconds since the epoch.
        at_ms: u64,
        /// Why (for a log line; names no secret).
        reason: String,
    },
    /// A request is outstanding: wait for its result.
    AwaitResponse,
    /// The fetch is over.
    Done(Result<FetchedToken, TokenError>),
}

enum Phase {
    /// Ask the Tenant Service (attempt number `attempt`) once `now >= not_before`.
    FetchCredentials {
        attempt: u32,
        not_before: u64,
    },
    AwaitCredentials {
        attempt: u32,
        /// When the request left (the lifetime of a static token counts from it).
        sent_at_ms: u64,
    },
    /// Exchange the credentials at the token endpoint once `now >= not_before`.
    Exchange {
        exchange: Exchange,
        attempt: u32,
        not_before: u64,
    },
    AwaitExchange {
        exchange: Exchange,
        attempt: u32,
        /// When the request left: the token's `expires_in` counts from it.
        sent_at_ms: u64,
    },
    Finished(Result<FetchedToken, TokenError>),
}

/// A client's credentials and where to exchange them.
struct Exchange {
    client_id: SecretString,
    client_secret: SecretString,
    destination: Destination,
    path: String,
}

/// The fetch of one token; see the module documentation for how to drive it.
pub struct FetchFlow {
    key: TokenKey,
    config: FetchConfig,
    /// The key's provider; `None` when it is not configured (the flow is then over).
    spec: Option<ProviderSpec>,
    phase: Phase,
    /// Why the last attempt failed, for the waiting step's reason and the final error.
    last_failure: String,
    /// When the whole fetch must be over (set at the first poll).
    deadline_at_ms: Option<u64>,
}

impl std::fmt::Debug for FetchFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match &self.phase {
            Phase::FetchCredentials { attempt, .. } | Phase::AwaitCredentials { attempt, .. } => {
                format!("credentials attempt {attempt}")
            }
            Phase::Exchange { attempt, .. } | Phase::AwaitExchange { attempt, .. } => {
                format!("exchange attempt {attempt}")
            }
            Phase::Finished(_) => "finished".to_owned(),
        };
        f.debug_struct("FetchFlow")
            .field("key", &self.key)
            .field("phase", &phase)
            .finish()
    }
}

impl FetchFlow {
    /// A fetch for `key`, starting with the Tenant Service (or over at once, with
    /// `INVALID_REQUEST`, when `key`'s provider is not configured).
    pub fn new(key: TokenKey, config: &FetchConfig) -> Self {
        let spec = config.providers.get(&key.provider).cloned();
        let phase = match config.providers.check(&key.provider) {
            Ok(()) => Phase::FetchCredentials {
                attempt: 0,
                not_before: 0,
            },
            Err(error) => Phase::Finished(Err(error)),
        };
        Self {
            key,
            config: config.clone(),
            spec,
            phase,
            last_failure: String::new(),
            deadline_at_ms: None,
        }
    }

    /// The token this flow fetches.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// What to do next at time `now_ms`.
    pub fn poll(&mut self, now_ms: u64) -> Step {
        let deadline_at_ms = *self
            .deadline_at_ms
            .get_or_insert(now_ms.saturating_add(self.config.deadline_ms));
        let attempt_budget_ms = deadline_at_ms.saturating_sub(now_ms).max(1);
        match std::mem::replace(
            &mut self.phase,
            Phase::FetchCredentials {
                attempt: 0,
                not_before: 0,
            },
        ) {
            Phase::FetchCredentials {
                attempt,
                not_before,
            } if now_ms < not_before => {
                self.phase = Phase::FetchCredentials {
                    attempt,
                    not_before,
                };
                Step::WaitUntil {
                    at_ms: not_before,
                    reason: self.last_failure.clone(),
                }
            }
            Phase::FetchCredentials { attempt, .. } => {
                self.phase = Phase::AwaitCredentials {
                    attempt,
                    sent_at_ms: now_ms,
                };
                Step::Send(self.credentials_request(attempt_budget_ms))
            }
            Phase::Exchange {
                exchange,
                attempt,
                not_before,
            } if now_ms < not_before => {
                self.phase = Phase::Exchange {
                    exchange,
                    attempt,
                    not_before,
                };
                Step::WaitUntil {
                    at_ms: not_before,
                    reason: self.last_failure.clone(),
                }
            }
            Phase::Exchange {
                exchange, attempt, ..
            } => {
                let request = self.exchange_request(&exchange, attempt_budget_ms);
                self.phase = Phase::AwaitExchange {
                    exchange,
                    attempt,
                    sent_at_ms: now_ms,
                };
                Step::Send(request)
            }
            waiting @ (Phase::AwaitCredentials { .. } | Phase::AwaitExchange { .. }) => {
                self.phase = waiting;
                Step::AwaitResponse
            }
            Phase::Finished(result) => {
                self.phase = Phase::Finished(result.clone());
                Step::Done(result)
            }
        }
    }

    /// Feeds the result of the request last returned by [`FetchFlow::poll`], handled at
    /// `now_ms` (backoffs count from it; a token's lifetime counts from when the request
    /// was sent). A result that arrives when none is outstanding is ignored.
    pub fn handle_response(&mut self, now_ms: u64, result: CalloutResult) {
        self.phase = match std::mem::replace(
            &mut self.phase,
            Phase::FetchCredentials {
                attempt: 0,
                not_before: 0,
            },
        ) {
            Phase::AwaitCredentials {
                attempt,
                sent_at_ms,
            } => self.on_credentials(Times { sent_at_ms, now_ms }, attempt, result),
            Phase::AwaitExchange {
                exchange,
                attempt,
                sent_at_ms,
            } => self.on_exchange(Times { sent_at_ms, now_ms }, exchange, attempt, result),
            other => other,
        };
    }

    /// Whether a retry starting at `not_before` still fits before the deadline.
    fn retry_fits(&self, not_before: u64) -> bool {
        self.deadline_at_ms
            .is_none_or(|deadline| not_before.saturating_add(MIN_ATTEMPT_MS) <= deadline)
    }

    fn credentials_request(&self, budget_ms: u64) -> OutboundRequest {
        OutboundRequest {
            destination: Destination::TenantService,
            method: "GET",
            path: self.spec.as_ref().map_or_else(String::new, |spec| {
                spec.tenant_service_path(self.key.tenant_id.as_str())
            }),
            headers: vec![
                (
                    "x-service-name",
                    SecretString::from(self.config.service_name.as_str()),
                ),
                ("accept", SecretString::from("application/json")),
            ],
            body: SecretBytes::default(),
            timeout_ms: self.config.tenant_service_timeout_ms.min(budget_ms),
        }
    }

    fn exchange_request(&self, exchange: &Exchange, budget_ms: u64) -> OutboundRequest {
        let oauth2 = self.oauth2_spec();
        let (authorization, body) = match oauth2 {
            // Genesys: the id and secret as they are, and only the grant type.
            None => (
                Some(oauth::basic_authorization(
                    &exchange.client_id,
                    &exchange.client_secret,
                )),
                SecretBytes::new(oauth::CLIENT_CREDENTIALS_BODY.to_vec()),
            ),
            Some(spec) => (
                (spec.client_auth == ClientAuth::ClientSecretBasic).then(|| {
                    oauth::form_encoded_basic_authorization(
                        &exchange.client_id,
                        &exchange.client_secret,
                    )
                }),
                oauth::client_credentials_form(spec, &exchange.client_id, &exchange.client_secret),
            ),
        };
        let mut headers = Vec::with_capacity(3);
        if let Some(authorization) = authorization {
            headers.push(("authorization", authorization));
        }
        headers.push((
            "content-type",
            SecretString::from("application/x-www-form-urlencoded"),
        ));
        headers.push(("accept", SecretString::from("application/json")));
        let timeout_ms = oauth2
            .and_then(|spec| spec.timeout_ms)
            .unwrap_or(self.config.oauth_timeout_ms);
        OutboundRequest {
            destination: exchange.destination.clone(),
            method: "POST",
            path: exchange.path.clone(),
            headers,
            body,
            timeout_ms: timeout_ms.min(budget_ms),
        }
    }

    /// The provider's `oauth2` settings, when it is of that kind.
    fn oauth2_spec(&self) -> Option<&OAuth2Spec> {
        match self.spec.as_ref().map(|spec| &spec.kind) {
            Some(ProviderKind::Oauth2(spec)) => Some(spec),
            _ => None,
        }
    }

    /// How messages name the provider (`Genesys`, `WhatsApp`, or its name).
    fn display_name(&self) -> &str {
        self.spec
            .as_ref()
            .map_or(self.key.provider.as_str(), ProviderSpec::display_name)
    }

    fn fail(&self, code: ErrorCode, message: String) -> Phase {
        Phase::Finished(Err(TokenError::new(code, message)))
    }

    fn on_credentials(&mut self, times: Times, attempt: u32, result: CalloutResult) -> Phase {
        let now_ms = times.now_ms;
        let tenant = &self.key.tenant_id;
        let provider = self.key.provider.clone();
        let body = match result {
            CalloutResult::Response {
                status: 200..=299,
                body,
                ..
            } => body,
            CalloutResult::Response { status: 404, .. } => {
                return self.fail(
                    ErrorCode::CredentialsNotFound,
                    format!("no {provider} credentials found for tenant {tenant}"),
                );
            }
            CalloutResult::Response { status: 400, .. } => {
                return self.fail(
                    ErrorCode::InvalidRequest,
                    format!("invalid credential request for tenant {tenant}"),
                );
            }
            CalloutResult::Response { status, .. } if status == 429 || status >= 500 => {
                return self.retry_credentials(
                    now_ms,
                    attempt,
                    format!("Tenant Service answered {status}"),
                );
            }
            CalloutResult::Response { status, .. } => {
                return self.fail(
                    ErrorCode::TenantServiceUnavailable,
                    format!("Tenant Service answered {status} for tenant {tenant}"),
                );
            }
            CalloutResult::NoResponse => {
                return self.retry_credentials(
                    now_ms,
                    attempt,
                    "Tenant Service did not answer".to_owned(),
                );
            }
        };
        let display = self.display_name();
        match self.spec.as_ref().map(|spec| &spec.kind) {
            Some(ProviderKind::Genesys) => {
                let credentials = match GenesysCredentials::parse(
                    &self.key,
                    body.expose(),
                    self.config.default_region.as_deref(),
                ) {
                    Ok(credentials) => credentials,
                    Err(error) => return Phase::Finished(Err(error)),
                };
                match self.config.regions.login_host(&credentials.region) {
                    Ok(host) => self.exchange_at(
                        now_ms,
                        credentials.client_id,
                        credentials.client_secret,
                        Destination::GenesysLogin {
                            region: credentials.region,
                            host,
                        },
                        OAUTH_TOKEN_PATH.to_owned(),
                    ),
                    Err(error) => Phase::Finished(Err(error)),
                }
            }
            Some(ProviderKind::Oauth2(spec)) => {
                let credentials = match OAuth2Credentials::parse(&self.key, display, body.expose())
                {
                    Ok(credentials) => credentials,
                    Err(error) => return Phase::Finished(Err(error)),
                };
                match spec.endpoint_for(credentials.token_url.as_deref()) {
                    Ok(url) => {
                        let path = url.path.clone();
                        let destination = Destination::TokenEndpoint {
                            provider: provider.clone(),
                            url,
                        };
                        self.exchange_at(
                            now_ms,
                            credentials.client_id,
                            credentials.client_secret,
                            destination,
                            path,
                        )
                    }
                    Err(problem) => self.fail(
                        ErrorCode::CredentialsNotFound,
                        format!(
                            "no usable {display} token endpoint for tenant {tenant}: {problem}"
                        ),
                    ),
                }
            }
            Some(ProviderKind::Whatsapp) => {
                let lifetimes = StaticSpec {
                    safety_buffer_secs: self.config.whatsapp_safety_buffer_secs,
                    default_ttl_secs: self.config.whatsapp_default_ttl_secs,
                };
                self.static_token(times, display, body.expose(), lifetimes)
            }
            Some(ProviderKind::Static(lifetimes)) => {
                self.static_token(times, display, body.expose(), *lifetimes)
            }
            None => self.fail(
                ErrorCode::InvalidRequest,
                format!("unsupported provider type '{provider}'"),
            ),
        }
    }

    /// The exchange of `client_id` and `client_secret` at `destination`'s `path`.
    fn exchange_at(
        &self,
        now_ms: u64,
        client_id: SecretString,
        client_secret: SecretString,
        destination: Destination,
        path: String,
    ) -> Phase {
        Phase::Exchange {
            exchange: Exchange {
                client_id,
                client_secret,
                destination,
                path,
            },
            attempt: 0,
            not_before: now_ms,
        }
    }

    /// A static token (WhatsApp's, a `static` provider's) from the Tenant Service's
    /// answer.
    fn static_token(
        &self,
        times: Times,
        display: &str,
        body: &[u8],
        lifetimes: StaticSpec,
    ) -> Phase {
        match StaticCredentials::parse(&self.key, display, body) {
            Ok(credentials) => Phase::Finished(Ok(static_token_of(times, credentials, lifetimes))),
            Err(error) => Phase::Finished(Err(error)),
        }
    }

    fn retry_credentials(&mut self, now_ms: u64, attempt: u32, reason: String) -> Phase {
        let not_before = now_ms.saturating_add(retry_backoff_ms(attempt));
        if attempt < self.config.tenant_service_retries && self.retry_fits(not_before) {
            self.last_failure = reason;
            Phase::FetchCredentials {
                attempt: attempt + 1,
                not_before,
            }
        } else {
            self.fail(
                ErrorCode::TenantServiceUnavailable,
                format!(
                    "failed to fetch {} credentials for tenant {} after {} attempts{}: {reason}",
                    self.key.provider,
                    self.key.tenant_id,
                    attempt + 1,
                    self.deadline_note(attempt, self.config.tenant_service_retries),
                ),
            )
        }
    }

    fn on_exchange(
        &mut self,
        times: Times,
        exchange: Exchange,
        attempt: u32,
        result: CalloutResult,
    ) -> Phase {
        let now_ms = times.now_ms;
        let oauth2 = self.oauth2_spec();
        let default_expires_in_secs = oauth2.and_then(|spec| spec.default_expires_in_secs);
        let retries = oauth2
            .and_then(|spec| spec.retries)
            .unwrap_or(self.config.oauth_retries);
        let outcome = match result {
            CalloutResult::Response {
                status,
                body,
                retry_after_secs,
            } => oauth::classify_response(status, &body, retry_after_secs, default_expires_in_secs),
            CalloutResult::NoResponse => ExchangeOutcome::Transient {
                reason: "login did not answer".to_owned(),
            },
        };
        let tenant = &self.key.tenant_id;
        let delay_ms = match outcome {
            ExchangeOutcome::Token {
                access_token,
                expires_in_secs,
            } => {
                let expires_at_ms = times
                    .sent_at_ms
                    .saturating_add(expires_in_secs.saturating_mul(1000));
                // What is left of its life when handled, in seconds rounded up.
                let remaining_secs = expires_at_ms.saturating_sub(now_ms).div_ceil(1000);
                if remaining_secs > 0 {
                    return Phase::Finished(Ok(FetchedToken {
                        access_token,
                        expires_in_secs: i64::try_from(remaining_secs).unwrap_or(i64::MAX),
                        expires_at_ms,
                        cacheable: true,
                    }));
                }
                // Handled after the token's life: never served; fetch anew.
                self.last_failure = format!(
                    "the {expires_in_secs} s token's answer was handled {} ms after its request",
                    now_ms.saturating_sub(times.sent_at_ms)
                );
                retry_backoff_ms(attempt)
            }
            ExchangeOutcome::CredentialsRejected { description } => {
                return self.fail(
                    ErrorCode::OauthInvalidGrant,
                    format!(
                        "{} rejected the OAuth credentials of tenant {tenant}: {description}",
                        self.display_name()
                    ),
                );
            }
            ExchangeOutcome::Fatal { reason } => {
                return self.fail(
                    ErrorCode::OauthExchangeFailed,
                    format!("OAuth exchange for tenant {tenant} failed: {reason}"),
                );
            }
            ExchangeOutcome::RateLimited { retry_after_ms } => {
                self.last_failure = "login rate limited".to_owned();
                retry_after_ms.map_or_else(
                    || rate_limit_backoff_ms(attempt),
                    |ms| ms.min(MAX_RATE_LIMIT_WAIT_MS),
                )
            }
            ExchangeOutcome::Transient { reason } => {
                self.last_failure = reason;
                retry_backoff_ms(attempt)
            }
        };
        let not_before = now_ms.saturating_add(delay_ms);
        if attempt < retries && self.retry_fits(not_before) {
            Phase::Exchange {
                exchange,
                attempt: attempt + 1,
                not_before,
            }
        } else {
            self.fail(
                ErrorCode::OauthExchangeFailed,
                format!(
                    "failed to exchange OAuth credentials for tenant {tenant} after {} attempts{}: {}",
                    attempt + 1,
                    self.deadline_note(attempt, retries),
                    self.last_failure
                ),
            )
        }
    }

    /// Says so when the deadline, not the retry count, ended the attempts.
    fn deadline_note(&self, attempt: u32, retries: u32) -> String {
        if attempt < retries {
            format!(
                " (the {} ms fetch deadline left no time to retry)",
                self.config.deadline_ms
            )
        } else {
            String::new()
        }
    }
}

/// When an answer's request was sent, and when the answer is handled.
#[derive(Debug, Clone, Copy)]
struct Times {
    sent_at_ms: u64,
    now_ms: u64,
}

/// The token of a static credential, its lifetime per `lifetimes`: it ends at the
/// issuer's `expiresAt` less the safety buffer, or else the default lifetime after the
/// request was sent. A token with no life left when its answer is handled is served
/// once, not cached.
fn static_token_of(
    times: Times,
    credentials: StaticCredentials,
    lifetimes: StaticSpec,
) -> FetchedToken {
    let usable_until_ms = match credentials.expires_at_ms {
        Some(at_ms) => {
            i128::from(at_ms) - i128::from(lifetimes.safety_buffer_secs).saturating_mul(1000)
        }
        None => {
            i128::from(times.sent_at_ms)
                + i128::from(lifetimes.default_ttl_secs).saturating_mul(1000)
        }
    };
    let remaining_ms = usable_until_ms - i128::from(times.now_ms);
    let expires_in_secs = i64::try_from(remaining_ms.div_euclid(1000)).unwrap_or(i64::MAX);
    let cacheable = expires_in_secs > 0;
    let expires_at_ms = if cacheable {
        u64::try_from(usable_until_ms).unwrap_or(u64::MAX)
    } else {
        credentials.expires_at_ms.unwrap_or(times.now_ms)
    };
    FetchedToken {
        access_token: credentials.token,
        expires_in_secs,
        expires_at_ms,
        cacheable,
    }
}
