//! How a token is written into Redis and read back: in clear, or encrypted with
//! AES-256-GCM under the keys of `--encryption-key-file` (see [`crate::keys::Keyring`]).
//!
//! In clear (no key file): `{"accessToken":"…","expiresAtMs":N}`.
//!
//! Encrypted: `{"v":1,"kid":"k1","nonce":"<base64>","ct":"<base64>","expiresAtMs":N}`.
//! `ct` is the token encrypted under key `kid` with the 96-bit random `nonce`; the
//! associated data binds it to its Redis key and its expiry
//! (`tokengate:v1:<hash tag>:<expiresAtMs>`), so a value copied to another tenant's key
//! or given another expiry does not decrypt. `expiresAtMs` stays readable for tools;
//! the Lua scripts use the key's own expiry (`PEXPIRETIME`), never the value.
//!
//! A value that cannot be read is a cache miss (logged without the value): not JSON,
//! in clear while encryption is on, encrypted while it is off, under a key id the file
//! no longer holds, or failing authentication. The lease then fetches a new token,
//! which overwrites it.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use tokengate_core::{CachedToken, SecretBytes, SecretString};
use zeroize::Zeroizing;

use crate::keys::Keyring;

/// A token that could not be turned into a stored value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    /// The AES-GCM encryption failed.
    #[error("AES-GCM encryption failed")]
    Encrypt,
    /// The value could not be serialized.
    #[error("the value could not be serialized: {0}")]
    Serialize(String),
}

/// Version of the encrypted layout.
const ENCRYPTED_VERSION: u32 = 1;

/// Writes and reads cached values.
#[derive(Debug, Clone, Default)]
pub enum Codec {
    /// Tokens stored in clear.
    #[default]
    Plain,
    /// Tokens stored encrypted; the keyring's active key encrypts.
    Encrypted(Keyring),
}

/// The clear form.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PlainValue<'a> {
    access_token: &'a SecretString,
    expires_at_ms: u64,
}

/// The encrypted form.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EncryptedValue<'a> {
    v: u32,
    kid: &'a str,
    nonce: String,
    ct: String,
    expires_at_ms: u64,
}

/// Either form, as read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredValue {
    access_token: Option<SecretString>,
    expires_at_ms: u64,
    v: Option<u32>,
    kid: Option<String>,
    nonce: Option<String>,
    ct: Option<String>,
}

impl Codec {
    /// Whether values are encrypted.
    pub fn encrypts(&self) -> bool {
        matches!(self, Codec::Encrypted(_))
    }

    /// The value stored for `token` under the key of hash tag `tag`, in a wiped buffer.
    pub fn encode(&self, tag: &str, token: &CachedToken) -> Result<SecretBytes, CodecError> {
        let encoded = match self {
            Codec::Plain => serde_json::to_vec(&PlainValue {
                access_token: &token.access_token,
                expires_at_ms: token.expires_at_ms,
            }),
            Codec::Encrypted(keyring) => {
                let key = keyring.active();
                let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key.key[..]));
                let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
                let aad = associated_data(tag, token.expires_at_ms);
                let ct = cipher
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: token.access_token.expose().as_bytes(),
                            aad: aad.as_bytes(),
                        },
                    )
                    .map_err(|_| CodecError::Encrypt)?;
                serde_json::to_vec(&EncryptedValue {
                    v: ENCRYPTED_VERSION,
                    kid: &key.id,
                    nonce: BASE64.encode(nonce),
                    ct: BASE64.encode(ct),
                    expires_at_ms: token.expires_at_ms,
                })
            }
        };
        encoded
            .map(SecretBytes::new)
            .map_err(|e| CodecError::Serialize(e.to_string()))
    }

    /// Reads a value stored under hash tag `tag`; `None` (a miss, logged) when it cannot.
    pub fn decode(&self, tag: &str, raw: &SecretBytes) -> Option<CachedToken> {
        match self.try_decode(tag, raw) {
            Ok(token) => Some(token),
            Err(reason) => {
                tracing::warn!(
                    key = tag,
                    reason,
                    "cached token is unreadable; treating it as a miss"
                );
                None
            }
        }
    }

    fn try_decode(&self, tag: &str, raw: &SecretBytes) -> Result<CachedToken, String> {
        // serde_json's message names the position and the expected type, not the value.
        let stored: StoredValue = serde_json::from_slice(raw.expose())
            .map_err(|e| format!("not a cached-token document: {e}"))?;
        let expires_at_ms = stored.expires_at_ms;
        match (self, stored.ct, stored.access_token) {
            (Codec::Plain, None, Some(access_token)) => Ok(CachedToken {
                access_token,
                expires_at_ms,
            }),
            (Codec::Plain, Some(_), _) => {
                Err("it is encrypted and no --encryption-key-file is set".to_owned())
            }
            (Codec::Encrypted(_), None, Some(_)) => {
                Err("it is stored in clear and encryption is on".to_owned())
            }
            (_, None, None) => Err("it holds no token".to_owned()),
            (Codec::Encrypted(keyring), Some(ct), _) => {
                if stored.v != Some(ENCRYPTED_VERSION) {
                    return Err(format!("unknown encrypted format version {:?}", stored.v));
                }
                let kid = stored.kid.unwrap_or_default();
                let key = keyring.get(&kid).ok_or_else(|| {
                    format!("it is encrypted under key id '{kid}', which --encryption-key-file does not hold")
                })?;
                let nonce = BASE64
                    .decode(stored.nonce.unwrap_or_default())
                    .ok()
                    .filter(|nonce| nonce.len() == 12)
                    .ok_or("its nonce is not 12 bytes of base64")?;
                let ct = BASE64
                    .decode(ct)
                    .map_err(|_| "its ciphertext is not base64")?;
                let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key.key[..]));
                let aad = associated_data(tag, expires_at_ms);
                let clear = cipher
                    .decrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &ct,
                            aad: aad.as_bytes(),
                        },
                    )
                    .map(Zeroizing::new)
                    .map_err(|_| {
                        format!("it does not decrypt under key id '{kid}' (altered, or moved from another key)")
                    })?;
                let token = std::str::from_utf8(&clear).map_err(|_| "its token is not UTF-8")?;
                Ok(CachedToken {
                    access_token: SecretString::from(token),
                    expires_at_ms,
                })
            }
        }
    }
}

/// Binds a ciphertext to its Redis key and expiry.
fn associated_data(tag: &str, expires_at_ms: u64) -> String {
    format!("tokengate:v1:{tag}:{expires_at_ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &str = "genesys:acme";

    fn ring(text: &str) -> Codec {
        Codec::Encrypted(Keyring::parse(text, "test").unwrap())
    }

    fn k1() -> String {
        format!("k1:{}", "11".repeat(32))
    }

    fn k2() -> String {
        format!("k2:{}", "22".repeat(32))
    }

    fn token() -> CachedToken {
        CachedToken {
            access_token: SecretString::from("gen-acme-1-secret"),
            expires_at_ms: 1_900_000_000_000,
        }
    }

    #[test]
    fn plain_values_are_camel_case_json_and_round_trip() {
        let encoded = Codec::Plain.encode(TAG, &token()).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(encoded.expose()).unwrap(),
            serde_json::json!({"accessToken":"gen-acme-1-secret","expiresAtMs":1_900_000_000_000u64})
        );
        assert_eq!(Codec::Plain.decode(TAG, &encoded), Some(token()));
    }

    #[test]
    fn encrypted_values_hide_the_token_and_round_trip() {
        let codec = ring(&k1());
        let encoded = codec.encode(TAG, &token()).unwrap();
        let text = String::from_utf8(encoded.expose().to_vec()).unwrap();
        assert!(!text.contains("gen-acme"), "{text}");
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["kid"], "k1");
        assert_eq!(value["expiresAtMs"], 1_900_000_000_000u64);
        assert_eq!(codec.decode(TAG, &encoded), Some(token()));
        // A fresh nonce each time.
        assert_ne!(codec.encode(TAG, &token()).unwrap(), encoded);
    }

    #[test]
    fn old_keys_still_decrypt_after_a_rotation_until_dropped() {
        let encoded = ring(&k1()).encode(TAG, &token()).unwrap();
        assert_eq!(
            ring(&format!("{}\n{}", k2(), k1())).decode(TAG, &encoded),
            Some(token())
        );
        assert_eq!(ring(&k2()).decode(TAG, &encoded), None);
    }

    #[test]
    fn a_value_moved_to_another_key_or_expiry_does_not_decrypt() {
        let codec = ring(&k1());
        let encoded = codec.encode(TAG, &token()).unwrap();
        assert_eq!(codec.decode("genesys:globex", &encoded), None);
        let mut value: serde_json::Value = serde_json::from_slice(encoded.expose()).unwrap();
        value["expiresAtMs"] = serde_json::json!(1_999_999_999_999u64);
        let altered = SecretBytes::new(serde_json::to_vec(&value).unwrap());
        assert_eq!(codec.decode(TAG, &altered), None);
    }

    #[test]
    fn clear_and_encrypted_values_do_not_mix() {
        let clear = Codec::Plain.encode(TAG, &token()).unwrap();
        let encrypted = ring(&k1()).encode(TAG, &token()).unwrap();
        assert_eq!(ring(&k1()).decode(TAG, &clear), None);
        assert_eq!(Codec::Plain.decode(TAG, &encrypted), None);
        assert_eq!(
            Codec::Plain.decode(TAG, &SecretBytes::new(b"not json".to_vec())),
            None
        );
    }
}
