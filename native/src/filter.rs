//! The native filter's logic for one configuration and one stream: the groundwork
//! path, inject mode with `fetch: companion`.
//!
//! - hit: the process-wide cache ([`CACHE`], one map for every worker thread) has a
//!   fresh token for (provider, tenant) -> set `Authorization: Bearer <token>`, continue;
//! - miss: pause the request, ask the companion's `/auth/token` with a callout bound to
//!   the stream, store the answer in the cache, set the header, `continue_decoding`.
//!
//! No collapsing of concurrent misses and no local mode yet: that is the worker's job
//! (`tokengate::worker`), to be driven through [`crate::adapter`] (see the crate docs).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokengate::config::{FetchBy, FilterConfig, Mode};
use tokengate_core::cache::CachedToken;
use tokengate_core::credentials::parse_rfc3339_ms;
use tokengate_core::token_api::{TOKEN_PATH, TokenResponse};
use tokengate_core::{ErrorCode, Provider, TenantId, TokenError, TokenKey};

use crate::adapter::{self, Counter};
use crate::envoy::{self, EnvoyConfig, EnvoyFilter, LogLevel};

/// The gateway cache of this Envoy process: every worker thread reads and writes it
/// (what proxy-wasm's shared data is for the wasm build), with a real delete.
static CACHE: LazyLock<Mutex<HashMap<TokenKey, CachedToken>>> = LazyLock::new(Default::default);

/// Keys held at most; beyond it, expired entries are dropped, then everything.
const CACHE_BOUND: usize = 100_000;

fn cache() -> MutexGuard<'static, HashMap<TokenKey, CachedToken>> {
    // A panic while holding the lock cannot leave the map half-written (single
    // insert/get calls): keep using it.
    CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// One `dynamic_modules` filter configuration: the parsed filter configuration and the
/// counters Envoy gave ids for.
#[derive(Debug)]
pub struct NativeConfig {
    /// The same configuration the wasm filter reads.
    pub config: FilterConfig,
    /// Counter ids by counter.
    counters: HashMap<Counter, usize>,
}

impl NativeConfig {
    /// Parses `bytes` with the wasm filter's parser and defines the counters. The error
    /// is the line Envoy's log gets (it names the offending field).
    pub fn new(envoy_config: EnvoyConfig, bytes: &[u8]) -> Result<Self, String> {
        let config = FilterConfig::parse(bytes).map_err(|error| error.to_string())?;
        // What the native build cannot do yet is refused at load, never half-done.
        if config.mode != Mode::Inject {
            return Err(
                "invalid tokengate configuration at 'mode': the native build (libtokengate.so) \
                 serves inject mode only so far"
                    .to_owned(),
            );
        }
        if config.fetch != FetchBy::Companion {
            return Err(
                "invalid tokengate configuration at 'fetch': the native build (libtokengate.so) \
                 fetches through the companion only so far (\"fetch\": \"companion\")"
                    .to_owned(),
            );
        }
        let counters = adapter::counters()
            .filter_map(|(counter, name)| {
                envoy_config.define_counter(&name).map(|id| (counter, id))
            })
            .collect();
        Ok(Self { config, counters })
    }

    fn count(&self, envoy: EnvoyFilter, counter: Counter) {
        if let Some(id) = self.counters.get(&counter) {
            envoy.increment(*id, 1);
        }
    }
}

/// What a stream's filter waits on.
#[derive(Debug)]
enum State {
    /// Nothing (not paused).
    Idle,
    /// Paused on callout `callout_id` for `key`.
    Fetching { key: TokenKey, callout_id: u64 },
}

/// The filter of one HTTP stream.
#[derive(Debug)]
pub struct Filter {
    config: Arc<NativeConfig>,
    state: State,
}

/// What `request_headers` tells Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (header set).
    Continue,
    /// The request was answered locally: stop.
    Answered,
    /// Pause until `continue_decoding`.
    Pause,
}

/// The body of a `fetch: companion` request to the companion's `/auth/token`
/// (the same fields as the wasm filter's).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CompanionTokenRequest<'a> {
    tenant_id: &'a TenantId,
    #[serde(rename = "type")]
    provider: Provider,
    force_refresh: bool,
}

impl Filter {
    /// A filter for a new stream.
    pub fn new(config: Arc<NativeConfig>) -> Self {
        Self {
            config,
            state: State::Idle,
        }
    }

    /// Whether the request is paused (body and trailers must be held back).
    pub fn paused(&self) -> bool {
        matches!(self.state, State::Fetching { .. })
    }

    /// The request headers arrived.
    pub fn on_request_headers(&mut self, envoy: EnvoyFilter) -> Verdict {
        let config = &self.config.config;
        let tenant = envoy
            .request_header(&config.tenant_header)
            .and_then(|raw| String::from_utf8(raw).ok());
        let Some(tenant) = tenant else {
            self.reply_error(
                envoy,
                &TokenError::new(
                    ErrorCode::InvalidRequest,
                    format!("missing tenant header '{}'", config.tenant_header),
                ),
                None,
            );
            return Verdict::Answered;
        };
        let tenant_id = match TenantId::parse(&tenant) {
            Ok(tenant_id) => tenant_id,
            Err(error) => {
                self.reply_error(envoy, &error, None);
                return Verdict::Answered;
            }
        };
        let key = TokenKey::new(config.provider, tenant_id);
        let now = now_ms();
        let cached = cache()
            .get(&key)
            .filter(|token| token.expires_at_ms > now.saturating_add(config.expiry_margin_ms))
            .cloned();
        if let Some(token) = cached {
            self.config.count(envoy, Counter::CacheHit);
            if envoy::log_enabled(LogLevel::Debug) {
                envoy::log(
                    LogLevel::Debug,
                    &format!("token request {key} source=cache"),
                );
            }
            self.inject(envoy, &token);
            return Verdict::Continue;
        }
        self.config.count(envoy, Counter::CacheMiss);
        self.config.count(envoy, Counter::FetchStarted);
        let body = serde_json::to_vec(&CompanionTokenRequest {
            tenant_id: &key.tenant_id,
            provider: key.provider,
            force_refresh: false,
        })
        .unwrap_or_default();
        let companion = &config.companion;
        let mut headers: Vec<(&str, &[u8])> = vec![
            (":method", b"POST"),
            (":path", TOKEN_PATH.as_bytes()),
            ("host", companion.authority.as_bytes()),
            ("content-type", b"application/json"),
        ];
        if let Some(api_key) = &companion.api_key {
            headers.push(("x-tokengate-key", api_key.expose().as_bytes()));
        }
        match envoy.callout(&companion.cluster, &headers, &body, companion.timeout_ms) {
            Ok(callout_id) => {
                self.state = State::Fetching { key, callout_id };
                Verdict::Pause
            }
            Err(code) => {
                envoy::log(
                    LogLevel::Warn,
                    &format!(
                        "token request {key}: callout to cluster '{}' refused by Envoy (init result {code})",
                        companion.cluster
                    ),
                );
                let error = TokenError::new(
                    ErrorCode::CompanionUnavailable,
                    "the token service could not be reached",
                );
                self.fail(envoy, &key, &error);
                Verdict::Answered
            }
        }
    }

    /// Callout `callout_id` ended: `status` and `body` when a response came.
    pub fn on_callout_done(
        &mut self,
        envoy: EnvoyFilter,
        callout_id: u64,
        response: Option<(u16, Vec<u8>)>,
    ) {
        let State::Fetching {
            key,
            callout_id: expected,
        } = &self.state
        else {
            return;
        };
        if *expected != callout_id {
            return;
        }
        let key = key.clone();
        self.state = State::Idle;
        let answer = response.ok_or_else(|| {
            TokenError::new(
                ErrorCode::CompanionUnavailable,
                "the token service could not be reached",
            )
        });
        let token = answer.and_then(|(status, body)| token_of(status, &body));
        match token {
            Ok(token) => {
                self.config.count(envoy, Counter::FetchSucceeded);
                envoy::log(
                    LogLevel::Info,
                    &format!("token request {key} source=companion"),
                );
                store(key, token.clone());
                self.inject(envoy, &token);
                envoy.continue_decoding();
            }
            Err(error) => self.fail(envoy, &key, &error),
        }
    }

    fn inject(&self, envoy: EnvoyFilter, token: &CachedToken) {
        let value = format!("Bearer {}", token.access_token.expose());
        if !envoy.set_request_header(&self.config.config.authorization_header, value.as_bytes()) {
            envoy::log(LogLevel::Warn, "the authorization header could not be set");
        }
    }

    fn fail(&self, envoy: EnvoyFilter, key: &TokenKey, error: &TokenError) {
        self.config.count(envoy, Counter::FetchFailed(error.code));
        envoy::log(
            LogLevel::Warn,
            &format!("token request {key} failed: {error}"),
        );
        self.reply_error(envoy, error, Some(key.tenant_id.as_str()));
    }

    fn reply_error(&self, envoy: EnvoyFilter, error: &TokenError, tenant: Option<&str>) {
        let correlation = envoy
            .request_header("x-request-id")
            .and_then(|raw| String::from_utf8(raw).ok());
        let body = error.to_body(tenant, correlation.as_deref()).to_json();
        envoy.send_response(
            error.http_status(),
            &[
                ("content-type", "application/json"),
                ("x-tokengate-reply", "1"),
            ],
            &body,
            "tokengate",
        );
    }
}

/// The token in a companion answer.
fn token_of(status: u16, body: &[u8]) -> Result<CachedToken, TokenError> {
    if status != 200 {
        // The companion answers errors with the same JSON error body a client gets.
        let code = serde_json::from_slice::<tokengate_core::ErrorBody>(body)
            .map_or(ErrorCode::CompanionUnavailable, |body| body.code);
        return Err(TokenError::new(
            code,
            format!("the token service answered {status}"),
        ));
    }
    let response: TokenResponse = serde_json::from_slice(body).map_err(|_| {
        TokenError::new(
            ErrorCode::CompanionUnavailable,
            "the token service answered an unreadable token",
        )
    })?;
    let expires_at_ms = parse_rfc3339_ms(&response.expires_at).unwrap_or_else(|| {
        now_ms().saturating_add(
            u64::try_from(response.expires_in)
                .unwrap_or(0)
                .saturating_mul(1000),
        )
    });
    Ok(CachedToken {
        access_token: response.access_token,
        expires_at_ms,
    })
}

fn store(key: TokenKey, token: CachedToken) {
    let mut cache = cache();
    if cache.len() >= CACHE_BOUND {
        let now = now_ms();
        cache.retain(|_, token| token.expires_at_ms > now);
        if cache.len() >= CACHE_BOUND {
            cache.clear();
        }
    }
    cache.insert(key, token);
}
