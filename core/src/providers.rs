//! The providers a deployment configures, by name, and what kind each is.
//!
//! `genesys` (the Genesys Cloud exchange, region table) and `whatsapp` (a static token
//! from the Tenant Service) are always there. An operator adds others, in the filter's
//! `providers` and the companion's `--providers-file`, with the same JSON document:
//!
//! ```json
//! {
//!   "crm": {
//!     "kind": "oauth2",
//!     "tokenUrl": "https://idp.crm.example/oauth2/token",
//!     "clientAuth": "client_secret_post",
//!     "scope": "crm.read crm.write"
//!   },
//!   "slack": { "kind": "static", "defaultTtlSecs": 3600 }
//! }
//! ```
//!
//! Kinds: `genesys`, `whatsapp`, `oauth2` (RFC 6749 section 4.4 client credentials at
//! any token endpoint) and `static` (a token the Tenant Service holds, as WhatsApp's).
//! A provider's Tenant Service path is `tenantServicePath`, by default
//! `/tenants/{tenant}/credentials/{provider}`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

use crate::error::{ErrorCode, TokenError};
use crate::provider::{GENESYS, Provider, WHATSAPP, printable};

/// The Tenant Service path of a provider that names none.
pub const DEFAULT_TENANT_SERVICE_PATH: &str = "/tenants/{tenant}/credentials/{provider}";

/// Form parameters an `oauth2` provider's `extraParams` may not set: tokengate sends them.
const RESERVED_PARAMS: [&str; 6] = [
    "grant_type",
    "scope",
    "audience",
    "resource",
    "client_id",
    "client_secret",
];

/// One provider: its name, kind and where its credentials are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSpec {
    /// The provider's name.
    pub name: Provider,
    /// How its tokens are obtained.
    pub kind: ProviderKind,
    /// The Tenant Service path of a tenant's credentials, with `{tenant}` and
    /// `{provider}` in it.
    pub tenant_service_path: String,
}

/// How a provider's tokens are obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    /// The Genesys Cloud client-credentials exchange at the tenant region's login host.
    Genesys,
    /// A WhatsApp system-user token, with the deployment's WhatsApp lifetimes.
    Whatsapp,
    /// Generic OAuth 2.0 client credentials (RFC 6749 section 4.4).
    Oauth2(Box<OAuth2Spec>),
    /// A token the Tenant Service holds, with or without an expiry.
    Static(StaticSpec),
}

/// An `oauth2` provider's token endpoint and request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Spec {
    /// The token endpoint used unless the tenant's credentials name an allowed one.
    pub token_url: Option<EndpointUrl>,
    /// Authorities (`host` or `host:port`) a tenant's credentials may name in their
    /// `tokenUrl`; empty: the tenant cannot choose.
    pub allowed_token_hosts: Vec<String>,
    /// How the client authenticates.
    pub client_auth: ClientAuth,
    /// `scope`, when set.
    pub scope: Option<String>,
    /// `audience`, when set (Auth0, Okta and others).
    pub audience: Option<String>,
    /// `resource` (RFC 8707), when set.
    pub resource: Option<String>,
    /// More form parameters, sent as they are.
    pub extra_params: BTreeMap<String, String>,
    /// The lifetime of a token whose answer has no `expires_in`; without it, such an
    /// answer is unusable.
    pub default_expires_in_secs: Option<u64>,
    /// Per-attempt timeout of the exchange, instead of the deployment's.
    pub timeout_ms: Option<u64>,
    /// Retries of the exchange, instead of the deployment's.
    pub retries: Option<u32>,
}

/// A `static` provider's token lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticSpec {
    /// A token is treated as expired this long before its `expiresAt`.
    pub safety_buffer_secs: u64,
    /// Lifetime given to a token that has no `expiresAt`.
    pub default_ttl_secs: u64,
}

impl Default for StaticSpec {
    fn default() -> Self {
        Self {
            safety_buffer_secs: 300,
            default_ttl_secs: 3_600,
        }
    }
}

/// How an `oauth2` client authenticates at the token endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// `Authorization: Basic` of the form-encoded id and secret.
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}
crate::deserialize_unit_enum!(ClientAuth {
    "client_secret_basic" => ClientSecretBasic,
    "client_secret_post" => ClientSecretPost,
});

/// `http` or `https`: the companion calls the URL; the filter's Envoy cluster decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (a loopback or mesh-internal server).
    Http,
    /// HTTPS.
    Https,
}

/// A token endpoint's URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host` or `host:port`, lower case.
    pub authority: String,
    /// The path (with its query, if any).
    pub path: String,
}

impl EndpointUrl {
    /// Reads `http(s)://authority/path`; `None` for anything else (userinfo, a
    /// fragment, no path, characters a URL cannot hold).
    pub fn parse(url: &str) -> Option<Self> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else {
            (Scheme::Http, url.strip_prefix("http://")?)
        };
        let slash = rest.find('/')?;
        let (authority, path) = rest.split_at(slash);
        let authority_char =
            |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
        let path_char = |c: char| c.is_ascii_graphic() && c != '#';
        if authority.is_empty() || !authority.chars().all(authority_char) {
            return None;
        }
        if !path.chars().all(path_char) {
            return None;
        }
        Some(Self {
            scheme,
            authority: authority.to_ascii_lowercase(),
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

/// A provider as the configuration writes it (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderDocument {
    /// `genesys`, `whatsapp`, `oauth2` or `static`.
    pub kind: Option<String>,
    /// The Tenant Service path, with `{tenant}` and `{provider}`.
    pub tenant_service_path: Option<String>,
    /// `oauth2`: the token endpoint.
    pub token_url: Option<String>,
    /// `oauth2`: authorities a tenant's `tokenUrl` may name.
    #[serde(default)]
    pub allowed_token_hosts: Vec<String>,
    /// `oauth2`: `client_secret_basic` (default) or `client_secret_post`.
    pub client_auth: Option<ClientAuth>,
    /// `oauth2`: `scope`.
    pub scope: Option<String>,
    /// `oauth2`: `audience`.
    pub audience: Option<String>,
    /// `oauth2`: `resource`.
    pub resource: Option<String>,
    /// `oauth2`: more form parameters.
    #[serde(default)]
    pub extra_params: BTreeMap<String, String>,
    /// `oauth2`: lifetime of a token answered without `expires_in`.
    pub default_expires_in_secs: Option<u64>,
    /// `oauth2`: per-attempt timeout.
    pub timeout_ms: Option<u64>,
    /// `oauth2`: retries.
    pub retries: Option<u32>,
    /// `static`: seconds before `expiresAt` a token stops being used.
    pub safety_buffer_secs: Option<u64>,
    /// `static`: lifetime of a token without `expiresAt`.
    pub default_ttl_secs: Option<u64>,
}

/// A provider document that cannot be used: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ProviderError {
    /// The field's path below the providers object, e.g. `crm.tokenUrl`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

impl ProviderSpec {
    /// Validates the document of provider `name`.
    pub fn from_document(name: &str, document: &ProviderDocument) -> Result<Self, ProviderError> {
        let fail = |field: &str, problem: String| {
            Err(ProviderError {
                field: if field.is_empty() {
                    name.to_owned()
                } else {
                    format!("{name}.{field}")
                },
                problem,
            })
        };
        let provider = match Provider::parse(name) {
            Ok(provider) => provider,
            Err(error) => return fail("", error.message),
        };
        let Some(kind) = document.kind.as_deref() else {
            return fail(
                "kind",
                "is required: genesys, whatsapp, oauth2 or static".to_owned(),
            );
        };
        let builtin = [(GENESYS, "genesys"), (WHATSAPP, "whatsapp")];
        if let Some((_, builtin_kind)) = builtin.iter().find(|(builtin, _)| *builtin == name) {
            if kind != *builtin_kind {
                return fail(
                    "kind",
                    format!("the built-in provider '{name}' is of kind {builtin_kind}"),
                );
            }
        }
        let tenant_service_path = document
            .tenant_service_path
            .clone()
            .unwrap_or_else(|| DEFAULT_TENANT_SERVICE_PATH.to_owned());
        if let Err(problem) = check_tenant_service_path(&tenant_service_path) {
            return fail("tenantServicePath", problem);
        }
        let oauth2_fields = [
            ("tokenUrl", document.token_url.is_some()),
            (
                "allowedTokenHosts",
                !document.allowed_token_hosts.is_empty(),
            ),
            ("clientAuth", document.client_auth.is_some()),
            ("scope", document.scope.is_some()),
            ("audience", document.audience.is_some()),
            ("resource", document.resource.is_some()),
            ("extraParams", !document.extra_params.is_empty()),
            (
                "defaultExpiresInSecs",
                document.default_expires_in_secs.is_some(),
            ),
            ("timeoutMs", document.timeout_ms.is_some()),
            ("retries", document.retries.is_some()),
        ];
        let static_fields = [
            ("safetyBufferSecs", document.safety_buffer_secs.is_some()),
            ("defaultTtlSecs", document.default_ttl_secs.is_some()),
        ];
        let stray = |fields: &[(&'static str, bool)]| {
            fields
                .iter()
                .find(|(_, present)| *present)
                .map(|(field, _)| *field)
        };
        let kind = match kind {
            "genesys" | "whatsapp" => {
                if let Some(field) = stray(&oauth2_fields).or(stray(&static_fields)) {
                    return fail(field, format!("does not apply to kind {kind}"));
                }
                if kind == "genesys" {
                    ProviderKind::Genesys
                } else {
                    ProviderKind::Whatsapp
                }
            }
            "static" => {
                if let Some(field) = stray(&oauth2_fields) {
                    return fail(field, "applies to kind oauth2 only".to_owned());
                }
                let defaults = StaticSpec::default();
                ProviderKind::Static(StaticSpec {
                    safety_buffer_secs: document
                        .safety_buffer_secs
                        .unwrap_or(defaults.safety_buffer_secs),
                    default_ttl_secs: document
                        .default_ttl_secs
                        .unwrap_or(defaults.default_ttl_secs),
                })
            }
            "oauth2" => {
                if let Some(field) = stray(&static_fields) {
                    return fail(field, "applies to kind static only".to_owned());
                }
                match OAuth2Spec::from_document(document) {
                    Ok(spec) => ProviderKind::Oauth2(Box::new(spec)),
                    Err((field, problem)) => return fail(field, problem),
                }
            }
            other => {
                return fail(
                    "kind",
                    format!(
                        "'{}' is not a kind: genesys, whatsapp, oauth2 or static",
                        printable(other)
                    ),
                );
            }
        };
        Ok(Self {
            name: provider,
            kind,
            tenant_service_path,
        })
    }

    /// The Tenant Service path of `tenant`'s credentials.
    pub fn tenant_service_path(&self, tenant: &str) -> String {
        self.tenant_service_path
            .replace("{tenant}", tenant)
            .replace("{provider}", self.name.as_str())
    }

    /// How messages name the provider: `Genesys`, `WhatsApp` or its name.
    pub fn display_name(&self) -> &str {
        match self.kind {
            ProviderKind::Genesys if self.name.as_str() == GENESYS => "Genesys",
            ProviderKind::Whatsapp if self.name.as_str() == WHATSAPP => "WhatsApp",
            _ => self.name.as_str(),
        }
    }
}

impl OAuth2Spec {
    fn from_document(document: &ProviderDocument) -> Result<Self, (&'static str, String)> {
        let token_url = match document.token_url.as_deref() {
            Some(url) => Some(EndpointUrl::parse(url).ok_or((
                "tokenUrl",
                "must be an http:// or https:// URL with a host and a path".to_owned(),
            ))?),
            None => None,
        };
        if token_url.is_none() && document.allowed_token_hosts.is_empty() {
            return Err((
                "tokenUrl",
                "is required unless allowedTokenHosts lets each tenant's credentials name it"
                    .to_owned(),
            ));
        }
        let mut allowed_token_hosts = Vec::new();
        for host in &document.allowed_token_hosts {
            let parsed = EndpointUrl::parse(&format!("https://{host}/"))
                .filter(|url| url.path == "/")
                .ok_or((
                    "allowedTokenHosts",
                    format!("'{}' is not a host or host:port", printable(host)),
                ))?;
            allowed_token_hosts.push(parsed.authority);
        }
        if let Some(param) = document
            .extra_params
            .keys()
            .find(|param| RESERVED_PARAMS.contains(&param.as_str()))
        {
            return Err((
                "extraParams",
                format!("'{param}' is set by tokengate and may not be overridden"),
            ));
        }
        for (field, value) in [
            ("scope", &document.scope),
            ("audience", &document.audience),
            ("resource", &document.resource),
        ] {
            if value.as_deref().is_some_and(str::is_empty) {
                return Err((field, "must not be empty (leave it out instead)".to_owned()));
            }
        }
        if document.default_expires_in_secs == Some(0) {
            return Err(("defaultExpiresInSecs", "must be greater than 0".to_owned()));
        }
        if document.timeout_ms == Some(0) {
            return Err(("timeoutMs", "must be greater than 0".to_owned()));
        }
        Ok(Self {
            token_url,
            allowed_token_hosts,
            client_auth: document.client_auth.unwrap_or_default(),
            scope: document.scope.clone(),
            audience: document.audience.clone(),
            resource: document.resource.clone(),
            extra_params: document.extra_params.clone(),
            default_expires_in_secs: document.default_expires_in_secs,
            timeout_ms: document.timeout_ms,
            retries: document.retries,
        })
    }

    /// Every authority this provider may call: the fixed endpoint's and the allowed ones.
    pub fn authorities(&self) -> impl Iterator<Item = &str> {
        self.token_url
            .iter()
            .map(|url| url.authority.as_str())
            .chain(self.allowed_token_hosts.iter().map(String::as_str))
    }

    /// The token endpoint for a tenant whose credentials name `tenant_url` (or none):
    /// the tenant's when its authority is allowed, else the fixed one.
    pub fn endpoint_for(&self, tenant_url: Option<&str>) -> Result<EndpointUrl, String> {
        match tenant_url {
            Some(url) => {
                let parsed = EndpointUrl::parse(url)
                    .ok_or("the tenant's tokenUrl is not an http(s) URL with a path")?;
                if self
                    .authorities()
                    .any(|allowed| allowed == parsed.authority)
                {
                    Ok(parsed)
                } else {
                    Err(format!(
                        "the tenant's tokenUrl names host '{}', which is not allowed",
                        printable(&parsed.authority)
                    ))
                }
            }
            None => self
                .token_url
                .clone()
                .ok_or_else(|| "the tenant's credentials name no tokenUrl".to_owned()),
        }
    }
}

fn check_tenant_service_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("must start with '/'".to_owned());
    }
    if !path.contains("{tenant}") {
        return Err("must contain {tenant}".to_owned());
    }
    let rest = path.replace("{tenant}", "").replace("{provider}", "");
    if rest.contains(['{', '}']) {
        return Err("only {tenant} and {provider} may be placed in it".to_owned());
    }
    if !rest.chars().all(|c| c.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".to_owned());
    }
    Ok(())
}

/// Every configured provider by name: the built-in `genesys` and `whatsapp` and the
/// operator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderTable {
    providers: BTreeMap<Provider, ProviderSpec>,
}

impl Default for ProviderTable {
    fn default() -> Self {
        let builtin = |name: Provider, kind| {
            (
                name.clone(),
                ProviderSpec {
                    name,
                    kind,
                    tenant_service_path: DEFAULT_TENANT_SERVICE_PATH.to_owned(),
                },
            )
        };
        Self {
            providers: BTreeMap::from([
                builtin(Provider::genesys(), ProviderKind::Genesys),
                builtin(Provider::whatsapp(), ProviderKind::Whatsapp),
            ]),
        }
    }
}

impl ProviderTable {
    /// The built-in providers and `documents` (which may redefine a built-in one's
    /// Tenant Service path).
    pub fn from_documents(
        documents: &BTreeMap<String, ProviderDocument>,
    ) -> Result<Self, ProviderError> {
        let mut table = Self::default();
        for (name, document) in documents {
            let spec = ProviderSpec::from_document(name, document)?;
            table.providers.insert(spec.name.clone(), spec);
        }
        Ok(table)
    }

    /// The provider called `name`.
    pub fn get(&self, name: &Provider) -> Option<&ProviderSpec> {
        self.providers.get(name)
    }

    /// Every provider, by name.
    pub fn iter(&self) -> impl Iterator<Item = &ProviderSpec> {
        self.providers.values()
    }

    /// The configured provider called `name`, or `INVALID_REQUEST` naming the
    /// configured ones.
    pub fn resolve(&self, name: &str) -> Result<Provider, TokenError> {
        let provider = Provider::parse(name)?;
        self.check(&provider)?;
        Ok(provider)
    }

    /// `INVALID_REQUEST` naming the configured providers unless `provider` is one.
    pub fn check(&self, provider: &Provider) -> Result<(), TokenError> {
        if self.providers.contains_key(provider) {
            return Ok(());
        }
        let names: Vec<String> = self
            .providers
            .keys()
            .map(|name| format!("'{name}'"))
            .collect();
        Err(TokenError::new(
            ErrorCode::InvalidRequest,
            format!(
                "unsupported provider type '{provider}': must be one of {}",
                names.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn document(json: &str) -> ProviderDocument {
        serde_json::from_str(json).unwrap()
    }

    fn spec(name: &str, json: &str) -> Result<ProviderSpec, ProviderError> {
        ProviderSpec::from_document(name, &document(json))
    }

    #[test]
    fn an_oauth2_provider_takes_its_endpoint_auth_and_parameters() {
        let crm = spec(
            "crm",
            r#"{"kind":"oauth2","tokenUrl":"https://IdP.crm.example:8443/oauth2/token",
                "clientAuth":"client_secret_post","scope":"crm.read","audience":"api",
                "extraParams":{"tenant":"eu"},"defaultExpiresInSecs":600}"#,
        )
        .unwrap();
        let ProviderKind::Oauth2(oauth2) = &crm.kind else {
            panic!("expected oauth2, got {:?}", crm.kind);
        };
        let url = oauth2.token_url.as_ref().unwrap();
        assert_eq!(
            (url.scheme, url.authority.as_str(), url.path.as_str()),
            (Scheme::Https, "idp.crm.example:8443", "/oauth2/token")
        );
        assert_eq!(oauth2.client_auth, ClientAuth::ClientSecretPost);
        assert_eq!(oauth2.scope.as_deref(), Some("crm.read"));
        assert_eq!(oauth2.default_expires_in_secs, Some(600));
        assert_eq!(
            crm.tenant_service_path("acme"),
            "/tenants/acme/credentials/crm"
        );
    }

    #[test]
    fn a_tenant_may_name_only_an_allowed_token_endpoint() {
        let crm = spec(
            "crm",
            r#"{"kind":"oauth2","allowedTokenHosts":["idp.a.example","127.0.0.1:9000"]}"#,
        )
        .unwrap();
        let ProviderKind::Oauth2(oauth2) = &crm.kind else {
            panic!("expected oauth2");
        };
        let allowed = oauth2
            .endpoint_for(Some("http://127.0.0.1:9000/token"))
            .unwrap();
        assert_eq!(allowed.to_string(), "http://127.0.0.1:9000/token");
        // A host-only entry: that host in any case, by either scheme, on the scheme's
        // default port only (an explicit port, even 443, must be listed as host:port).
        for url in ["https://IDP.A.example/token", "http://idp.a.example/t?x=1"] {
            assert!(oauth2.endpoint_for(Some(url)).is_ok(), "{url}");
        }
        for (url, why) in [
            (Some("https://idp.a.example:443/token"), "not allowed"),
            (Some("https://idp.a.example:8443/token"), "not allowed"),
            (Some("https://sub.idp.a.example/token"), "not allowed"),
            (Some("http://127.0.0.1/token"), "not allowed"),
            (Some("https://evil.example/token"), "not allowed"),
            (
                Some("https://idp.a.example@evil.example/t"),
                "not an http(s) URL",
            ),
            (Some("ftp://idp.a.example/token"), "not an http(s) URL"),
            (None, "name no tokenUrl"),
        ] {
            let problem = oauth2.endpoint_for(url).unwrap_err();
            assert!(problem.contains(why), "{url:?}: {problem}");
        }
    }

    #[test]
    fn invalid_provider_documents_name_the_field_and_the_problem() {
        for (name, json, field, problem) in [
            ("crm", r#"{}"#, "crm.kind", "is required"),
            ("crm", r#"{"kind":"saml"}"#, "crm.kind", "not a kind"),
            ("CRM", r#"{"kind":"static"}"#, "CRM", "provider name"),
            (
                "genesys",
                r#"{"kind":"oauth2"}"#,
                "genesys.kind",
                "kind genesys",
            ),
            ("crm", r#"{"kind":"oauth2"}"#, "crm.tokenUrl", "is required"),
            (
                "crm",
                r#"{"kind":"oauth2","tokenUrl":"idp/token"}"#,
                "crm.tokenUrl",
                "URL",
            ),
            (
                "crm",
                r#"{"kind":"oauth2","tokenUrl":"https://i/t","extraParams":{"scope":"x"}}"#,
                "crm.extraParams",
                "'scope'",
            ),
            (
                "crm",
                r#"{"kind":"oauth2","tokenUrl":"https://i/t","defaultTtlSecs":5}"#,
                "crm.defaultTtlSecs",
                "kind static only",
            ),
            (
                "slack",
                r#"{"kind":"static","scope":"x"}"#,
                "slack.scope",
                "oauth2 only",
            ),
            (
                "slack",
                r#"{"kind":"static","tenantServicePath":"/t/{id}"}"#,
                "slack.tenantServicePath",
                "{tenant}",
            ),
            (
                "crm",
                r#"{"kind":"oauth2","allowedTokenHosts":["a/b"]}"#,
                "crm.allowedTokenHosts",
                "not a host",
            ),
        ] {
            let error = spec(name, json).unwrap_err();
            assert_eq!(error.field, field, "{json}");
            assert!(error.problem.contains(problem), "{json}: {}", error.problem);
        }
    }

    #[test]
    fn an_endpoint_url_holds_no_fragment_and_no_character_outside_a_url() {
        let url = EndpointUrl::parse("https://idp.example/oauth/token?a=1").unwrap();
        assert_eq!(url.path, "/oauth/token?a=1");
        for url in [
            "https://idp.example/oauth/token#part",
            "https://idp.example/oauth token",
            "https://idp.example/oauth/tökén",
            "https://idp.example",
        ] {
            assert_eq!(EndpointUrl::parse(url), None, "{url}");
        }
    }

    #[test]
    fn messages_name_the_built_ins_by_brand_and_other_providers_by_their_name() {
        let table = ProviderTable::default();
        let genesys = table.get(&Provider::genesys()).unwrap();
        assert_eq!(genesys.display_name(), "Genesys");
        let whatsapp = table.get(&Provider::whatsapp()).unwrap();
        assert_eq!(whatsapp.display_name(), "WhatsApp");
        for (name, kind) in [("genesys_us", "genesys"), ("wa_eu", "whatsapp")] {
            let spec = spec(name, &format!(r#"{{"kind":"{kind}"}}"#)).unwrap();
            assert_eq!(spec.display_name(), name);
        }
    }

    #[test]
    fn the_table_holds_the_built_ins_and_names_its_providers_when_asked_for_another() {
        let documents = BTreeMap::from([
            ("slack".to_owned(), document(r#"{"kind":"static"}"#)),
            (
                "whatsapp".to_owned(),
                document(r#"{"kind":"whatsapp","tenantServicePath":"/v2/{tenant}/wa"}"#),
            ),
        ]);
        let table = ProviderTable::from_documents(&documents).unwrap();
        assert_eq!(table.resolve("genesys"), Ok(Provider::genesys()));
        let whatsapp = table.get(&Provider::whatsapp()).unwrap();
        assert_eq!(whatsapp.tenant_service_path("acme"), "/v2/acme/wa");
        assert_eq!(whatsapp.display_name(), "WhatsApp");
        let error = table.resolve("crm").unwrap_err();
        assert_eq!(error.code, ErrorCode::InvalidRequest);
        assert_eq!(
            error.message,
            "unsupported provider type 'crm': must be one of 'genesys', 'slack', 'whatsapp'"
        );
    }
}
