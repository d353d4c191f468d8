//! Each worker's own token cache: the ready `Bearer …` value of the tokens its
//! requests were served lately, so that a cache hit reads no shared data (a host mutex,
//! a string key and a copy of the record into the VM) and formats nothing.
//!
//! It is a copy of the gateway cache (the slot tables of [`crate::slots`]), kept
//! coherent with it by write generations: the keys are spread over
//! [`GENERATION_BUCKETS`] buckets by a hash of `provider:tenant`, each with a counter
//! that every worker of the Envoy reads and bumps (in proxy-wasm, an Envoy stat:
//! `proxy_get_metric`, a hash lookup and an atomic load). The rules:
//!
//! 1. Every write of a key's slot in the token table (a new token, a refresh, a
//!    postponed refresh, a purge, and the key whose record a write pushes out) bumps
//!    the key's bucket *after* the write ([`crate::slots::Slots`] does it).
//! 2. A worker filling its cache reads the bucket's generation *before* it reads the
//!    slot, and keeps the token with that generation.
//! 3. A hit serves a kept token only while its bucket still reads that generation
//!    (and while the token is servable by the clock, checked on every hit).
//!
//! Why no token outlives a write: take a write W of key K's slot, bumped by B after it.
//! A kept token read the slot at R, after reading generation g at G (rule 2). If R saw
//! W's value, the token is W's own. If not, W came after R in the host's order of
//! shared data, so B came after G, so g does not count B and every hit after B reads a
//! later generation and refills (rule 3). A hit that runs while W is done but B is not
//! yet may serve the value W replaced: the write is complete, for hits, when its bump
//! is. A purge clears the slot and bumps before the worker that purged returns, so no
//! request that starts after a purge at this Envoy is served the purged token, on any
//! worker. The bound is thus the write itself, not a delay: no hit serves a value
//! older than the last completed write of its key. Writes to other keys of the same
//! bucket only cost a refill (a shared read, as without this cache).
//!
//! A host without generations (the native build, whose records are in process memory)
//! keeps no such cache: every hit reads the gateway cache.

use std::collections::HashMap;
use std::sync::Arc;

use tokengate_core::cache::GatewayEntry;

use crate::delivery;
use tokengate_core::{CachedToken, SecretString, TokenKey};

/// How many generation counters the keys are spread over.
pub const GENERATION_BUCKETS: u32 = 64;

/// Most tokens a worker keeps (fewer when `cache.maxTenants` is smaller): at a few
/// hundred bytes a token, a few MB per worker.
pub const MAX_READY_TOKENS: u32 = 16_384;

/// The bucket of `key`.
pub fn bucket_of(key: &TokenKey) -> u32 {
    bucket_of_name(
        key.provider
            .as_str()
            .bytes()
            .chain([b':'])
            .chain(key.tenant_id.as_str().bytes()),
    )
}

/// The bucket of the key named `provider:tenant` by `name` (a slot holds its key so).
pub fn bucket_of_name(name: impl IntoIterator<Item = u8>) -> u32 {
    // FNV-1a, folded: any stable spread will do, the buckets only group writes.
    let hash = name.into_iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    (hash ^ (hash >> 16)) % GENERATION_BUCKETS
}

/// A token as a worker serves it from its own cache.
#[derive(Debug)]
pub struct ReadyToken {
    /// `Bearer <token>`, the authorization header's value.
    header_value: SecretString,
    /// When the token expires.
    pub expires_at_ms: u64,
    /// From this moment on a refresh runs in the background.
    pub refresh_at_ms: u64,
    /// From this moment on it is no longer served.
    pub stale_at_ms: u64,
}

impl ReadyToken {
    /// The gateway cache's `entry`, ready to serve.
    pub fn new(entry: &GatewayEntry) -> Self {
        Self {
            header_value: delivery::bearer(&entry.token),
            expires_at_ms: entry.token.expires_at_ms,
            refresh_at_ms: entry.refresh_at_ms,
            stale_at_ms: entry.stale_at_ms,
        }
    }

    /// The authorization header's value.
    pub fn header_value(&self) -> &str {
        self.header_value.expose()
    }

    /// The token alone.
    pub fn access_token(&self) -> &str {
        self.header_value()
            .get(delivery::BEARER.len()..)
            .unwrap_or_default()
    }

    /// Whether it may still be served at `now_ms`.
    pub fn is_servable(&self, now_ms: u64) -> bool {
        now_ms < self.stale_at_ms
    }

    /// A copy as the worker's other paths take it (purges, endpoint answers).
    pub fn to_cached(&self) -> CachedToken {
        CachedToken {
            access_token: SecretString::new(self.access_token().to_owned()),
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// One worker's kept tokens, each with the generation of its bucket when it was read.
#[derive(Debug)]
pub struct ReadyTokens {
    kept: HashMap<TokenKey, (Arc<ReadyToken>, u64)>,
    capacity: usize,
}

impl ReadyTokens {
    /// Keeps at most `capacity` tokens (at least one).
    pub fn new(capacity: u32) -> Self {
        Self {
            kept: HashMap::new(),
            capacity: usize::try_from(capacity.max(1)).unwrap_or(usize::MAX),
        }
    }

    /// `key`'s kept token if it was read at `generation`.
    pub fn get(&self, key: &TokenKey, generation: u64) -> Option<&Arc<ReadyToken>> {
        self.kept
            .get(key)
            .filter(|(_, read_at)| *read_at == generation)
            .map(|(ready, _)| ready)
    }

    /// Keeps `ready` as `key`'s token, read at `generation`. When full, another key's
    /// token makes room (any: a worker that serves more keys than it keeps refills
    /// from shared data, as without this cache).
    pub fn keep(&mut self, key: &TokenKey, generation: u64, ready: Arc<ReadyToken>) {
        if let Some(kept) = self.kept.get_mut(key) {
            *kept = (ready, generation);
            return;
        }
        if self.kept.len() >= self.capacity {
            let other = self.kept.keys().next().cloned();
            if let Some(other) = other {
                self.kept.remove(&other);
            }
        }
        self.kept.insert(key.clone(), (ready, generation));
    }

    /// Drops `key`'s token, if kept.
    pub fn forget(&mut self, key: &TokenKey) {
        self.kept.remove(key);
    }

    /// How many tokens are kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterConfig;
    use crate::fake::{FakeEnvoy, FakeHost};
    use crate::host::Metric;
    use crate::slots::{Eviction, Table};
    use crate::worker::Worker;
    use tokengate_core::{Provider, TenantId};

    fn key(tenant: &str) -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse(tenant).unwrap())
    }

    fn ready(token: &str) -> Arc<ReadyToken> {
        Arc::new(ReadyToken::new(&GatewayEntry {
            token: CachedToken {
                access_token: token.into(),
                expires_at_ms: 10_000,
            },
            refresh_at_ms: 8_000,
            stale_at_ms: 9_000,
        }))
    }

    #[test]
    fn a_kept_token_serves_only_at_the_generation_it_was_read_and_before_it_is_stale() {
        let mut tokens = ReadyTokens::new(4);
        tokens.keep(&key("acme"), 7, ready("AT-1"));
        let kept = tokens.get(&key("acme"), 7).unwrap();
        assert_eq!(kept.header_value(), "Bearer AT-1");
        assert_eq!(kept.access_token(), "AT-1");
        assert_eq!(kept.to_cached().access_token.expose(), "AT-1");
        assert!(kept.is_servable(8_999) && !kept.is_servable(9_000));
        assert!(tokens.get(&key("acme"), 8).is_none(), "a write since");
        assert!(tokens.get(&key("globex"), 7).is_none());
        tokens.forget(&key("acme"));
        assert_eq!(tokens.len(), 0);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let mut tokens = ReadyTokens::new(8);
        for tenant in 0..100 {
            tokens.keep(&key(&format!("t{tenant}")), 1, ready("AT"));
        }
        assert_eq!(tokens.len(), 8);
        assert!(tokens.get(&key("t99"), 1).is_some(), "the newest is kept");
    }

    /// Two workers of one Envoy whose gateway cache holds `tokens` (tenant, token),
    /// each served once so that both keep them.
    fn two_warm_workers(
        config: &str,
        tokens: &[(&str, &str)],
    ) -> (Worker, Worker, FakeHost, FakeHost) {
        let envoy = FakeEnvoy::starting_at(1_000);
        let (mut first_host, mut second_host) = (envoy.host(), envoy.host());
        let parse = || FilterConfig::parse(config.as_bytes()).unwrap();
        let slots = parse().slots();
        for (tenant, token) in tokens {
            let entry = GatewayEntry {
                token: CachedToken {
                    access_token: (*token).into(),
                    expires_at_ms: 10_000_000,
                },
                refresh_at_ms: 9_000_000,
                stale_at_ms: 9_500_000,
            };
            let record = entry.encode();
            slots
                .put(
                    &mut first_host,
                    Table::Tokens,
                    &key(tenant),
                    &record,
                    |_| 1,
                    Eviction::Allowed,
                )
                .unwrap();
        }
        let (mut first, mut second) = (
            Worker::new(parse(), 1, Some(1)),
            Worker::new(parse(), 2, Some(2)),
        );
        for (tenant, token) in tokens {
            assert_eq!(
                served(&mut first, &mut first_host, tenant).as_deref(),
                Some(*token)
            );
            assert_eq!(
                served(&mut second, &mut second_host, tenant).as_deref(),
                Some(*token)
            );
        }
        (first, second, first_host, second_host)
    }

    fn served(worker: &mut Worker, host: &mut FakeHost, tenant: &str) -> Option<String> {
        worker
            .serve_ready(host, &key(tenant), || None)
            .map(|ready| ready.access_token().to_owned())
    }

    #[test]
    fn a_purge_on_one_worker_stops_every_worker_serving_the_token() {
        let (mut first, mut second, mut first_host, mut second_host) =
            two_warm_workers("{}", &[("acme", "AT-1"), ("globex", "AT-2")]);
        let rejected = CachedToken {
            access_token: "AT-1".into(),
            expires_at_ms: 10_000_000,
        };
        second.on_upstream_status(&mut second_host, 9, Some((key("acme"), rejected)), 401);
        assert_eq!(second_host.stat(Metric::Purge), 1);
        assert_eq!(served(&mut first, &mut first_host, "acme"), None);
        assert_eq!(served(&mut second, &mut second_host, "acme"), None);
        assert_eq!(
            served(&mut first, &mut first_host, "globex").as_deref(),
            Some("AT-2"),
            "another key is still served"
        );
    }

    #[test]
    fn a_newer_token_written_by_another_worker_is_served_at_once() {
        let (mut first, _second, mut first_host, mut second_host) =
            two_warm_workers("{}", &[("acme", "AT-1")]);
        let slots = FilterConfig::parse(b"{}").unwrap().slots();
        let newer = GatewayEntry {
            token: CachedToken {
                access_token: "AT-1b".into(),
                expires_at_ms: 20_000_000,
            },
            refresh_at_ms: 19_000_000,
            stale_at_ms: 19_500_000,
        };
        slots
            .put(
                &mut second_host,
                Table::Tokens,
                &key("acme"),
                &newer.encode(),
                |_| 1,
                Eviction::Allowed,
            )
            .unwrap();
        assert_eq!(
            served(&mut first, &mut first_host, "acme").as_deref(),
            Some("AT-1b")
        );
    }

    #[test]
    fn a_refresh_moment_moved_by_another_worker_is_seen_at_once() {
        let (mut first, _second, mut first_host, mut second_host) =
            two_warm_workers("{}", &[("acme", "AT-1")]);
        // Another worker's refresh failed and moved the next attempt to 9,400,000 (the
        // record is written in place, as `postpone_refresh` does).
        let slots = FilterConfig::parse(b"{}").unwrap().slots();
        let found = slots
            .find(&second_host, Table::Tokens, &key("acme"))
            .unwrap();
        let mut entry = GatewayEntry::decode(&found.record).unwrap();
        entry.refresh_at_ms = 9_400_000;
        assert!(slots.replace(&mut second_host, &found, &key("acme"), &entry.encode()));

        // Past the old refresh moment, before the new one: served, and no refresh starts.
        first_host.envoy().advance_to(9_100_000);
        assert_eq!(
            served(&mut first, &mut first_host, "acme").as_deref(),
            Some("AT-1")
        );
        assert_eq!(
            first_host.stat(Metric::RefreshAhead),
            0,
            "no refresh before the moved moment"
        );
    }

    #[test]
    fn a_token_pushed_out_of_the_gateway_cache_is_no_longer_served_from_a_copy() {
        let config = r#"{"cache":{"maxTenants":1}}"#;
        let (mut first, _second, mut first_host, mut second_host) =
            two_warm_workers(config, &[("acme", "AT-1")]);
        let slots = FilterConfig::parse(config.as_bytes()).unwrap().slots();
        let other = GatewayEntry {
            token: CachedToken {
                access_token: "AT-9".into(),
                expires_at_ms: 20_000_000,
            },
            refresh_at_ms: 19_000_000,
            stale_at_ms: 19_500_000,
        };
        let placed = slots
            .put(
                &mut second_host,
                Table::Tokens,
                &key("globex"),
                &other.encode(),
                |_| 1,
                Eviction::Allowed,
            )
            .unwrap();
        assert!(placed.evicted);
        assert_eq!(served(&mut first, &mut first_host, "acme"), None);
    }

    #[test]
    fn a_copy_is_not_served_once_stale_by_the_clock() {
        let (mut first, _second, mut first_host, _) = two_warm_workers("{}", &[("acme", "AT-1")]);
        first_host.envoy().advance_to(9_500_000);
        assert_eq!(served(&mut first, &mut first_host, "acme"), None);
    }

    #[test]
    fn a_key_and_its_slot_name_fall_in_the_same_bucket() {
        let acme = key("acme");
        assert_eq!(bucket_of(&acme), bucket_of_name(*b"genesys:acme"));
        let buckets: std::collections::HashSet<u32> = (0..1_000)
            .map(|tenant| bucket_of(&key(&format!("tenant-{tenant}"))))
            .collect();
        assert_eq!(
            buckets.len(),
            GENERATION_BUCKETS as usize,
            "every bucket used"
        );
    }
}
