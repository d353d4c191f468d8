//! The companion's configuration: command-line flags, each also readable from a
//! `TOKENGATE_…` environment variable, and the checks that stop a bad start-up.
//!
//! Every flag has a default, so `tokengate-companion` with no flag serves the internal
//! API on `127.0.0.1:7070` against a local Redis; the fetch defaults are core's
//! (`FetchConfig::default()`, `limit::DEFAULT_*`). Ranges are checked by the flags'
//! value parsers (a bad value exits 2 naming the flag); [`Config::validate`] checks
//! what a single flag cannot (relations between flags, URL shapes); the key files named by
//! `--internal-api-key-file` and `--encryption-key-file` are read and checked by
//! [`crate::keys`] when the companion starts. Either failure stops start-up with a
//! message naming the flag.

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokengate_core::limit::{DEFAULT_FETCHES_PER_MINUTE, DEFAULT_MIN_REFRESH_INTERVAL_MS};
use tokengate_core::providers::{ProviderDocument, ProviderTable};
use tokengate_core::regions::OAUTH_TOKEN_PATH;
use tokengate_core::{FetchConfig, RegionTable, SecretString};

/// Default `--listen` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default `--redis-url`.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Default `--lock-ttl-ms`.
pub const DEFAULT_LOCK_TTL_MS: u64 = 30_000;
/// Default `--negative-cache-ms`.
pub const DEFAULT_NEGATIVE_CACHE_MS: u64 = 5_000;
/// Largest `--negative-cache-ms`: a tenant whose secret was fixed is served within it.
pub const MAX_NEGATIVE_CACHE_MS: u64 = 300_000;
/// Default `--lease-wait-ms`.
pub const DEFAULT_LEASE_WAIT_MS: u64 = 35_000;
/// Default `--recheck-interval-ms`.
pub const DEFAULT_RECHECK_INTERVAL_MS: u64 = 200;
/// Default `--redis-timeout-ms`.
pub const DEFAULT_REDIS_TIMEOUT_MS: u64 = 1_000;
/// Default `--health-interval-ms`.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1_000;
/// Default `--health-failure-threshold`.
pub const DEFAULT_HEALTH_FAILURE_THRESHOLD: u32 = 3;
/// Largest `--degraded-fetches-per-minute`: the limiter keeps one timestamp per
/// admitted fetch and key, so the limit bounds its memory.
pub const MAX_DEGRADED_FETCHES_PER_MINUTE: u32 = 10_000;
/// Default `--genesys-login-url-template`: the region's login host over HTTPS.
pub const DEFAULT_LOGIN_URL_TEMPLATE: &str = "https://{host}";
/// Default `--shutdown-timeout-ms`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Most retries `--tenant-service-retries` and `--oauth-retries` accept.
pub const MAX_RETRIES: u32 = 10;
/// Environment variable that may hold the internal API key itself (instead of a file).
pub const INTERNAL_API_KEY_ENV: &str = "TOKENGATE_INTERNAL_API_KEY";

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event, with the request's span (`request{request_id=…}`).
    #[default]
    Text,
    /// One JSON object per event, with the request's span fields.
    Json,
}

/// tokengate companion: collapses token fetches cluster-wide for the tokengate Envoy
/// filter, and serves the original token API (`/auth/token`) natively.
///
/// It owns the Redis token cache and the per-(provider, tenant) fetch lock, and serves
/// the filter's lease / commit / abort / invalidate API. While Redis is unhealthy it
/// serves leases in degraded mode (no cache, no lock, an in-memory limit per key).
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(name = "tokengate-companion", version)]
pub struct Config {
    /// Address the HTTP API listens on (internal API, probes, metrics, and the token API
    /// unless --token-api-listen gives it a listener of its own).
    #[arg(long, env = "TOKENGATE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Serve the token API (`/auth/token`) on this address instead of --listen, e.g. to
    /// expose it to clients while the internal API stays private. Needs
    /// --tenant-service-url.
    #[arg(long, env = "TOKENGATE_TOKEN_API_LISTEN")]
    pub token_api_listen: Option<SocketAddr>,

    /// Redis holding the cluster-wide token cache and fetch locks:
    /// `redis://[[user]:password@]host:port[/db]`, `rediss://…` for TLS, or
    /// `redis+unix:///path`. Several comma-separated URLs name the seed nodes of a
    /// Redis Cluster.
    #[arg(long, env = "TOKENGATE_REDIS_URL", default_value = DEFAULT_REDIS_URL)]
    pub redis_url: RedactedUrl,

    /// Talk to Redis as a Redis Cluster (implied when --redis-url lists several nodes).
    #[arg(long, env = "TOKENGATE_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// PEM file of the CA(s) that sign the Redis server certificate, for `rediss://`
    /// with a private CA (without it the system's trusted roots are used).
    #[arg(long, env = "TOKENGATE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// How long a fetch lock lives, in milliseconds, if its holder neither commits nor
    /// aborts. Must outlive the filter's whole fetch deadline (Tenant Service plus OAuth,
    /// retries included), or a slow fetch loses its lock and a second fetch starts.
    #[arg(long, env = "TOKENGATE_LOCK_TTL_MS", default_value_t = DEFAULT_LOCK_TTL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lock_ttl_ms: u64,

    /// How long a lease waits, in milliseconds, for another instance's fetch to finish
    /// before it is answered 503 LOCK_ACQUISITION_FAILED. Keep it greater than
    /// --lock-ttl-ms, so that a waiter outlives a dead holder's lock and takes over
    /// instead of failing; the filter's call timeout to the companion must exceed it.
    #[arg(long, env = "TOKENGATE_LEASE_WAIT_MS", default_value_t = DEFAULT_LEASE_WAIT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease_wait_ms: u64,

    /// While a lease waits, how often it re-reads the token and the lock from Redis, in
    /// milliseconds. Waiters are woken by Redis pub/sub as soon as the holder commits or
    /// aborts; this re-check only catches expired locks and missed messages.
    #[arg(long, env = "TOKENGATE_RECHECK_INTERVAL_MS", default_value_t = DEFAULT_RECHECK_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub recheck_interval_ms: u64,

    /// Longest time one Redis operation (connect included) may take, in milliseconds,
    /// before the request is answered 503 CACHE_UNAVAILABLE.
    #[arg(long, env = "TOKENGATE_REDIS_TIMEOUT_MS", default_value_t = DEFAULT_REDIS_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

    /// How often the health monitor PINGs Redis (a cluster: asks for its shards and PINGs
    /// every primary), in milliseconds.
    #[arg(long, env = "TOKENGATE_HEALTH_INTERVAL_MS", default_value_t = DEFAULT_HEALTH_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub health_interval_ms: u64,

    /// How many Redis failures in a row (monitor PINGs, and connection failures or
    /// timeouts of requests' own operations) make Redis unhealthy, which switches leases
    /// to degraded mode; on a cluster, the same per shard (its primary's PINGs, its keys'
    /// operations) for its keys alone. One success makes it healthy again.
    #[arg(long, env = "TOKENGATE_HEALTH_FAILURE_THRESHOLD", default_value_t = DEFAULT_HEALTH_FAILURE_THRESHOLD,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub health_failure_threshold: u32,

    /// In degraded mode, how many fetches per (provider, tenant) this process grants in
    /// any rolling minute (a sliding window); further leases get 503 CACHE_UNAVAILABLE.
    /// 0 refuses every lease while Redis is unhealthy.
    #[arg(long, env = "TOKENGATE_DEGRADED_FETCHES_PER_MINUTE", default_value_t = DEFAULT_FETCHES_PER_MINUTE,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_DEGRADED_FETCHES_PER_MINUTE)))]
    pub degraded_fetches_per_minute: u32,

    /// How long, in milliseconds, a key whose fetch failed with rejected or missing
    /// credentials (OAUTH_INVALID_GRANT, CREDENTIALS_NOT_FOUND, as the fetching gateway or
    /// this token API reports them) is answered that error from the cluster cache,
    /// without a new fetch (negative caching; in degraded mode, from this process's
    /// memory). A forced refresh or an invalidation of the key clears it. 0 turns it off.
    #[arg(long, env = "TOKENGATE_NEGATIVE_CACHE_MS", default_value_t = DEFAULT_NEGATIVE_CACHE_MS,
          value_parser = clap::value_parser!(u64).range(0..=MAX_NEGATIVE_CACHE_MS))]
    pub negative_cache_ms: u64,

    /// At most one forced refresh (`"forceRefresh": true` on /auth/token) per (provider,
    /// tenant) and process in this many milliseconds, so a client looping forced
    /// refreshes cannot cause one OAuth call per request. A forced refresh sooner than
    /// that after the last one admitted is served as a normal request (from the cache
    /// when a token is cached). 0 admits every forced refresh.
    #[arg(long, env = "TOKENGATE_MIN_REFRESH_INTERVAL_MS", default_value_t = DEFAULT_MIN_REFRESH_INTERVAL_MS)]
    pub min_refresh_interval_ms: u64,

    /// Base URL of the Tenant Service (e.g. `http://tenant-service:8080`), asked
    /// `GET /tenants/{tenant}/credentials/{type}` by the token API. Without it the token
    /// API is off (`/auth/token` answers 404).
    #[arg(long, env = "TOKENGATE_TENANT_SERVICE_URL")]
    pub tenant_service_url: Option<RedactedUrl>,

    /// Where the token API sends a region's OAuth exchange: `{host}` is replaced by the
    /// region's login host (e.g. `login.mypurecloud.ie`) and `{region}` by the region;
    /// `/oauth/token` is appended. The `Host` header is always the login host, so a
    /// template without `{host}` sends every region through one egress proxy.
    #[arg(long, env = "TOKENGATE_GENESYS_LOGIN_URL_TEMPLATE", default_value = DEFAULT_LOGIN_URL_TEMPLATE)]
    pub genesys_login_url_template: String,

    /// `REGION=HOST` (repeatable, or comma-separated in the variable): a region's login
    /// host, overriding or adding to the built-in table.
    #[arg(long = "genesys-login-host", env = "TOKENGATE_GENESYS_LOGIN_HOSTS",
          value_delimiter = ',', value_parser = parse_region_host)]
    pub genesys_login_hosts: Vec<(String, String)>,

    /// Region used when a tenant's Genesys credentials name none.
    #[arg(long, env = "TOKENGATE_GENESYS_DEFAULT_REGION")]
    pub genesys_default_region: Option<String>,

    /// JSON file of the providers besides `genesys` and `whatsapp`, by name: the same
    /// document as the filter's `providers` (kinds `oauth2` and `static`; see the
    /// README). Read and checked at start-up; the token API serves each of them.
    #[arg(long, env = "TOKENGATE_PROVIDERS_FILE", value_parser = read_providers_file)]
    pub providers_file: Option<ProvidersFile>,

    /// Sent to the Tenant Service as `X-Service-Name`.
    #[arg(long, env = "TOKENGATE_SERVICE_NAME", default_value_t = FetchConfig::default().service_name)]
    pub service_name: String,

    /// Per-attempt timeout of a Tenant Service call, in milliseconds.
    #[arg(long, env = "TOKENGATE_TENANT_SERVICE_TIMEOUT_MS", default_value_t = FetchConfig::default().tenant_service_timeout_ms,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tenant_service_timeout_ms: u64,

    /// Retries after the first Tenant Service attempt (on 5xx, 429 or no answer; backoff
    /// 500 ms x 2^n, at most 4 s).
    #[arg(long, env = "TOKENGATE_TENANT_SERVICE_RETRIES", default_value_t = FetchConfig::default().tenant_service_retries,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RETRIES)))]
    pub tenant_service_retries: u32,

    /// Per-attempt timeout of an OAuth exchange, in milliseconds.
    #[arg(long, env = "TOKENGATE_OAUTH_TIMEOUT_MS", default_value_t = FetchConfig::default().oauth_timeout_ms,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub oauth_timeout_ms: u64,

    /// Retries after the first OAuth attempt (on 5xx, unusable answers, rate limiting or
    /// no answer); rejected credentials are never retried.
    #[arg(long, env = "TOKENGATE_OAUTH_RETRIES", default_value_t = FetchConfig::default().oauth_retries,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RETRIES)))]
    pub oauth_retries: u32,

    /// The whole fetch of the token API (every attempt, timeout and backoff) ends within
    /// this many milliseconds. Must be below --lock-ttl-ms, so the lock outlives it.
    #[arg(long, env = "TOKENGATE_FETCH_DEADLINE_MS", default_value_t = FetchConfig::default().deadline_ms,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_deadline_ms: u64,

    /// A WhatsApp token is treated as expired this many seconds before its `expiresAt`.
    #[arg(long, env = "TOKENGATE_WHATSAPP_SAFETY_BUFFER_SECS", default_value_t = FetchConfig::default().whatsapp_safety_buffer_secs)]
    pub whatsapp_safety_buffer_secs: u64,

    /// Lifetime, in seconds, given to a WhatsApp token without `expiresAt`.
    #[arg(long, env = "TOKENGATE_WHATSAPP_DEFAULT_TTL_SECS", default_value_t = FetchConfig::default().whatsapp_default_ttl_secs,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub whatsapp_default_ttl_secs: u64,

    /// File whose first line is the shared secret the internal API (`/v1/*`) requires in
    /// `x-tokengate-key` (at least 16 characters). The key may instead be given in the
    /// environment variable TOKENGATE_INTERNAL_API_KEY. Without either, the internal API
    /// is open (a warning is logged at start-up).
    #[arg(long, env = "TOKENGATE_INTERNAL_API_KEY_FILE")]
    pub internal_api_key_file: Option<PathBuf>,

    /// The internal API key itself; read from TOKENGATE_INTERNAL_API_KEY only (a flag's
    /// value would show in the process list).
    #[arg(long = "internal-api-key", env = INTERNAL_API_KEY_ENV, hide = true,
          hide_env_values = true, value_parser = parse_secret)]
    pub internal_api_key: Option<SecretString>,

    /// File of AES-256-GCM keys that encrypt the tokens stored in Redis, one
    /// `<key-id>:<64 hex digits>` per line: the first encrypts, all decrypt (add a new
    /// key first to rotate; drop the old one once its tokens expired). Without it tokens
    /// are stored in clear.
    #[arg(long, env = "TOKENGATE_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,

    /// On SIGTERM or Ctrl-C: stop accepting, let in-flight requests finish, and exit
    /// within this many milliseconds. Token API fetches still running shortly before
    /// the end release their lock and are answered 503.
    #[arg(long, env = "TOKENGATE_SHUTDOWN_TIMEOUT_MS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub shutdown_timeout_ms: u64,

    /// Log line format on standard error: `text` or `json`. The level comes from
    /// RUST_LOG (`info` when unset).
    #[arg(long, env = "TOKENGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A URL, or a comma-separated list of them, that may carry a password in its user-info
/// (`scheme://user:pass@host`): wiped when dropped, and shown by `Debug` and `Display`
/// with every user-info replaced by `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUrl(SecretString);

impl RedactedUrl {
    /// The URL itself, credentials included. Keep the borrow short and never log it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl From<String> for RedactedUrl {
    fn from(url: String) -> Self {
        Self(SecretString::new(url))
    }
}

impl From<&str> for RedactedUrl {
    fn from(url: &str) -> Self {
        Self(SecretString::from(url))
    }
}

impl std::str::FromStr for RedactedUrl {
    type Err = std::convert::Infallible;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        Ok(Self::from(url))
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_string(), f)
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: Vec<String> = self.expose().split(',').map(redact_url).collect();
        f.write_str(&redacted.join(","))
    }
}

/// `--providers-file`, read and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvidersFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The providers it configures, with the built-in ones.
    pub table: ProviderTable,
}

/// Reads `--providers-file`: a JSON object of provider documents by name.
fn read_providers_file(path: &str) -> Result<ProvidersFile, String> {
    let text = std::fs::read(path).map_err(|error| format!("cannot read {path}: {error}"))?;
    let documents: BTreeMap<String, ProviderDocument> = serde_json::from_slice(&text)
        .map_err(|error| format!("{path} is not a providers document: {error}"))?;
    let table =
        ProviderTable::from_documents(&documents).map_err(|error| format!("{path}: {error}"))?;
    Ok(ProvidersFile {
        path: PathBuf::from(path),
        table,
    })
}

/// Parses `REGION=HOST` of `--genesys-login-host`.
fn parse_region_host(value: &str) -> Result<(String, String), String> {
    let (region, host) = value
        .split_once('=')
        .ok_or_else(|| format!("expected REGION=HOST, got '{value}'"))?;
    let (region, host) = (region.trim(), host.trim());
    let valid_region = !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
    if !valid_region || !valid_host {
        return Err(format!(
            "expected REGION=HOST with a region of [A-Za-z0-9_-] and a host name, got '{value}'"
        ));
    }
    Ok((region.to_owned(), host.to_owned()))
}

/// Wraps the internal API key read from the environment.
fn parse_secret(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(value))
}

impl Config {
    /// Checks the rules a single flag cannot express. The message names the flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.recheck_interval_ms > self.lease_wait_ms {
            return Err(format!(
                "--recheck-interval-ms ({}) must not exceed --lease-wait-ms ({})",
                self.recheck_interval_ms, self.lease_wait_ms
            ));
        }
        self.validate_redis()?;
        self.validate_token_api()?;
        if self.internal_api_key_file.is_some() && self.internal_api_key.is_some() {
            return Err(format!(
                "--internal-api-key-file and {INTERNAL_API_KEY_ENV} are both set; use one"
            ));
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), String> {
        let urls = self.redis_urls();
        if urls.is_empty() {
            return Err("--redis-url names no Redis".to_owned());
        }
        for url in &urls {
            let supported = ["redis://", "rediss://", "redis+unix://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            if !supported {
                return Err(format!(
                    "--redis-url must start with redis://, rediss:// or redis+unix:// (got {})",
                    redact_url(url)
                ));
            }
            if let Err(error) = redis::IntoConnectionInfo::into_connection_info(*url) {
                return Err(format!(
                    "--redis-url {} is not a valid Redis URL: {}",
                    redact_url(url),
                    error.detail().unwrap_or("unparseable")
                ));
            }
            if self.is_cluster() && url.starts_with("redis+unix://") {
                return Err(
                    "--redis-url: a Redis Cluster is reached over TCP, not redis+unix://"
                        .to_owned(),
                );
            }
        }
        Ok(())
    }

    fn validate_token_api(&self) -> Result<(), String> {
        let Some(tenant_service_url) = &self.tenant_service_url else {
            if self.token_api_listen.is_some() {
                return Err(
                    "--token-api-listen needs --tenant-service-url (the token API is off without it)"
                        .to_owned(),
                );
            }
            return Ok(());
        };
        if self.token_api_listen == Some(self.listen) {
            return Err(format!(
                "--token-api-listen ({}) must differ from --listen; omit it to serve the token API on --listen",
                self.listen
            ));
        }
        check_http_url("--tenant-service-url", tenant_service_url.expose())?;
        let template = &self.genesys_login_url_template;
        let sample = expand_login_template(template, "login.mypurecloud.ie", "eu-west-1");
        check_http_url("--genesys-login-url-template", &sample).map_err(|error| {
            format!("{error} (after replacing {{host}} and {{region}} in '{template}')")
        })?;
        if template.contains('?') || template.contains('#') {
            return Err(format!(
                "--genesys-login-url-template must not carry a query or fragment: '{template}'"
            ));
        }
        if self.fetch_deadline_ms >= self.lock_ttl_ms {
            return Err(format!(
                "--fetch-deadline-ms ({}) must be below --lock-ttl-ms ({}): the lock must outlive \
                 the token API's fetch",
                self.fetch_deadline_ms, self.lock_ttl_ms
            ));
        }
        Ok(())
    }

    /// The Redis URLs of --redis-url (one, or a cluster's seed nodes).
    pub fn redis_urls(&self) -> Vec<&str> {
        self.redis_url
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect()
    }

    /// Whether Redis is a Redis Cluster (--redis-cluster, or several URLs).
    pub fn is_cluster(&self) -> bool {
        self.redis_cluster || self.redis_urls().len() > 1
    }

    /// Whether the token API (`/auth/token`) is served.
    pub fn token_api_enabled(&self) -> bool {
        self.tenant_service_url.is_some()
    }

    /// The fetch configuration of the token API, for core's [`FetchFlow`](tokengate_core::FetchFlow).
    pub fn fetch_config(&self) -> FetchConfig {
        FetchConfig {
            service_name: self.service_name.clone(),
            tenant_service_timeout_ms: self.tenant_service_timeout_ms,
            tenant_service_retries: self.tenant_service_retries,
            oauth_timeout_ms: self.oauth_timeout_ms,
            oauth_retries: self.oauth_retries,
            regions: RegionTable::with_overrides(
                self.genesys_login_hosts.iter().cloned().collect(),
            ),
            default_region: self.genesys_default_region.clone(),
            whatsapp_safety_buffer_secs: self.whatsapp_safety_buffer_secs,
            whatsapp_default_ttl_secs: self.whatsapp_default_ttl_secs,
            deadline_ms: self.fetch_deadline_ms,
            providers: self
                .providers_file
                .as_ref()
                .map(|file| file.table.clone())
                .unwrap_or_default(),
        }
    }

    /// The lock TTL as a duration.
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_millis(self.lock_ttl_ms)
    }

    /// The lease wait budget as a duration.
    pub fn lease_wait(&self) -> Duration {
        Duration::from_millis(self.lease_wait_ms)
    }

    /// The waiters' safety-net re-check interval as a duration.
    pub fn recheck_interval(&self) -> Duration {
        Duration::from_millis(self.recheck_interval_ms)
    }

    /// The per-operation Redis timeout as a duration.
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    /// The health monitor's PING interval as a duration.
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    /// The shutdown bound as a duration.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// The Redis URL(s) with any user and password replaced, safe to log.
    pub fn redacted_redis_url(&self) -> String {
        self.redis_urls()
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The Tenant Service URL with any user and password replaced, safe to log.
    pub fn redacted_tenant_service_url(&self) -> Option<String> {
        self.tenant_service_url.as_ref().map(RedactedUrl::to_string)
    }
}

/// The login URL for a region: `template` with `{host}` and `{region}` replaced, without
/// a trailing slash, followed by `/oauth/token`.
pub fn login_url(template: &str, host: &str, region: &str) -> String {
    let base = expand_login_template(template, host, region);
    format!("{}{OAUTH_TOKEN_PATH}", base.trim_end_matches('/'))
}

fn expand_login_template(template: &str, host: &str, region: &str) -> String {
    template.replace("{host}", host).replace("{region}", region)
}

/// Checks that `url` is an absolute `http` or `https` URL with a host.
fn check_http_url(flag: &str, url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|error| format!("{flag} is not a URL ({error}): '{}'", redact_url(url)))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "{flag} must be an http:// or https:// URL with a host, got '{}'",
            redact_url(url)
        ));
    }
    Ok(())
}

impl Default for Config {
    /// The command line's defaults, without reading the environment.
    fn default() -> Self {
        let command = Self::command().mut_args(|arg| arg.env(None::<&'static str>));
        command
            .try_get_matches_from(["tokengate-companion"])
            .and_then(|matches| Self::from_arg_matches(&matches))
            .expect("every flag's default parses (see the unit tests)")
    }
}

/// Replaces the user-info part of a URL (`scheme://user:pass@host`) with `[redacted]`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://[redacted]@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("tokengate-companion").chain(args.iter().copied()))
    }

    #[test]
    fn command_line_defaults_match_the_default_impl() {
        assert_eq!(parse(&[]).unwrap(), Config::default());
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn zero_durations_are_rejected_by_the_parser() {
        for flag in [
            "--lock-ttl-ms",
            "--lease-wait-ms",
            "--recheck-interval-ms",
            "--redis-timeout-ms",
            "--health-interval-ms",
            "--health-failure-threshold",
            "--tenant-service-timeout-ms",
            "--oauth-timeout-ms",
            "--fetch-deadline-ms",
            "--whatsapp-default-ttl-secs",
            "--shutdown-timeout-ms",
        ] {
            let error = parse(&[flag, "0"]).expect_err(flag);
            assert!(error.to_string().contains(flag), "{error}");
        }
        for flag in ["--tenant-service-retries", "--oauth-retries"] {
            assert!(parse(&[flag, "10"]).is_ok());
            assert!(parse(&[flag, "11"]).is_err(), "{flag} 11 was accepted");
        }
    }

    #[test]
    fn negative_caching_lasts_5_s_by_default_may_be_off_and_is_bounded() {
        assert_eq!(Config::default().negative_cache_ms, 5_000);
        assert_eq!(
            parse(&["--negative-cache-ms", "0"])
                .unwrap()
                .negative_cache_ms,
            0
        );
        assert!(parse(&["--negative-cache-ms", "300001"]).is_err());
    }

    #[test]
    fn the_degraded_limit_may_be_zero_but_is_bounded() {
        assert_eq!(
            parse(&["--degraded-fetches-per-minute", "0"])
                .unwrap()
                .degraded_fetches_per_minute,
            0
        );
        let error = parse(&["--degraded-fetches-per-minute", "10001"]).unwrap_err();
        assert!(
            error.to_string().contains("--degraded-fetches-per-minute"),
            "{error}"
        );
        assert_eq!(
            Config::default().degraded_fetches_per_minute,
            DEFAULT_FETCHES_PER_MINUTE,
            "core's limit"
        );
    }

    #[test]
    fn a_fetch_deadline_beyond_the_lock_ttl_is_refused_in_one_sentence() {
        let message = token_api(&["--fetch-deadline-ms", "30000"]).unwrap_err();
        assert_eq!(
            message,
            "--fetch-deadline-ms (30000) must be below --lock-ttl-ms (30000): the lock must \
             outlive the token API's fetch"
        );
    }

    #[test]
    fn the_forced_refresh_interval_defaults_to_core_and_may_be_zero() {
        assert_eq!(
            Config::default().min_refresh_interval_ms,
            DEFAULT_MIN_REFRESH_INTERVAL_MS
        );
        let config = parse(&["--min-refresh-interval-ms", "0"]).unwrap();
        assert_eq!(config.min_refresh_interval_ms, 0);
        assert!(parse(&["--min-refresh-interval-ms", "-1"]).is_err());
    }

    #[test]
    fn recheck_interval_may_not_exceed_the_wait() {
        let config = Config {
            lease_wait_ms: 100,
            recheck_interval_ms: 101,
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .contains("--recheck-interval-ms")
        );
    }

    #[test]
    fn other_url_schemes_are_rejected_without_echoing_credentials() {
        let config = Config {
            redis_url: "http://:s3cret@host:6380".into(),
            ..Config::default()
        };
        let message = config.validate().unwrap_err();
        assert!(message.contains("http://[redacted]@host:6380"), "{message}");
        assert!(!message.contains("s3cret"));
    }

    #[test]
    fn tls_urls_and_cluster_node_lists_are_accepted() {
        let tls = parse(&["--redis-url", "rediss://:pw@redis.example:6380"]).unwrap();
        assert_eq!(tls.validate(), Ok(()));
        assert!(!tls.is_cluster());
        let nodes = parse(&[
            "--redis-url",
            "redis://10.0.0.1:7000, redis://10.0.0.2:7000,redis://10.0.0.3:7000",
        ])
        .unwrap();
        assert_eq!(nodes.validate(), Ok(()));
        assert!(nodes.is_cluster());
        assert_eq!(nodes.redis_urls().len(), 3);
        assert!(parse(&["--redis-cluster"]).unwrap().is_cluster());
        let unix_cluster = parse(&["--redis-cluster", "--redis-url", "redis+unix:///tmp/r.sock"]);
        assert!(
            unix_cluster
                .unwrap()
                .validate()
                .unwrap_err()
                .contains("redis+unix")
        );
        assert!(
            parse(&["--redis-url", ","])
                .unwrap()
                .validate()
                .unwrap_err()
                .contains("names no Redis")
        );
    }

    /// A configuration with the token API on.
    fn token_api(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["--tenant-service-url", "http://127.0.0.1:18081"];
        all.extend_from_slice(args);
        let config = parse(&all).map_err(|e| e.to_string())?;
        config.validate().map(|()| config)
    }

    #[test]
    fn the_token_api_is_off_without_a_tenant_service() {
        let config = parse(&[]).unwrap();
        assert!(!config.token_api_enabled());
        let message = parse(&["--token-api-listen", "127.0.0.1:8080"])
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(message.contains("--tenant-service-url"), "{message}");
        assert!(token_api(&[]).unwrap().token_api_enabled());
    }

    #[test]
    fn the_token_api_flags_are_checked() {
        let cases: [(&[&str], &str); 6] = [
            (&["--tenant-service-url", "ftp://x"], "--tenant-service-url"),
            (
                &["--tenant-service-url", "not a url"],
                "--tenant-service-url",
            ),
            (
                &["--genesys-login-url-template", "{host}"],
                "--genesys-login-url-template",
            ),
            (
                &["--genesys-login-url-template", "https://{host}/?x=1"],
                "query",
            ),
            (&["--fetch-deadline-ms", "30000"], "--lock-ttl-ms"),
            (&["--token-api-listen", "127.0.0.1:7070"], "must differ"),
        ];
        for (args, mentions) in cases {
            let message = token_api(args).unwrap_err();
            assert!(message.contains(mentions), "{args:?}: {message}");
        }
        for bad in [
            &["--genesys-login-host", "eu-west-1"][..],
            &["--genesys-login-host", "eu west=login.x"],
            &["--oauth-retries", "11"],
            &["--tenant-service-timeout-ms", "0"],
            &["--log-format", "yaml"],
            &["--shutdown-timeout-ms", "0"],
        ] {
            assert!(token_api(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_fetch_configuration_follows_the_flags() {
        let config = token_api(&[
            "--genesys-login-host",
            "eu-west-1=login.proxy.internal,mars-1=login.mars.example",
            "--genesys-default-region",
            "eu-west-1",
            "--oauth-retries",
            "0",
            "--service-name",
            "gateway",
        ])
        .unwrap();
        let fetch = config.fetch_config();
        assert_eq!(fetch.service_name, "gateway");
        assert_eq!(fetch.oauth_retries, 0);
        assert_eq!(fetch.default_region.as_deref(), Some("eu-west-1"));
        assert_eq!(
            fetch.regions.login_host("mars-1").unwrap(),
            "login.mars.example"
        );
        assert_eq!(
            fetch.regions.login_host("eu-west-1").unwrap(),
            "login.proxy.internal"
        );
        let defaults = token_api(&[]).unwrap().fetch_config();
        let core = FetchConfig::default();
        assert_eq!(
            (
                defaults.tenant_service_timeout_ms,
                defaults.tenant_service_retries,
                defaults.oauth_timeout_ms,
                defaults.oauth_retries,
                defaults.deadline_ms,
                defaults.whatsapp_safety_buffer_secs,
                defaults.whatsapp_default_ttl_secs,
            ),
            (
                core.tenant_service_timeout_ms,
                core.tenant_service_retries,
                core.oauth_timeout_ms,
                core.oauth_retries,
                core.deadline_ms,
                core.whatsapp_safety_buffer_secs,
                core.whatsapp_default_ttl_secs,
            ),
            "the flags default to core's fetch defaults"
        );
    }

    #[test]
    fn login_urls_follow_the_template() {
        assert_eq!(
            login_url(
                DEFAULT_LOGIN_URL_TEMPLATE,
                "login.mypurecloud.ie",
                "eu-west-1"
            ),
            "https://login.mypurecloud.ie/oauth/token"
        );
        assert_eq!(
            login_url("http://127.0.0.1:9/", "login.mypurecloud.ie", "eu-west-1"),
            "http://127.0.0.1:9/oauth/token"
        );
        assert_eq!(
            login_url("http://egress/{region}", "h", "ap-south-1"),
            "http://egress/ap-south-1/oauth/token"
        );
    }

    #[test]
    fn an_internal_key_from_the_environment_excludes_the_file_and_is_redacted() {
        let config = Config {
            internal_api_key: Some(SecretString::from("k".repeat(20).as_str())),
            internal_api_key_file: Some(PathBuf::from("/run/secrets/key")),
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().contains("both set"));
        assert!(!format!("{config:?}").contains("kkkk"));
    }

    #[test]
    fn debug_redacts_redis_credentials() {
        let config = Config {
            redis_url: "redis://user:s3cret@redis:6379/0,redis://:s3cret2@redis-2:6379".into(),
            tenant_service_url: Some("http://svc:s3cret3@tenants:8080".into()),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(
            shown.contains("redis://[redacted]@redis:6379/0,redis://[redacted]@redis-2:6379"),
            "{shown}"
        );
        assert!(shown.contains("http://[redacted]@tenants:8080"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
