//! The filter configuration parser: `FilterConfig::parse`, which the filter's
//! `on_configure` calls with the raw bytes of Envoy's plugin `configuration`.
//!
//! Checks: an accepted configuration satisfies every documented constraint (the
//! named providers, their token endpoints' clusters and the routes' providers among
//! them); an error
//! names a field path and a problem, and for a well-formed JSON document that path
//! leads to a field of it; neither repeats the companion's API key.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::collections::HashSet;
use std::fmt;
use tokengate::config::{ConfigError, FilterConfig};
use tokengate_core::providers::ProviderKind;
use tokengate_fuzz::{assert_hidden, plant_secret};

fuzz_target!(|document: &[u8]| {
    check(document);
    if let Some(planted) = plant_secret(document, &["/companion/apiKey"]) {
        assert_hidden("the parsed configuration or its error", &check(&planted));
    }
});

/// Parses `document`, checks the result and returns what it would show (`Debug` of
/// the configuration, or the error as logged).
fn check(document: &[u8]) -> String {
    match FilterConfig::parse(document) {
        Ok(config) => {
            assert_constraints_hold(&config);
            if document.iter().all(u8::is_ascii_whitespace) {
                assert_eq!(
                    FilterConfig::parse(b"{}").as_ref(),
                    Ok(&config),
                    "blank means defaults"
                );
            }
            format!("{config:?}")
        }
        Err(error) => {
            assert!(
                !error.path.is_empty() && !error.problem.is_empty(),
                "an error names its field and problem: {error:?}"
            );
            assert_path_leads_to_a_field(document, &error);
            format!("{error} {error:?}")
        }
    }
}

/// A document that is JSON but not a configuration is refused at a field it has.
/// Skipped where the path cannot be followed unambiguously: keys with escapes, `.`
/// or brackets, repeated keys (`Value` keeps the last one only), and errors of the
/// validation after parsing (their paths are fixed, the field may be a default).
fn assert_path_leads_to_a_field(document: &[u8], error: &ConfigError) {
    let Ok(value) = serde_json::from_slice::<Value>(document) else {
        return;
    };
    if document.contains(&b'\\')
        || !error.problem.contains(" at line ")
        || !plain_keys(&value)
        || serde_json::from_slice::<UniqueKeys>(document).is_err()
    {
        return;
    }
    let mut at = &value;
    if error.path != "." {
        for part in error.path.split('.') {
            let (key, indexes) = part.split_once('[').unwrap_or((part, ""));
            // `[0]` alone: an element of an array (serde reads a struct from one too).
            if !(key.is_empty() && at.is_array()) {
                at = at
                    .get(key)
                    .unwrap_or_else(|| panic!("{error} names no field"));
            }
            for index in indexes.split('[').filter(|index| !index.is_empty()) {
                let index: usize = index.trim_end_matches(']').parse().expect("an index");
                at = at
                    .get(index)
                    .unwrap_or_else(|| panic!("{error} names no element"));
            }
        }
    }
}

/// Whether no key of `value` holds a character that a path uses as a separator.
fn plain_keys(value: &Value) -> bool {
    match value {
        Value::Object(fields) => fields
            .iter()
            .all(|(key, field)| !key.contains(['.', '[', ']']) && plain_keys(field)),
        Value::Array(items) => items.iter().all(plain_keys),
        _ => true,
    }
}

/// Any JSON value whose objects repeat no key.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<UniqueKeys, A::Error> {
        while items.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut fields: A) -> Result<UniqueKeys, A::Error> {
        let mut keys = HashSet::new();
        while let Some(key) = fields.next_key::<String>()? {
            if !keys.insert(key) {
                return Err(A::Error::custom("a repeated key"));
            }
            fields.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}

/// The constraints `FilterConfig::parse` promises for an accepted document.
fn assert_constraints_hold(config: &FilterConfig) {
    let header_name = |name: &str| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    assert!(header_name(&config.tenant_header), "{config:?}");
    assert!(header_name(&config.authorization_header), "{config:?}");
    let fetch = config.fetch_config();
    assert!(
        fetch.deadline_ms > 0
            && fetch.tenant_service_timeout_ms > 0
            && fetch.oauth_timeout_ms > 0
            && config.companion.timeout_ms > 0
            && config.companion.local_fetches_per_minute > 0,
        "{config:?}"
    );
    assert!(
        !config.companion.cluster.is_empty()
            && !config.tenant_service.cluster.is_empty()
            && !fetch.service_name.is_empty(),
        "{config:?}"
    );
    assert!(config.refresh_ahead.percent <= 100, "{config:?}");
    assert!(
        config.refresh_ahead.min_lead_ms > config.expiry_margin_ms,
        "{config:?}"
    );
    assert!(
        config
            .purge
            .statuses
            .iter()
            .all(|status| (100..=599).contains(status)),
        "{config:?}"
    );
    if let Some(key) = &config.companion.api_key {
        assert!(
            !key.is_empty() && key.expose().bytes().all(|b| b.is_ascii_graphic()),
            "{config:?}"
        );
    }
    if let Some(region) = &fetch.default_region {
        assert!(fetch.regions.login_host(region).is_ok(), "{config:?}");
    }
    // Every provider named is configured; every oauth2 token endpoint has a cluster;
    // every Tenant Service path names the tenant.
    for provider in std::iter::once(&config.provider).chain(config.routes.values()) {
        assert!(fetch.providers.get(provider).is_some(), "{config:?}");
    }
    for spec in fetch.providers.iter() {
        assert!(spec.tenant_service_path("t").starts_with('/'), "{config:?}");
        assert!(spec.tenant_service_path.contains("{tenant}"), "{config:?}");
        if let ProviderKind::Oauth2(oauth2) = &spec.kind {
            assert!(
                oauth2.token_url.is_some() || !oauth2.allowed_token_hosts.is_empty(),
                "{config:?}"
            );
            for authority in oauth2.authorities() {
                assert!(
                    config
                        .token_endpoint_cluster(authority)
                        .is_some_and(|cluster| !cluster.is_empty()),
                    "{config:?}"
                );
            }
        }
    }
}
