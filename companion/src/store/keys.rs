//! The names of a token key's Redis keys and pub/sub channel, all under one hash tag
//! (`{<provider>:<tenant>}`) so they share a cluster slot.

use tokengate_core::TokenKey;

/// The pattern matching every key's `ready` channel (see [`ready_channel`]).
pub const READY_PATTERN: &str = "tokengate:*:ready";

/// The hash tag naming a token key inside Redis names: `<provider>:<tenant>`.
///
/// Tenant ids cannot contain `:`, `{` or `}` ([`tokengate_core::TenantId`]), so the tag
/// is unambiguous and cannot break out of its braces.
pub fn key_tag(key: &TokenKey) -> String {
    format!("{}:{}", key.provider, key.tenant_id)
}

/// The Redis key of a cached token.
pub fn token_key(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:token")
}

/// The Redis key of a fetch lock.
pub fn lock_key(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:lock")
}

/// The Redis key of a fetch failure answered from memory (negative caching): JSON
/// `{"code","message"}`, set with `PX --negative-cache-ms`.
pub fn failure_key(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:failure")
}

/// The pub/sub channel announcing that a key's lock holder committed or aborted.
pub fn ready_channel(tag: &str) -> String {
    format!("tokengate:{{{tag}}}:ready")
}

/// The message an invalidation publishes on a key's `ready` channel (the deletion
/// scripts, [`super::scripts`]); a commit publishes `committed`, a release `released`.
pub const INVALIDATED_MESSAGE: &str = "invalidated";

/// The hash tag of a `ready` channel name, or `None` if the name is not one of ours.
pub fn tag_of_ready_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("tokengate:{")?.strip_suffix("}:ready")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::{Provider, TenantId};

    fn key() -> TokenKey {
        TokenKey::new(Provider::genesys(), TenantId::parse("acme").unwrap())
    }

    #[test]
    fn keys_share_one_hash_tag_per_token_key() {
        let tag = key_tag(&key());
        assert_eq!(token_key(&tag), "tokengate:{genesys:acme}:token");
        assert_eq!(lock_key(&tag), "tokengate:{genesys:acme}:lock");
        assert_eq!(failure_key(&tag), "tokengate:{genesys:acme}:failure");
        assert_eq!(ready_channel(&tag), "tokengate:{genesys:acme}:ready");
    }

    #[test]
    fn ready_channels_map_back_to_their_tag() {
        let tag = key_tag(&key());
        assert_eq!(
            tag_of_ready_channel(&ready_channel(&tag)),
            Some("genesys:acme")
        );
        assert_eq!(tag_of_ready_channel("tokengate:{genesys:acme}:token"), None);
        assert_eq!(tag_of_ready_channel("other:{x}:ready"), None);
    }
}
