//! The companion's two secrets, read from files at start-up: the internal API key that
//! callers of `/v1/*` must present, and the AES-256-GCM keys that encrypt the tokens
//! stored in Redis.
//!
//! Both live in zeroizing buffers whose `Debug` prints `[redacted]`, and neither file's
//! content ever reaches a log line or an error message (errors name the file and the
//! line number only).

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use subtle::ConstantTimeEq;
use tokengate_core::SecretString;
use zeroize::Zeroizing;

use crate::config::{Config, INTERNAL_API_KEY_ENV};

/// The header carrying the internal API key.
pub const INTERNAL_API_KEY_HEADER: &str = "x-tokengate-key";

/// Shortest internal API key accepted.
pub const MIN_INTERNAL_API_KEY_LEN: usize = 16;

/// Longest key id accepted in the encryption key file.
pub const MAX_KEY_ID_LEN: usize = 32;

/// Why a key could not be loaded; names the source, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("{flag} {path}: cannot read it: {source}")]
    Read {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The content is not what the flag expects.
    #[error("{origin}: {problem}")]
    Invalid {
        /// The flag and file (or variable) the key came from.
        origin: String,
        /// What is wrong (never the key itself).
        problem: String,
    },
}

/// The shared secret of the internal API, compared in constant time.
#[derive(Clone)]
pub struct InternalApiKey {
    /// SHA-256 of the key: comparing digests of equal length hides the key's length.
    digest: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for InternalApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InternalApiKey([redacted])")
    }
}

impl InternalApiKey {
    /// A key from its text (already trimmed), at least [`MIN_INTERNAL_API_KEY_LEN`] long.
    pub fn new(key: &SecretString, origin: &str) -> Result<Self, KeyError> {
        let key = key.expose();
        if key.chars().count() < MIN_INTERNAL_API_KEY_LEN {
            return Err(KeyError::Invalid {
                origin: origin.to_owned(),
                problem: format!(
                    "the internal API key must be at least {MIN_INTERNAL_API_KEY_LEN} characters"
                ),
            });
        }
        if key.chars().any(|c| c.is_control() || !c.is_ascii()) {
            return Err(KeyError::Invalid {
                origin: origin.to_owned(),
                problem: "the internal API key must be printable ASCII (it travels in a header)"
                    .to_owned(),
            });
        }
        Ok(Self {
            digest: Zeroizing::new(Sha256::digest(key.as_bytes()).into()),
        })
    }

    /// Whether `presented` is the key, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: Zeroizing<[u8; 32]> = Zeroizing::new(Sha256::digest(presented).into());
        bool::from(digest.ct_eq(&*self.digest))
    }
}

/// One AES-256 key and its id.
#[derive(Clone)]
pub struct EncryptionKey {
    /// Names the key in every value it encrypts, so a reader picks the right one.
    pub id: String,
    /// The 256-bit key.
    pub key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey({}, [redacted])", self.id)
    }
}

/// The keys of `--encryption-key-file`: the first encrypts, every one decrypts.
#[derive(Clone)]
pub struct Keyring {
    /// Encrypts every value written.
    active: EncryptionKey,
    /// Every key, by id, for reading values written before a rotation.
    by_id: HashMap<String, EncryptionKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&str> = self.by_id.keys().map(String::as_str).collect();
        ids.sort_unstable();
        f.debug_struct("Keyring")
            .field("active", &self.active.id)
            .field("ids", &ids)
            .finish()
    }
}

impl Keyring {
    /// Parses the key file's text: one `<key-id>:<64 hex digits>` per line; blank lines
    /// and lines starting with `#` are skipped. Key ids are 1 to 32 characters of
    /// `[A-Za-z0-9._-]` and unique.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyError> {
        let invalid = |line: usize, problem: &str| KeyError::Invalid {
            origin: origin.to_owned(),
            problem: format!("line {line}: {problem}"),
        };
        let mut keys: Vec<EncryptionKey> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex) = line
                .split_once(':')
                .ok_or_else(|| invalid(number, "expected <key-id>:<64 hex digits>"))?;
            let (id, hex) = (id.trim(), hex.trim());
            let valid_id = (1..=MAX_KEY_ID_LEN).contains(&id.len())
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid_id {
                return Err(invalid(
                    number,
                    "the key id must be 1 to 32 characters of [A-Za-z0-9._-]",
                ));
            }
            let key = decode_hex_key(hex).ok_or_else(|| {
                invalid(
                    number,
                    "the key must be exactly 64 hexadecimal digits (32 bytes)",
                )
            })?;
            if keys.iter().any(|known| known.id == id) {
                return Err(invalid(number, &format!("key id '{id}' appears twice")));
            }
            keys.push(EncryptionKey {
                id: id.to_owned(),
                key,
            });
        }
        let Some(active) = keys.first().cloned() else {
            return Err(KeyError::Invalid {
                origin: origin.to_owned(),
                problem: "no key in the file (expected <key-id>:<64 hex digits> lines)".to_owned(),
            });
        };
        let by_id = keys.into_iter().map(|key| (key.id.clone(), key)).collect();
        Ok(Self { active, by_id })
    }

    /// The key that encrypts.
    pub fn active(&self) -> &EncryptionKey {
        &self.active
    }

    /// The key with this id, if the file holds it.
    pub fn get(&self, id: &str) -> Option<&EncryptionKey> {
        self.by_id.get(id)
    }
}

/// Decodes 64 hex digits into a key buffer that is wiped on drop.
fn decode_hex_key(hex: &str) -> Option<Zeroizing<[u8; 32]>> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *byte = u8::try_from(high * 16 + low).ok()?;
    }
    Some(key)
}

/// The secrets a configuration names, loaded.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// Required on `/v1/*` when set.
    pub internal_api_key: Option<InternalApiKey>,
    /// Encrypts the tokens in Redis when set.
    pub keyring: Option<Keyring>,
}

impl Secrets {
    /// Reads the files (and the variable) `config` names.
    pub fn load(config: &Config) -> Result<Self, KeyError> {
        let internal_api_key = match (&config.internal_api_key_file, &config.internal_api_key) {
            (Some(path), _) => {
                let flag = "--internal-api-key-file";
                let text = read_secret_file(flag, path)?;
                let first = text.lines().next().unwrap_or_default().trim();
                let origin = format!("{flag} {}", path.display());
                Some(InternalApiKey::new(&SecretString::from(first), &origin)?)
            }
            (None, Some(key)) => {
                let trimmed = SecretString::from(key.expose().trim());
                Some(InternalApiKey::new(&trimmed, INTERNAL_API_KEY_ENV)?)
            }
            (None, None) => None,
        };
        let keyring = match &config.encryption_key_file {
            Some(path) => {
                let flag = "--encryption-key-file";
                let text = read_secret_file(flag, path)?;
                Some(Keyring::parse(
                    &text,
                    &format!("{flag} {}", path.display()),
                )?)
            }
            None => None,
        };
        Ok(Self {
            internal_api_key,
            keyring,
        })
    }
}

/// Reads a whole file into a buffer wiped on drop.
fn read_secret_file(flag: &'static str, path: &Path) -> Result<Zeroizing<String>, KeyError> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|source| KeyError::Read {
            flag,
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const K2: &str = "k2:FFEEDDCCBBAA99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn the_first_key_encrypts_and_every_key_is_known() {
        let ring = Keyring::parse(&format!("# rotated on Monday\n{K2}\n\n{K1}\n"), "f").unwrap();
        assert_eq!(ring.active().id, "k2");
        assert_eq!(ring.active().key[0], 0xff);
        assert_eq!(ring.get("k1").map(|key| key.key[31]), Some(0x1f));
        assert!(ring.get("k3").is_none());
    }

    #[test]
    fn bad_key_files_name_the_line_but_never_the_key() {
        let cases = [
            ("", "no key"),
            ("k1:abcd", "line 1"),
            ("k1 0011", "line 1"),
            (
                "bad id!:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                "key id",
            ),
            (&format!("{K1}\n{K1}"), "appears twice"),
            (
                "k1:zz0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                "64 hexadecimal",
            ),
        ];
        for (text, mentions) in cases {
            let message = Keyring::parse(text, "--encryption-key-file keys.txt")
                .unwrap_err()
                .to_string();
            assert!(message.contains(mentions), "{text:?}: {message}");
            assert!(message.starts_with("--encryption-key-file keys.txt"));
            assert!(!message.contains("0102030405"), "{message}");
        }
    }

    #[test]
    fn debug_shows_ids_only() {
        let ring = Keyring::parse(&format!("{K1}\n{K2}"), "f").unwrap();
        let shown = format!("{ring:?} {:?}", ring.active());
        assert!(shown.contains("k1") && shown.contains("k2"), "{shown}");
        assert!(
            !shown.contains("0102") && !shown.contains("ffee"),
            "{shown}"
        );
    }

    #[test]
    fn the_internal_key_matches_only_itself() {
        let key = InternalApiKey::new(&SecretString::from("a-long-enough-key-1"), "env").unwrap();
        assert!(key.matches(b"a-long-enough-key-1"));
        assert!(!key.matches(b"a-long-enough-key-2"));
        assert!(!key.matches(b""));
        assert_eq!(format!("{key:?}"), "InternalApiKey([redacted])");
        let short = InternalApiKey::new(&SecretString::from("short"), "env").unwrap_err();
        assert!(short.to_string().contains("at least 16"));
    }
}
