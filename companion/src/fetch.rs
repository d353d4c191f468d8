//! The driver of core's sans-IO [`FetchFlow`] for the native token API: reqwest for the
//! callouts, tokio timers for the backoffs, the [`Clock`] for the flow's notion of now.
//!
//! The flow decides everything (which request, when to retry, what an answer means);
//! this module only carries its requests out:
//!
//! - [`Step::Send`]: the request goes to `--tenant-service-url` + path, or to the
//!   region's login URL (`--genesys-login-url-template`) with `Host` set to the
//!   region's login host; its timeout is the flow's per-attempt budget. An HTTP answer
//!   becomes [`CalloutResult::Response`] (status, body, numeric `Retry-After`); a
//!   connection failure, reset or timeout becomes [`CalloutResult::NoResponse`].
//! - [`Step::WaitUntil`]: a `tokio::time::sleep` until that wall-clock moment.
//! - [`Step::Done`]: the fetched token or the error, as is.
//!
//! Every call is counted and timed in [`Metrics`] by upstream and outcome. Secret
//! headers (`Authorization: Basic …`) are marked sensitive; neither they nor bodies are
//! ever logged.

use axum::http::{HeaderName, HeaderValue, header};
use std::sync::Arc;
use std::time::Duration;
use tokengate_core::providers::ProviderTable;
use tokengate_core::{
    CalloutResult, Destination, FetchConfig, FetchFlow, FetchedToken, OutboundRequest, SecretBytes,
    Step, TokenError, TokenKey,
};
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::config::{self, Config, RedactedUrl};
use crate::correlation;
use crate::metrics::{CalloutOutcome, Metrics, Upstream};

/// Largest upstream answer read; real ones are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why the token API's HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the token API's HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

/// Runs fetches for the token API; cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    /// Shared connection pool for every upstream.
    http: reqwest::Client,
    /// Base URL of the Tenant Service, without a trailing slash.
    tenant_service_url: RedactedUrl,
    /// `--genesys-login-url-template`.
    login_url_template: String,
    /// Timeouts, retries, regions, providers: what core's flow needs.
    config: FetchConfig,
    /// Where calls are counted.
    metrics: Arc<Metrics>,
    /// The flow's wall clock.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("tenant_service_url", &self.tenant_service_url)
            .field("login_url_template", &self.login_url_template)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A fetcher for `config`'s token API; `None` when the token API is off (no
    /// `--tenant-service-url`).
    pub fn from_config(
        config: &Config,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Option<Self>, ClientError> {
        let Some(tenant_service_url) = &config.tenant_service_url else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            // Redirects would carry the Basic credentials elsewhere: never follow them.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(
                config
                    .tenant_service_timeout_ms
                    .max(config.oauth_timeout_ms),
            ))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tokengate-companion/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(Self {
            http,
            tenant_service_url: RedactedUrl::from(
                tenant_service_url.expose().trim_end_matches('/'),
            ),
            login_url_template: config.genesys_login_url_template.clone(),
            config: config.fetch_config(),
            metrics,
            clock,
        }))
    }

    /// Fetches the token of `key` (credentials, then for Genesys the OAuth exchange),
    /// with core's retry and backoff policy and deadline.
    pub async fn fetch(&self, key: TokenKey) -> Result<FetchedToken, TokenError> {
        let mut flow = FetchFlow::new(key, &self.config);
        loop {
            match flow.poll(self.clock.now_ms()) {
                Step::Send(request) => {
                    let result = self.send(request).await;
                    flow.handle_response(self.clock.now_ms(), result);
                }
                Step::WaitUntil { at_ms, reason } => {
                    let wait_ms = at_ms.saturating_sub(self.clock.now_ms());
                    tracing::debug!(wait_ms, reason, "fetch backs off before retrying");
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                }
                // This driver awaits each answer before polling again, so the flow never
                // has one outstanding here; treat it as an answer that did not come.
                Step::AwaitResponse => {
                    flow.handle_response(self.clock.now_ms(), CalloutResult::NoResponse);
                }
                Step::Done(result) => return result,
            }
        }
    }

    /// The providers it fetches for.
    pub fn providers(&self) -> &ProviderTable {
        &self.config.providers
    }

    /// Sends one request of the flow; never fails, a failure is [`CalloutResult::NoResponse`].
    async fn send(&self, request: OutboundRequest) -> CalloutResult {
        let (upstream, url, host) = match &request.destination {
            Destination::TenantService => (
                Upstream::TenantService,
                format!("{}{}", self.tenant_service_url.expose(), request.path),
                None,
            ),
            Destination::GenesysLogin { region, host } => (
                Upstream::Oauth,
                config::login_url(&self.login_url_template, host, region),
                Some(host.clone()),
            ),
            Destination::TokenEndpoint { url, .. } => (Upstream::Oauth, url.to_string(), None),
        };
        let started = Instant::now();
        let result = self.exchange(&request, &url, host).await;
        let took = started.elapsed();
        drop(request);
        let outcome = match &result {
            CalloutResult::Response { status, .. } => CalloutOutcome::of_status(*status),
            CalloutResult::NoResponse => CalloutOutcome::NoResponse,
        };
        self.metrics.callout(upstream, outcome, took);
        let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        match &result {
            CalloutResult::Response { status, .. } => tracing::debug!(
                upstream = upstream.as_str(),
                status,
                took_ms,
                "upstream answered"
            ),
            CalloutResult::NoResponse => tracing::debug!(
                upstream = upstream.as_str(),
                took_ms,
                "upstream did not answer"
            ),
        }
        result
    }

    async fn exchange(
        &self,
        request: &OutboundRequest,
        url: &str,
        host: Option<String>,
    ) -> CalloutResult {
        let method = match request.method {
            "POST" => reqwest::Method::POST,
            _ => reqwest::Method::GET,
        };
        let mut builder = self
            .http
            .request(method, url)
            .timeout(Duration::from_millis(request.timeout_ms.max(1)));
        if let Some(host) = host {
            match HeaderValue::from_str(&host) {
                Ok(value) => builder = builder.header(header::HOST, value),
                Err(_) => return CalloutResult::NoResponse,
            }
        }
        for (name, value) in &request.headers {
            let Ok(mut value) = HeaderValue::from_str(value.expose()) else {
                tracing::warn!(
                    header = name,
                    "a header value of the fetch is not valid in HTTP; not sent"
                );
                continue;
            };
            let name = HeaderName::from_static(name);
            if name == header::AUTHORIZATION {
                value.set_sensitive(true);
            }
            builder = builder.header(name, value);
        }
        if let Some(traceparent) = correlation::traceparent() {
            builder = builder.header(&correlation::TRACEPARENT_HEADER, traceparent);
        }
        if !request.body.expose().is_empty() {
            builder = builder.body(request.body.expose().to_vec());
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(error) => {
                // Without the URL: it is configuration, and could carry user-info.
                tracing::debug!(error = %error.without_url(), "upstream request failed");
                return CalloutResult::NoResponse;
            }
        };
        let status = response.status().as_u16();
        let retry_after_secs = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        match read_body(response).await {
            Some(body) => CalloutResult::Response {
                status,
                body,
                retry_after_secs,
            },
            None => CalloutResult::NoResponse,
        }
    }
}

/// Reads a response body of at most [`MAX_RESPONSE_BYTES`] into a wiped buffer; `None`
/// if the connection broke or the body is larger (an unusable answer either way).
async fn read_body(mut response: reqwest::Response) -> Option<SecretBytes> {
    let capacity = response
        .content_length()
        .and_then(|length| usize::try_from(length).ok())
        .unwrap_or(1024)
        .min(MAX_RESPONSE_BYTES);
    // Wiped on every exit; sized up front so growing it rarely leaves copies behind.
    let mut buffer = Zeroizing::new(Vec::with_capacity(capacity));
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buffer.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    tracing::debug!("upstream answer too large; treated as no answer");
                    return None;
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(None) => return Some(SecretBytes::new(std::mem::take(&mut *buffer))),
            Err(error) => {
                tracing::debug!(error = %error.without_url(), "upstream answer broke off");
                return None;
            }
        }
    }
}
