//! The cached form of a token: the expiry (and the moment to start refreshing it)
//! travel inside the value, because the caches it lives in (Envoy shared data) have no
//! TTL of their own.

use crate::provider::{TokenKey, mix};
use crate::secret::SecretString;

/// Format version of [`CachedToken::encode`]; bump when the layout changes.
const FORMAT_VERSION: u8 = 3;

/// A token and the moment it stops being usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedToken {
    /// The bearer token.
    pub access_token: SecretString,
    /// When to stop using it, in milliseconds since the epoch.
    pub expires_at_ms: u64,
}

/// A token in the gateway cache (Envoy shared data), with the moment to start
/// refreshing it and the moment to stop serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayEntry {
    /// The token and its expiry.
    pub token: CachedToken,
    /// From this moment on it is still served, but a refresh runs in the background.
    pub refresh_at_ms: u64,
    /// From this moment on it is no longer served: its expiry less the expiry margin
    /// that fits its lifetime ([`Lifetimes::margin_ms`]).
    pub stale_at_ms: u64,
}

/// How a token's lifetime shapes its use in a cache: the operator's expiry margin and
/// refresh lead, each capped so that a short-lived token is neither stale nor due for
/// refresh on arrival. For a token that lives `L` from when it was cached:
///
/// - it is served until `expiry - margin`, where the margin is `expiryMarginMs` but at
///   most `L / 4`;
/// - its refresh window is the last `max(percent % of L, minLeadMs)` of its life, but at
///   most `L / 2`; the refresh starts in the first half of that window, and always
///   before the token stops being served (half of the window's part before that
///   moment is left for the refresh itself).
///
/// A 24 h token with the defaults (10 %, 30 s, 5 s) is untouched by the caps; a 20 s
/// token is served for 15 s and refreshed between 10 and 12.5 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// `refreshAhead.percent`: the refresh window's share of the lifetime.
    pub percent: u8,
    /// `refreshAhead.minLeadMs`: the shortest refresh window, within `L / 2`.
    pub min_lead_ms: u64,
    /// `expiryMarginMs`: how long before its expiry a token stops being served, within
    /// `L / 4`.
    pub expiry_margin_ms: u64,
}

impl Lifetimes {
    /// The expiry margin applied to a token that lives `lifetime_ms`.
    pub fn margin_ms(&self, lifetime_ms: u64) -> u64 {
        self.expiry_margin_ms.min(lifetime_ms / 4)
    }

    /// The refresh window of a token that lives `lifetime_ms`.
    pub fn lead_ms(&self, lifetime_ms: u64) -> u64 {
        (lifetime_ms / 100)
            .saturating_mul(u64::from(self.percent.min(100)))
            .max(self.min_lead_ms)
            .min(lifetime_ms / 2)
    }

    /// Whether the configured margin or minimum lead had to be cut for a token that
    /// lives `lifetime_ms` (worth a warning: the configuration does not fit the IdP).
    pub fn capped(&self, lifetime_ms: u64) -> bool {
        self.margin_ms(lifetime_ms) < self.expiry_margin_ms || self.min_lead_ms > lifetime_ms / 2
    }

    /// The cache entry of `key`'s `token`, cached at `now_ms`: its refresh moment (see
    /// [`refresh_moment`]) and the moment it stops being served. The margin is fitted to
    /// the token's lifetime only when `fetched_now` (its life so far is nil, so what is
    /// left is its lifetime); a token taken from another cache (the companion's) may be
    /// near its end, and what is left of it says nothing of its lifetime: the configured
    /// margin holds uncut.
    pub fn entry(
        &self,
        key: &TokenKey,
        token: CachedToken,
        now_ms: u64,
        fetched_now: bool,
    ) -> GatewayEntry {
        let margin_ms = if fetched_now {
            self.margin_ms(token.expires_at_ms.saturating_sub(now_ms))
        } else {
            self.expiry_margin_ms
        };
        GatewayEntry {
            refresh_at_ms: refresh_moment(key, now_ms, token.expires_at_ms, *self),
            stale_at_ms: token.expires_at_ms.saturating_sub(margin_ms),
            token,
        }
    }
}

/// After a refresh-ahead failed, the old token still serves and no new refresh of that
/// key starts for this long (an IdP outage must not turn every request into a fetch).
pub const REFRESH_RETRY_MS: u64 = 5_000;

/// When to start refreshing `key`'s token that lives from `now_ms` to `expires_at_ms`.
///
/// The refresh window is the last `percent` of its life, but at least `min_lead_ms`
/// before it expires, and at most half its life ([`Lifetimes`]). The refresh starts in
/// the first half of that window (and before the expiry margin), at a moment
/// spread by a jitter derived from the key and the token's expiry: every worker and
/// every Envoy holding the token agree on it, and tokens fetched in the same second
/// (after an outage, at start-up) do not all come due in the same second again, so
/// the IdP never sees a synchronized burst. Half the lead is always left for the
/// refresh itself.
pub fn refresh_moment(
    key: &TokenKey,
    now_ms: u64,
    expires_at_ms: u64,
    lifetimes: Lifetimes,
) -> u64 {
    let lifetime_ms = expires_at_ms.saturating_sub(now_ms);
    let lead_ms = lifetimes.lead_ms(lifetime_ms);
    let before_margin_ms = lead_ms.saturating_sub(lifetimes.margin_ms(lifetime_ms));
    // The same fraction of the spread for every holder: Envoys that received the token
    // a moment apart (so with leads a little apart) still refresh moments apart. The
    // spread is half of the window's part before the margin (never more than half the
    // window, as that part is within the window).
    let spread_ms = u128::from(before_margin_ms / 2);
    let fraction = u128::from(jitter_seed(key, expires_at_ms) >> 32);
    let jitter_ms = u64::try_from((spread_ms * fraction) >> 32).unwrap_or(0);
    expires_at_ms
        .saturating_sub(lead_ms)
        .saturating_add(jitter_ms)
}

/// A well-mixed number from a key and a token's expiry: the same on every worker and
/// Envoy, different for each token of each key.
fn jitter_seed(key: &TokenKey, expires_at_ms: u64) -> u64 {
    mix(key.stable_hash() ^ expires_at_ms)
}

impl CachedToken {
    /// Whether the token may still be injected at `now_ms`, keeping `margin_ms` in hand
    /// so it does not expire on its way to the upstream.
    pub fn is_fresh(&self, now_ms: u64, margin_ms: u64) -> bool {
        now_ms.saturating_add(margin_ms) < self.expires_at_ms
    }
}

impl GatewayEntry {
    /// Whether it may still be served at `now_ms`.
    pub fn is_servable(&self, now_ms: u64) -> bool {
        now_ms < self.stale_at_ms
    }

    /// Whether a background refresh should run at `now_ms`.
    pub fn wants_refresh(&self, now_ms: u64) -> bool {
        now_ms >= self.refresh_at_ms
    }

    /// Encodes as `[version][expires_at_ms][refresh_at_ms][stale_at_ms][token bytes]`,
    /// integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let token = self.token.access_token.expose().as_bytes();
        let mut bytes = Vec::with_capacity(1 + 24 + token.len());
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(&self.token.expires_at_ms.to_be_bytes());
        bytes.extend_from_slice(&self.refresh_at_ms.to_be_bytes());
        bytes.extend_from_slice(&self.stale_at_ms.to_be_bytes());
        bytes.extend_from_slice(token);
        bytes
    }

    /// Decodes [`GatewayEntry::encode`]'s output; `None` for anything else (an empty
    /// value, another version, a token that is not UTF-8).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT_VERSION || rest.len() <= 24 {
            return None;
        }
        let (expiry, rest) = rest.split_at(8);
        let (refresh, rest) = rest.split_at(8);
        let (stale, token) = rest.split_at(8);
        Some(Self {
            token: CachedToken {
                expires_at_ms: u64::from_be_bytes(expiry.try_into().ok()?),
                access_token: SecretString::new(String::from_utf8(token.to_vec()).ok()?),
            },
            refresh_at_ms: u64::from_be_bytes(refresh.try_into().ok()?),
            stale_at_ms: u64::from_be_bytes(stale.try_into().ok()?),
        })
    }
}

/// The last purge of a key's token (an upstream rejected it): limits purges per key,
/// and makes the next fetch insist on a token newer than the purged one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeRecord {
    /// When the purge happened.
    pub purged_at_ms: u64,
    /// The purged token's expiry: a replacement must expire later than this.
    pub stale_expires_at_ms: u64,
}

impl PurgeRecord {
    /// Encodes as two big-endian integers.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(16);
        bytes.extend_from_slice(&self.purged_at_ms.to_be_bytes());
        bytes.extend_from_slice(&self.stale_expires_at_ms.to_be_bytes());
        bytes
    }

    /// Decodes [`PurgeRecord::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: [u8; 16] = bytes.try_into().ok()?;
        let (purged, stale) = bytes.split_at(8);
        Some(Self {
            purged_at_ms: u64::from_be_bytes(purged.try_into().ok()?),
            stale_expires_at_ms: u64::from_be_bytes(stale.try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Provider, TenantId};

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn token(expires_at_ms: u64, refresh_at_ms: u64) -> GatewayEntry {
        let token = CachedToken {
            access_token: SecretString::from("tok-1"),
            expires_at_ms,
        };
        GatewayEntry {
            token,
            refresh_at_ms,
            stale_at_ms: expires_at_ms,
        }
    }

    fn lifetimes(percent: u8, min_lead_ms: u64, expiry_margin_ms: u64) -> Lifetimes {
        Lifetimes {
            percent,
            min_lead_ms,
            expiry_margin_ms,
        }
    }

    #[test]
    fn encoding_round_trips() {
        let entry = token(1_700_000_000_123, 1_699_999_000_000);
        assert_eq!(GatewayEntry::decode(&entry.encode()), Some(entry));
    }

    #[test]
    fn foreign_or_truncated_values_do_not_decode() {
        assert_eq!(GatewayEntry::decode(b""), None);
        assert_eq!(
            GatewayEntry::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 1, b't']),
            None
        );
        assert_eq!(GatewayEntry::decode(&[3, 0, 0, 0]), None);
        assert_eq!(GatewayEntry::decode(&[3; 25]), None, "no token bytes");
        let mut older = vec![2];
        older.extend_from_slice(&[0; 16]);
        older.push(b't');
        assert_eq!(GatewayEntry::decode(&older), None, "the previous layout");
    }

    #[test]
    fn freshness_keeps_the_margin() {
        let token = token(10_000, 9_000).token;
        assert!(token.is_fresh(4_999, 5_000));
        assert!(!token.is_fresh(5_000, 5_000));
        assert!(!token.is_fresh(20_000, 0));
    }

    fn acme() -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse("acme").unwrap())
    }

    #[test]
    fn refresh_starts_in_the_first_half_of_the_last_part_of_the_life() {
        // A 24 h token's window is its last 10 %, 2.4 h; it refreshes in the first 1.2 h of it.
        let day = 86_400_000;
        let at = refresh_moment(&acme(), 0, day, lifetimes(10, 60_000, 5_000));
        assert!((day - day / 10..=day - day / 20).contains(&at), "{at}");
        // A 10 s token's window is at least its last 2 s.
        let at = refresh_moment(&acme(), 0, 10_000, lifetimes(10, 2_000, 0));
        assert!((8_000..=9_000).contains(&at), "{at}");
        assert!(token(10_000, at).wants_refresh(at));
        assert!(!token(10_000, at).wants_refresh(at - 1));
    }

    #[test]
    fn a_short_token_is_neither_stale_nor_due_for_refresh_on_arrival() {
        // The defaults (10 %, 30 s, 5 s) and a 20 s token: margin 5 s (a quarter), window
        // 10 s (half its life); refreshed between 10 and 12.5 s, served until 15 s.
        let defaults = lifetimes(10, 30_000, 5_000);
        let twenty = CachedToken {
            access_token: SecretString::from("t"),
            expires_at_ms: 20_000,
        };
        let entry = defaults.entry(&acme(), twenty, 0, true);
        assert!(
            (10_000..=12_500).contains(&entry.refresh_at_ms),
            "{entry:?}"
        );
        assert_eq!(entry.stale_at_ms, 15_000);
        assert!(!entry.wants_refresh(0) && entry.is_servable(0));
        assert!(defaults.capped(20_000));
        // An 8 s token under a 5 s margin: served 6 s (margin cut to 2 s), refreshed in
        // the first 3 s of its second half, before it goes stale.
        let eight = CachedToken {
            access_token: SecretString::from("t"),
            expires_at_ms: 8_000,
        };
        let entry = defaults.entry(&acme(), eight, 0, true);
        assert_eq!(entry.stale_at_ms, 6_000);
        assert!((4_000..=5_000).contains(&entry.refresh_at_ms), "{entry:?}");
        // A 24 h token is untouched: the margin and window of today.
        let day = 86_400_000;
        assert_eq!(defaults.margin_ms(day), 5_000);
        assert_eq!(defaults.lead_ms(day), day / 10);
        assert!(!defaults.capped(day));
        let genesys = CachedToken {
            access_token: SecretString::from("t"),
            expires_at_ms: day,
        };
        let entry = defaults.entry(&acme(), genesys, 0, true);
        assert_eq!(entry.stale_at_ms, day - 5_000);
        assert!((day - day / 10..=day - day / 20).contains(&entry.refresh_at_ms));
        // A token from the companion's cache with 2.7 s left: what is left says nothing
        // of its lifetime, so the whole 5 s margin holds (it is stale already).
        let near_its_end = CachedToken {
            access_token: SecretString::from("t"),
            expires_at_ms: 2_700,
        };
        let entry = defaults.entry(&acme(), near_its_end, 0, false);
        assert_eq!(entry.stale_at_ms, 0);
    }

    #[test]
    fn every_holder_of_a_token_agrees_on_its_refresh_moment() {
        let first = refresh_moment(&acme(), 1_000, 3_600_000, lifetimes(10, 30_000, 5_000));
        assert_eq!(
            first,
            refresh_moment(&acme(), 1_000, 3_600_000, lifetimes(10, 30_000, 5_000))
        );
        // Another Envoy that got the token a second later (its lead is 0.1 s shorter).
        let later = refresh_moment(&acme(), 2_000, 3_600_000, lifetimes(10, 30_000, 5_000));
        assert!(first.abs_diff(later) <= 100, "{first} vs {later}");
        let next_token = refresh_moment(&acme(), 1_000, 3_600_001, lifetimes(10, 30_000, 5_000));
        assert!(
            first.abs_diff(next_token) > 1_000,
            "each token has its own moment"
        );
    }

    #[test]
    fn tokens_fetched_in_the_same_second_refresh_spread_over_the_window() {
        // 1,000 tenants whose one-hour tokens were all fetched at once: the window is the
        // last 6 minutes, the refreshes start in its first 3.
        let issued_ms = 1_700_000_000_000;
        let expires_at_ms = issued_ms + 3_600_000;
        let mut per_second = std::collections::BTreeMap::new();
        for tenant in 0..1_000 {
            let key = TokenKey::new(
                Provider::genesys(),
                TenantId::parse(&format!("tenant-{tenant}")).unwrap(),
            );
            let at = refresh_moment(&key, issued_ms, expires_at_ms, lifetimes(10, 30_000, 5_000));
            let window_start = expires_at_ms - 360_000;
            assert!((window_start..window_start + 180_000).contains(&at));
            *per_second.entry((at - window_start) / 1_000).or_insert(0) += 1;
        }
        let busiest = per_second.values().max().copied().unwrap_or_default();
        assert!(
            per_second.len() > 150,
            "spread over {} of 180 seconds",
            per_second.len()
        );
        assert!(
            busiest <= 20,
            "at most 20 refreshes in one second, not 1,000: {busiest}"
        );
    }
    #[test]
    fn capped_says_which_configurations_had_to_be_cut() {
        // Only the margin cut: an 8 s token under a 5 s margin, a 1 s minimum lead.
        let margin_only = lifetimes(10, 1_000, 5_000);
        assert!(margin_only.capped(8_000));
        // Neither cut, at both bounds: a 20 s margin and a 30 s lead fit a 60 s token.
        let at_bounds = lifetimes(10, 30_000, 5_000);
        assert!(!at_bounds.capped(60_000));
        assert!(at_bounds.capped(59_998), "a 30 s lead no longer fits");
    }

    #[test]
    fn refreshes_of_a_short_token_start_before_half_its_margin_runs_out() {
        // 20 s tokens with the defaults: the window is the last 10 s, the token stops
        // being served 5 s before its end, so every refresh starts between 10 and
        // 12.5 s (half of what is left before the margin), however the jitter falls.
        let defaults = lifetimes(10, 30_000, 5_000);
        let moments: Vec<u64> = (0..1_000)
            .map(|tenant| {
                let key = TokenKey::new(
                    Provider::genesys(),
                    TenantId::parse(&format!("tenant-{tenant}")).unwrap(),
                );
                refresh_moment(&key, 0, 20_000, defaults)
            })
            .collect();
        assert!(moments.iter().all(|at| (10_000..=12_500).contains(at)));
        assert!(
            moments.iter().any(|at| *at > 12_000),
            "spread over the range"
        );
    }

    #[test]
    fn an_entry_is_served_until_its_stale_moment_only() {
        let entry = lifetimes(10, 30_000, 5_000).entry(
            &acme(),
            CachedToken {
                access_token: SecretString::from("t"),
                expires_at_ms: 86_400_000,
            },
            0,
            true,
        );
        assert!(entry.is_servable(entry.stale_at_ms - 1));
        assert!(!entry.is_servable(entry.stale_at_ms));
    }

    #[test]
    fn purge_records_round_trip() {
        let record = PurgeRecord {
            purged_at_ms: 5,
            stale_expires_at_ms: 9,
        };
        assert_eq!(PurgeRecord::decode(&record.encode()), Some(record));
        assert_eq!(PurgeRecord::decode(b"short"), None);
    }
}
