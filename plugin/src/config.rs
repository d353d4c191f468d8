//! The filter's configuration: one JSON document in the Envoy filter's
//! `configuration`, parsed once per worker in `on_configure`.
//!
//! Every field has a default except where none makes sense; unknown fields are
//! rejected so a typo cannot silently fall back to a default. A rejected document
//! produces one error naming the field path and the problem, e.g.
//! `invalid tokengate configuration at 'companion.timeoutMs': invalid type: string "x", expected u64`.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::slots::Slots;
use tokengate_core::cache::Lifetimes;
use tokengate_core::limit::{self, RefreshThrottle};
use tokengate_core::providers::{ProviderDocument, ProviderKind, ProviderTable};
use tokengate_core::{FetchConfig, Provider, RegionTable, SecretString};

/// The whole filter configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilterConfig {
    /// Inject tokens into requests, or answer the token API itself.
    #[serde(default)]
    pub mode: Mode,
    /// Who calls the Tenant Service and the IdP: this filter, or the companion.
    #[serde(default)]
    pub fetch: FetchBy,
    /// The provider whose token this filter instance injects (inject mode), unless
    /// the request's route is one of `routes`.
    #[serde(default = "Provider::genesys")]
    pub provider: Provider,
    /// Providers besides the built-in `genesys` and `whatsapp`, by name (see core's
    /// `providers` module for the document).
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderDocument>,
    /// The Envoy cluster of each `oauth2` token endpoint, by its authority (`host` or
    /// `host:port`, as in `tokenUrl` and `allowedTokenHosts`).
    #[serde(default)]
    pub token_endpoint_clusters: BTreeMap<String, String>,
    /// Route name (the route's `name` in the route configuration) -> the provider whose
    /// token requests on that route get (inject mode); other routes get `provider`'s.
    #[serde(default)]
    pub routes: BTreeMap<String, Provider>,
    /// `providers`, validated, with the built-in ones.
    #[serde(skip)]
    pub provider_table: ProviderTable,
    /// The request header that names the tenant (set by a trusted earlier filter).
    #[serde(default = "default_tenant_header")]
    pub tenant_header: String,
    /// The header the token is written to, as `Bearer <token>`.
    #[serde(default = "default_authorization_header")]
    pub authorization_header: String,
    /// A cached token is not injected when it expires within this margin.
    #[serde(default = "default_expiry_margin_ms")]
    pub expiry_margin_ms: u64,
    /// How long a key whose fetch failed with rejected or missing credentials is
    /// answered that error from memory, on every worker of this Envoy (0: never).
    #[serde(default = "default_negative_cache_ms")]
    pub negative_cache_ms: u64,
    /// A whole fetch (Tenant Service and OAuth, every retry) ends within this long.
    /// Keep it below the companion's `--lock-ttl-ms`.
    #[serde(default = "default_fetch_deadline_ms")]
    pub fetch_deadline_ms: u64,
    /// Where the companion is.
    #[serde(default)]
    pub companion: CompanionConfig,
    /// Where the Tenant Service is and how to call it.
    #[serde(default)]
    pub tenant_service: TenantServiceConfig,
    /// How to reach the Genesys login hosts.
    #[serde(default)]
    pub genesys: GenesysConfig,
    /// WhatsApp token lifetimes.
    #[serde(default)]
    pub whatsapp: WhatsappConfig,
    /// When a background refresh of a cached token starts.
    #[serde(default)]
    pub refresh_ahead: RefreshAheadConfig,
    /// Dropping a token the upstream rejected.
    #[serde(default)]
    pub purge: PurgeConfig,
    /// The gateway cache's bound.
    #[serde(default)]
    pub cache: CacheConfig,
}

/// The gateway cache (Envoy shared data): a fixed number of slots per kind of record,
/// reused as tenants come and go (see `slots`), so its memory is bounded whatever the
/// churn. A tenant pushed out is served from the companion's cache, without an OAuth call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Tokens this Envoy keeps (and in-flight fetches and purge records it tracks).
    pub max_tenants: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_tenants: 100_000,
        }
    }
}

/// The most slots a table may have: ten million tokens of ~600 bytes is already 6 GB.
const MAX_TENANTS_LIMIT: u32 = 10_000_000;

/// The longest `negativeCacheMs`: a tenant whose secret was fixed is served within it.
const MAX_NEGATIVE_CACHE_MS: u64 = 300_000;

/// Refresh-ahead: a token in the last part of its life is still served while one
/// background refresh per Envoy fetches its successor, so no request waits at expiry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RefreshAheadConfig {
    /// Refresh in the last this-many percent of a token's life (0 to 100; 0 turns
    /// refresh-ahead off unless `minLeadMs` applies).
    pub percent: u8,
    /// ... but at least this long before it expires; must exceed `expiryMarginMs`.
    pub min_lead_ms: u64,
}

impl Default for RefreshAheadConfig {
    fn default() -> Self {
        Self {
            percent: 10,
            min_lead_ms: 30_000,
        }
    }
}

/// Purge on upstream rejection: when the upstream answers one of `statuses` to a
/// request that carried an injected token, that token is dropped from this Envoy's
/// cache and from the cluster cache, so the next request fetches a new one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PurgeConfig {
    /// Upstream statuses that mean "this token is no good".
    pub statuses: Vec<u16>,
    /// At most one purge per token key per Envoy in this long, so a broken upstream
    /// cannot cause an OAuth storm.
    pub min_interval_ms: u64,
}

impl Default for PurgeConfig {
    fn default() -> Self {
        Self {
            statuses: vec![401],
            min_interval_ms: limit::DEFAULT_MIN_REFRESH_INTERVAL_MS,
        }
    }
}

/// What the filter does with a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Set `Authorization: Bearer <token>` and let the request continue upstream.
    #[default]
    Inject,
    /// Answer `POST /auth/token` and `GET /auth/token` with a `TokenResponse`.
    Endpoint,
}
tokengate_core::deserialize_unit_enum!(Mode { "inject" => Inject, "endpoint" => Endpoint });

/// Who fetches tokens on a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FetchBy {
    /// The filter, with Envoy callouts; the companion only collapses (lease / commit).
    #[default]
    Gateway,
    /// The companion's `/auth/token`: secrets never enter Envoy. No local mode: when
    /// the companion is unreachable, misses get `503 COMPANION_UNAVAILABLE`.
    Companion,
}
tokengate_core::deserialize_unit_enum!(FetchBy { "gateway" => Gateway, "companion" => Companion });

/// The companion's Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CompanionConfig {
    /// Envoy cluster name of the companion.
    pub cluster: String,
    /// `:authority` sent to the companion.
    pub authority: String,
    /// Timeout of a lease call; must exceed the companion's lease wait budget.
    pub timeout_ms: u64,
    /// After the companion failed to answer, fetch without it (local mode) for this long
    /// before trying it again.
    pub retry_after_ms: u64,
    /// In local mode, at most this many fetches per token key per minute on each worker;
    /// requests beyond it get `503 COMPANION_UNAVAILABLE`.
    pub local_fetches_per_minute: u32,
    /// The companion's internal API key (its `--internal-api-key-file`), sent as
    /// `x-tokengate-key`; none when the companion's API is open.
    pub api_key: Option<SecretString>,
}

/// The Tenant Service's Envoy cluster and call policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TenantServiceConfig {
    /// Envoy cluster name of the Tenant Service.
    pub cluster: String,
    /// `:authority` sent to the Tenant Service.
    pub authority: String,
    /// Per-attempt timeout.
    pub timeout_ms: u64,
    /// Retries after the first attempt (on 5xx or no answer).
    pub retries: u32,
    /// Sent as `X-Service-Name`.
    pub service_name: String,
}

/// The Genesys login clusters and call policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GenesysConfig {
    /// Envoy cluster name of a region's login host; `{region}` is replaced by the region.
    pub login_cluster_pattern: String,
    /// Per-attempt timeout of the OAuth exchange.
    pub timeout_ms: u64,
    /// Retries after the first attempt (on 5xx, rate limit, unusable answer or no answer).
    pub retries: u32,
    /// Region -> login host, overriding or adding to the built-in region table.
    pub login_hosts: BTreeMap<String, String>,
    /// Region used when a tenant's credentials name none.
    pub default_region: Option<String>,
}

/// WhatsApp token lifetimes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WhatsappConfig {
    /// A token is treated as expired this many seconds before its `expiresAt`.
    pub safety_buffer_secs: u64,
    /// Lifetime of a token without `expiresAt`.
    pub default_ttl_secs: u64,
}

fn default_tenant_header() -> String {
    "x-tenant-id".to_owned()
}
fn default_authorization_header() -> String {
    "authorization".to_owned()
}
fn default_expiry_margin_ms() -> u64 {
    5_000
}
fn default_negative_cache_ms() -> u64 {
    5_000
}
fn default_fetch_deadline_ms() -> u64 {
    FetchConfig::default().deadline_ms
}

impl Default for CompanionConfig {
    fn default() -> Self {
        Self {
            cluster: "tokengate_companion".to_owned(),
            authority: "tokengate-companion".to_owned(),
            timeout_ms: 40_000,
            retry_after_ms: 5_000,
            local_fetches_per_minute: limit::DEFAULT_FETCHES_PER_MINUTE,
            api_key: None,
        }
    }
}

impl Default for TenantServiceConfig {
    fn default() -> Self {
        let fetch = FetchConfig::default();
        Self {
            cluster: "tenant_service".to_owned(),
            authority: "tenant-service".to_owned(),
            timeout_ms: fetch.tenant_service_timeout_ms,
            retries: fetch.tenant_service_retries,
            service_name: fetch.service_name,
        }
    }
}

impl Default for GenesysConfig {
    fn default() -> Self {
        let fetch = FetchConfig::default();
        Self {
            login_cluster_pattern: "genesys_{region}".to_owned(),
            timeout_ms: fetch.oauth_timeout_ms,
            retries: fetch.oauth_retries,
            login_hosts: BTreeMap::new(),
            default_region: None,
        }
    }
}

impl Default for WhatsappConfig {
    fn default() -> Self {
        let fetch = FetchConfig::default();
        Self {
            safety_buffer_secs: fetch.whatsapp_safety_buffer_secs,
            default_ttl_secs: fetch.whatsapp_default_ttl_secs,
        }
    }
}

/// The byte offset of serde_json's error position (1-based line, byte column).
fn offset_of(document: &[u8], line: usize, column: usize) -> usize {
    let line_start = if line <= 1 {
        0
    } else {
        document
            .iter()
            .enumerate()
            .filter(|(_, byte)| **byte == b'\n')
            .nth(line - 2)
            .map_or(document.len(), |(newline, _)| newline + 1)
    };
    line_start.saturating_add(column).min(document.len())
}

/// The field path (`companion.timeoutMs`, `purge.statuses[1]`; `.` for the document
/// itself) of byte `offset` of a JSON document, found by following its objects, keys
/// and arrays up to there. serde_json reports an error right after the key or value it
/// refused, so this names that field, as a path-tracking deserializer would, without
/// the code size of one (each configuration type deserialized twice).
fn path_at(document: &[u8], offset: usize) -> String {
    enum Level {
        Object { key: Option<String>, in_key: bool },
        Array { index: usize },
    }
    let prefix = document.get(..offset).unwrap_or(document);
    let mut levels = Vec::new();
    let mut at = 0;
    while let Some(&byte) = prefix.get(at) {
        match byte {
            b'{' => levels.push(Level::Object {
                key: None,
                in_key: true,
            }),
            b'[' => levels.push(Level::Array { index: 0 }),
            b'}' | b']' => {
                levels.pop();
            }
            b',' => match levels.last_mut() {
                Some(Level::Object { key, in_key }) => (*key, *in_key) = (None, true),
                Some(Level::Array { index }) => *index += 1,
                None => {}
            },
            b':' => {
                if let Some(Level::Object { in_key, .. }) = levels.last_mut() {
                    *in_key = false;
                }
            }
            b'"' => {
                let start = at + 1;
                let mut end = start;
                let mut escaped = false;
                while let Some(&byte) = prefix.get(end) {
                    if byte == b'"' && !escaped {
                        break;
                    }
                    escaped = byte == b'\\' && !escaped;
                    end += 1;
                }
                if let Some(Level::Object { key, in_key: true }) = levels.last_mut() {
                    let text = prefix.get(start..end).unwrap_or_default();
                    *key = Some(String::from_utf8_lossy(text).into_owned());
                }
                at = end;
            }
            _ => {}
        }
        at += 1;
    }
    let mut path = String::new();
    for level in &levels {
        match level {
            Level::Object { key: Some(key), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Level::Object { key: None, .. } => {}
            Level::Array { index } => path.push_str(&format!("[{index}]")),
        }
    }
    if path.is_empty() {
        ".".to_owned()
    } else {
        path
    }
}

/// A configuration the filter refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tokengate configuration at '{path}': {problem}")]
pub struct ConfigError {
    /// Dotted path of the offending field (`.` for the document itself).
    pub path: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FilterConfig {
    /// Parses and validates the filter configuration. An empty document means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}".as_slice()
        } else {
            bytes
        };
        // serde would also read the fields, in order, from an array.
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err(ConfigError {
                path: ".".to_owned(),
                problem: "the configuration must be a JSON object".to_owned(),
            });
        }
        let config: FilterConfig = serde_json::from_slice(bytes).map_err(|error| {
            // A syntax error's position takes in the character it refused (the start of
            // the value it refused); any other error's ends just before the value.
            let mut offset = offset_of(bytes, error.line(), error.column());
            if error.classify() == serde_json::error::Category::Syntax {
                offset = offset.saturating_sub(1);
            }
            ConfigError {
                path: path_at(bytes, offset),
                problem: error.to_string(),
            }
        })?;
        let mut config = config;
        config.provider_table =
            ProviderTable::from_documents(&config.providers).map_err(|error| ConfigError {
                path: format!("providers.{}", error.field),
                problem: error.problem,
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |path: &str, problem: &str| {
            Err(ConfigError {
                path: path.to_owned(),
                problem: problem.to_owned(),
            })
        };
        let valid_header = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        if !valid_header(&self.tenant_header) {
            return fail("tenantHeader", "must be a lower-case header name");
        }
        if !valid_header(&self.authorization_header) {
            return fail("authorizationHeader", "must be a lower-case header name");
        }
        for (path, value) in [
            ("companion.cluster", &self.companion.cluster),
            ("companion.authority", &self.companion.authority),
            ("tenantService.cluster", &self.tenant_service.cluster),
            ("tenantService.authority", &self.tenant_service.authority),
            (
                "tenantService.serviceName",
                &self.tenant_service.service_name,
            ),
        ] {
            if value.is_empty() {
                return fail(path, "must not be empty");
            }
        }
        if self.genesys.login_cluster_pattern.is_empty() {
            return fail("genesys.loginClusterPattern", "must not be empty");
        }
        for (path, value) in [
            ("companion.timeoutMs", self.companion.timeout_ms),
            ("tenantService.timeoutMs", self.tenant_service.timeout_ms),
            ("genesys.timeoutMs", self.genesys.timeout_ms),
            ("fetchDeadlineMs", self.fetch_deadline_ms),
            (
                "companion.localFetchesPerMinute",
                u64::from(self.companion.local_fetches_per_minute),
            ),
            ("cache.maxTenants", u64::from(self.cache.max_tenants)),
        ] {
            if value == 0 {
                return fail(path, "must be greater than 0");
            }
        }
        if self.companion.api_key.as_ref().is_some_and(|key| {
            key.is_empty() || !key.expose().bytes().all(|b| b.is_ascii_graphic())
        }) {
            return fail(
                "companion.apiKey",
                "must be printable ASCII without spaces, and not empty",
            );
        }
        if self.cache.max_tenants > MAX_TENANTS_LIMIT {
            return fail(
                "cache.maxTenants",
                &format!("must be at most {MAX_TENANTS_LIMIT}"),
            );
        }
        if self.negative_cache_ms > MAX_NEGATIVE_CACHE_MS {
            return fail(
                "negativeCacheMs",
                &format!(
                    "must be at most {MAX_NEGATIVE_CACHE_MS} (a fixed secret must be noticed soon)"
                ),
            );
        }
        if self.refresh_ahead.percent > 100 {
            return fail("refreshAhead.percent", "must be between 0 and 100");
        }
        if self.refresh_ahead.min_lead_ms <= self.expiry_margin_ms {
            return fail(
                "refreshAhead.minLeadMs",
                "must be greater than expiryMarginMs, or tokens stop being served before their refresh starts",
            );
        }
        if let Some(status) = self
            .purge
            .statuses
            .iter()
            .find(|status| !(100..=599).contains(*status))
        {
            return fail("purge.statuses", &format!("{status} is not an HTTP status"));
        }
        self.validate_providers()?;
        if let Some(region) = &self.genesys.default_region {
            if let Err(error) = self.regions().login_host(region) {
                return fail("genesys.defaultRegion", &error.message);
            }
        }
        Ok(())
    }

    /// Every provider named is configured, and every `oauth2` token endpoint has a cluster.
    fn validate_providers(&self) -> Result<(), ConfigError> {
        let unknown = |path: String, provider: &Provider| {
            self.provider_table
                .check(provider)
                .map_err(|error| ConfigError {
                    path,
                    problem: error
                        .message
                        .replace("unsupported provider type", "provider"),
                })
        };
        unknown("provider".to_owned(), &self.provider)?;
        for (route, provider) in &self.routes {
            unknown(format!("routes.{route}"), provider)?;
        }
        for spec in self.provider_table.iter() {
            let ProviderKind::Oauth2(oauth2) = &spec.kind else {
                continue;
            };
            if let Some(authority) = oauth2
                .authorities()
                .find(|authority| !self.token_endpoint_clusters.contains_key(*authority))
            {
                return Err(ConfigError {
                    path: format!("providers.{}", spec.name),
                    problem: format!(
                        "no Envoy cluster for its token endpoint '{authority}': add it to tokenEndpointClusters"
                    ),
                });
            }
        }
        if let Some((authority, _)) = self
            .token_endpoint_clusters
            .iter()
            .find(|(_, cluster)| cluster.is_empty())
        {
            return Err(ConfigError {
                path: format!("tokenEndpointClusters.{authority}"),
                problem: "must not be empty".to_owned(),
            });
        }
        Ok(())
    }

    /// The provider whose token a request on route `route_name` (inject mode) gets.
    pub fn provider_of_route(&self, route_name: Option<&str>) -> &Provider {
        route_name
            .and_then(|route| self.routes.get(route))
            .unwrap_or(&self.provider)
    }

    /// The Envoy cluster of the token endpoint at `authority`.
    pub fn token_endpoint_cluster(&self, authority: &str) -> Option<&str> {
        self.token_endpoint_clusters
            .get(authority)
            .map(String::as_str)
    }

    /// The region table with this configuration's overrides.
    pub fn regions(&self) -> RegionTable {
        RegionTable::with_overrides(self.genesys.login_hosts.clone())
    }

    /// The Envoy cluster that serves `region`'s login host.
    pub fn login_cluster(&self, region: &str) -> String {
        self.genesys
            .login_cluster_pattern
            .replace("{region}", region)
    }

    /// The slot tables of the gateway cache.
    pub fn slots(&self) -> Slots {
        Slots::new(self.cache.max_tenants)
    }

    /// The limit on purges and forced refreshes per key.
    pub fn refresh_throttle(&self) -> RefreshThrottle {
        RefreshThrottle {
            min_interval_ms: self.purge.min_interval_ms,
        }
    }

    /// The core fetch settings this configuration implies.
    /// The expiry margin and refresh lead, which core fits to each token's lifetime.
    pub fn lifetimes(&self) -> Lifetimes {
        Lifetimes {
            percent: self.refresh_ahead.percent,
            min_lead_ms: self.refresh_ahead.min_lead_ms,
            expiry_margin_ms: self.expiry_margin_ms,
        }
    }

    pub fn fetch_config(&self) -> FetchConfig {
        FetchConfig {
            service_name: self.tenant_service.service_name.clone(),
            tenant_service_timeout_ms: self.tenant_service.timeout_ms,
            tenant_service_retries: self.tenant_service.retries,
            oauth_timeout_ms: self.genesys.timeout_ms,
            oauth_retries: self.genesys.retries,
            regions: self.regions(),
            default_region: self.genesys.default_region.clone(),
            whatsapp_safety_buffer_secs: self.whatsapp.safety_buffer_secs,
            whatsapp_default_ttl_secs: self.whatsapp.default_ttl_secs,
            deadline_ms: self.fetch_deadline_ms,
            providers: self.provider_table.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_that_is_not_an_object_is_refused() {
        for text in ["[]", "[\"endpoint\"]", "\"inject\"", "42", "null"] {
            let error = FilterConfig::parse(text.as_bytes()).unwrap_err();
            assert_eq!(error.path, ".", "{text}");
        }
    }

    #[test]
    fn an_empty_document_means_all_defaults() {
        let config = FilterConfig::parse(b"").unwrap();
        assert_eq!(config, FilterConfig::parse(b"{}").unwrap());
        assert_eq!(config.provider, Provider::genesys());
        assert_eq!(config.mode, Mode::Inject);
        assert_eq!(config.tenant_header, "x-tenant-id");
        assert_eq!(config.login_cluster("eu-west-1"), "genesys_eu-west-1");
    }

    #[test]
    fn a_wrong_type_names_the_field_path() {
        let error = FilterConfig::parse(br#"{"companion":{"timeoutMs":"soon"}}"#).unwrap_err();
        assert_eq!(error.path, "companion.timeoutMs");
        assert!(error.problem.contains("invalid type"), "{error}");
    }

    #[test]
    fn paths_follow_nested_objects_arrays_and_lines() {
        for (document, path) in [
            (r#"{"purge":{"statuses":[401,"x"]}}"#, "purge.statuses[1]"),
            (
                "{\n  \"mode\": \"inject\",\n  \"companion\": {\n    \"timeoutMs\": \"soon\"\n  }\n}",
                "companion.timeoutMs",
            ),
            (r#"{"genesys":{"loginHost":{}}}"#, "genesys.loginHost"),
            (
                r#"{"genesys":{"loginHosts":{"a,b":"x","eu":7}}}"#,
                "genesys.loginHosts.eu",
            ),
            (r#"{"tenantHeader":"x-t","companion":7}"#, "companion"),
        ] {
            let error = FilterConfig::parse(document.as_bytes()).unwrap_err();
            assert_eq!(error.path, path, "{document}: {error}");
        }
    }

    #[test]
    fn an_unknown_field_is_rejected_by_name() {
        let error = FilterConfig::parse(br#"{"tenantHeadr":"x"}"#).unwrap_err();
        assert_eq!(error.path, "tenantHeadr");
        assert!(
            error.problem.contains("unknown field `tenantHeadr`"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_provider_is_rejected() {
        let error = FilterConfig::parse(br#"{"provider":"slack"}"#).unwrap_err();
        assert_eq!(error.path, "provider");
        assert_eq!(
            error.problem,
            "provider 'slack': must be one of 'genesys', 'whatsapp'"
        );
    }

    #[test]
    fn named_providers_with_their_clusters_and_routes_are_accepted() {
        let config = FilterConfig::parse(
            br#"{"provider":"crm",
                 "providers":{"crm":{"kind":"oauth2","tokenUrl":"https://idp.crm.example/token",
                                     "allowedTokenHosts":["idp.acme.example:8443"]},
                              "slack":{"kind":"static"}},
                 "tokenEndpointClusters":{"idp.crm.example":"crm_idp","idp.acme.example:8443":"acme_idp"},
                 "routes":{"chat":"slack","cc":"genesys"}}"#,
        )
        .unwrap();
        assert_eq!(config.provider_of_route(Some("chat")).as_str(), "slack");
        assert_eq!(config.provider_of_route(Some("other")).as_str(), "crm");
        assert_eq!(config.provider_of_route(None).as_str(), "crm");
        assert_eq!(
            config.token_endpoint_cluster("idp.acme.example:8443"),
            Some("acme_idp")
        );
        let fetch = config.fetch_config();
        assert!(
            fetch
                .providers
                .get(&Provider::parse("slack").unwrap())
                .is_some()
        );
    }

    #[test]
    fn invalid_providers_clusters_and_routes_are_rejected_with_their_field() {
        let crm = r#""crm":{"kind":"oauth2","tokenUrl":"https://idp.crm.example/token"}"#;
        for (document, path, problem) in [
            (
                format!(r#"{{"providers":{{{crm}}}}}"#),
                "providers.crm",
                "no Envoy cluster for its token endpoint 'idp.crm.example'",
            ),
            (
                r#"{"providers":{"crm":{"kind":"oauth2"}}}"#.to_owned(),
                "providers.crm.tokenUrl",
                "is required",
            ),
            (
                r#"{"providers":{"crm":{"kind":"oauth2","scopes":"x"}}}"#.to_owned(),
                "providers.crm.scopes",
                "unknown field",
            ),
            (
                r#"{"routes":{"chat":"slack"}}"#.to_owned(),
                "routes.chat",
                "provider 'slack'",
            ),
            (
                format!(
                    r#"{{"providers":{{{crm}}},"tokenEndpointClusters":{{"idp.crm.example":""}}}}"#
                ),
                "tokenEndpointClusters.idp.crm.example",
                "must not be empty",
            ),
        ] {
            let error = FilterConfig::parse(document.as_bytes()).unwrap_err();
            assert_eq!(error.path, path, "{document}: {error}");
            assert!(error.problem.contains(problem), "{document}: {error}");
        }
    }

    #[test]
    fn invalid_values_are_rejected_with_their_field() {
        for (document, path) in [
            (r#"{"tenantHeader":"X Tenant"}"#, "tenantHeader"),
            (r#"{"companion":{"timeoutMs":0}}"#, "companion.timeoutMs"),
            (
                r#"{"tenantService":{"cluster":""}}"#,
                "tenantService.cluster",
            ),
            (
                r#"{"genesys":{"defaultRegion":"mars-1"}}"#,
                "genesys.defaultRegion",
            ),
            (r#"{"mode":"proxy"}"#, "mode"),
            (r#"{"fetch":"sidecar"}"#, "fetch"),
            (r#"{"companion":{"apiKey":""}}"#, "companion.apiKey"),
            (
                r#"{"refreshAhead":{"minLeadMs":1000}}"#,
                "refreshAhead.minLeadMs",
            ),
            (r#"{"purge":{"statuses":[401,42]}}"#, "purge.statuses"),
            ("42", "."),
            ("{", "."),
        ] {
            let error = FilterConfig::parse(document.as_bytes()).unwrap_err();
            assert_eq!(error.path, path, "{document}: {error}");
        }
    }

    #[test]
    fn overrides_reach_the_fetch_config() {
        let config = FilterConfig::parse(
            br#"{"genesys":{"loginHosts":{"eu-west-1":"login.eu.test"},"retries":4},"tenantService":{"serviceName":"gw"}}"#,
        )
        .unwrap();
        let fetch = config.fetch_config();
        assert_eq!(
            fetch.regions.login_host("eu-west-1").unwrap(),
            "login.eu.test"
        );
        assert_eq!(
            (fetch.oauth_retries, fetch.service_name.as_str()),
            (4, "gw")
        );
    }
}
