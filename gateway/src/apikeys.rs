//! API keys: generated once, shown once, stored only as SHA-256 hashes.
//!
//! A key reads `sk_<id>_<secret>`: `id` is 12 hex characters (6 random bytes, public, used
//! to find the record without scanning), `secret` is 32 random bytes in unpadded base64url.
//! `<data_dir>/api-keys.toml` (mode 0600) holds per key: id, name, scopes and the hex
//! SHA-256 of the whole key string. Verification compares hashes in constant time.
//!
//! Scopes read `PATTERN:ACTION[,ACTION…]`, e.g. `orders.*:subscribe,publish`; a pattern is a
//! stream name or a prefix ending in `*`.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Key prefix.
pub const PREFIX: &str = "sk_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;
/// Upper bound on a presented key's length (longer input is refused before hashing).
pub const MAX_KEY_LEN: usize = 128;

/// API-key errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyError {
    /// The presented key is not of the `sk_<id>_<secret>` form (client garbage).
    #[error("malformed API key")]
    Malformed,
    /// No key with that id, or the secret does not match (do not tell which).
    #[error("unknown or revoked API key")]
    Rejected,
    /// A scope string is invalid (caller misuse).
    #[error(
        "invalid scope {0:?}: expected PATTERN:ACTION[,ACTION…] with actions subscribe|publish|admin"
    )]
    BadScope(String),
    /// A key name is invalid (caller misuse).
    #[error("invalid key name {0:?}: 1-64 characters, no control characters")]
    BadName(String),
    /// The store file is unreadable or corrupt.
    #[error("api-key store {path}: {message}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The random number generator failed.
    #[error("random: {0}")]
    Random(String),
}

/// What a scope permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ScopeAction {
    /// Subscribe to matching streams.
    Subscribe,
    /// Publish to matching streams.
    Publish,
    /// Operator actions (flips) on matching streams.
    Admin,
}

/// One scope: a stream pattern and the actions allowed on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Exact stream name, or a prefix followed by `*`.
    pub pattern: String,
    /// Allowed actions (sorted, deduplicated).
    pub actions: Vec<ScopeAction>,
}

impl Scope {
    /// Parses `PATTERN:ACTION[,ACTION…]`.
    pub fn parse(s: &str) -> Result<Self, ApiKeyError> {
        let bad = || ApiKeyError::BadScope(s.to_owned());
        let (pattern, actions) = s.split_once(':').ok_or_else(bad)?;
        let pattern = pattern.trim();
        let valid_pattern = !pattern.is_empty()
            && pattern.len() <= 256
            && !pattern[..pattern.len() - 1].contains('*')
            && pattern
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-*/".contains(c));
        if !valid_pattern {
            return Err(bad());
        }
        let mut acts = Vec::new();
        for a in actions.split(',') {
            acts.push(match a.trim() {
                "subscribe" => ScopeAction::Subscribe,
                "publish" => ScopeAction::Publish,
                "admin" => ScopeAction::Admin,
                _ => return Err(bad()),
            });
        }
        acts.sort();
        acts.dedup();
        Ok(Self {
            pattern: pattern.to_owned(),
            actions: acts,
        })
    }

    /// Whether this scope allows `action` on `stream`.
    pub fn allows(&self, stream: &str, action: ScopeAction) -> bool {
        let matches = match self.pattern.strip_suffix('*') {
            Some(prefix) => stream.starts_with(prefix),
            None => stream == self.pattern,
        };
        matches && self.actions.contains(&action)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let acts: Vec<&str> = self
            .actions
            .iter()
            .map(|a| match a {
                ScopeAction::Subscribe => "subscribe",
                ScopeAction::Publish => "publish",
                ScopeAction::Admin => "admin",
            })
            .collect();
        write!(f, "{}:{}", self.pattern, acts.join(","))
    }
}

/// A stored key record (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyRecord {
    /// Public key id (12 hex characters).
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// Scopes in `PATTERN:ACTIONS` form.
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the whole key string.
    pub sha256: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

impl ApiKeyRecord {
    /// Parsed scopes (records with unparsable scopes grant nothing for those entries).
    pub fn parsed_scopes(&self) -> Vec<Scope> {
        self.scopes
            .iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect()
    }

    /// Whether the key may perform `action` on `stream`.
    pub fn allows(&self, stream: &str, action: ScopeAction) -> bool {
        self.parsed_scopes()
            .iter()
            .any(|s| s.allows(stream, action))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    #[serde(default)]
    keys: Vec<ApiKeyRecord>,
}

/// The API-key store: `api-keys.toml` in memory.
#[derive(Debug, Default)]
pub struct ApiKeyStore {
    keys: Vec<ApiKeyRecord>,
}

/// A freshly generated key: show `key` once, then drop it.
#[derive(Debug)]
pub struct NewApiKey {
    /// The full key string (secret).
    pub key: String,
    /// Its stored record.
    pub record: ApiKeyRecord,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn split_key(key: &str) -> Option<(&str, &str)> {
    if key.len() > MAX_KEY_LEN {
        return None;
    }
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret)
        .is_ok_and(|b| b.len() == SECRET_BYTES);
    (id_ok && secret_ok).then_some((id, secret))
}

impl ApiKeyStore {
    /// Loads the store; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, ApiKeyError> {
        let err = |m: String| ApiKeyError::Store {
            path: path.to_owned(),
            message: m,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let f: StoreFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        Ok(Self { keys: f.keys })
    }

    /// Writes the store atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), ApiKeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |m: String| ApiKeyError::Store {
            path: path.to_owned(),
            message: m,
        };
        let text = toml::to_string_pretty(&StoreFile {
            keys: self.keys.clone(),
        })
        .map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(e.to_string()))?;
        f.write_all(
            b"# Sibyl API keys: SHA-256 hashes only. Managed by `sibyl-gateway keys api-key`.\n",
        )
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }

    /// Generates a key named `name` with `scopes` (each `PATTERN:ACTIONS`), adds its record.
    pub fn create(
        &mut self,
        name: &str,
        scopes: &[String],
        now_unix: u64,
    ) -> Result<NewApiKey, ApiKeyError> {
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(ApiKeyError::BadName(name.to_owned()));
        }
        let scopes = scopes
            .iter()
            .map(|s| Scope::parse(s).map(|s| s.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        loop {
            getrandom::fill(&mut id).map_err(|e| ApiKeyError::Random(e.to_string()))?;
            if !self.keys.iter().any(|k| k.id == hex::encode(id)) {
                break;
            }
        }
        getrandom::fill(&mut secret).map_err(|e| ApiKeyError::Random(e.to_string()))?;
        let key = format!(
            "{PREFIX}{}_{}",
            hex::encode(id),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let record = ApiKeyRecord {
            id: hex::encode(id),
            name: name.to_owned(),
            scopes,
            sha256: sha256_hex(&key),
            created_unix: now_unix,
        };
        self.keys.push(record.clone());
        Ok(NewApiKey { key, record })
    }

    /// Checks a presented key; returns its record.
    pub fn verify(&self, key: &str) -> Result<&ApiKeyRecord, ApiKeyError> {
        let (id, _) = split_key(key).ok_or(ApiKeyError::Malformed)?;
        let presented = Sha256::digest(key.as_bytes());
        let record = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(ApiKeyError::Rejected)?;
        let stored = hex::decode(&record.sha256).map_err(|_| ApiKeyError::Rejected)?;
        if stored.len() == presented.len() && bool::from(presented.as_slice().ct_eq(&stored)) {
            Ok(record)
        } else {
            Err(ApiKeyError::Rejected)
        }
    }

    /// Removes the key with `id`; whether it existed.
    pub fn revoke(&mut self, id: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.id != id);
        self.keys.len() != before
    }

    /// All records.
    pub fn records(&self) -> &[ApiKeyRecord] {
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_and_persist_only_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.toml");
        let mut s = ApiKeyStore::load(&path).unwrap();
        let k = s
            .create("orders-app", &["orders.*:subscribe,publish".into()], 1)
            .unwrap();
        assert!(k.key.starts_with("sk_"));
        assert_eq!(split_key(&k.key).unwrap().0, k.record.id);
        s.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let secret = split_key(&k.key).unwrap().1;
        assert!(!text.contains(secret), "the secret must never be stored");
        assert!(text.contains(&k.record.sha256));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let s = ApiKeyStore::load(&path).unwrap();
        let r = s.verify(&k.key).unwrap();
        assert_eq!(r.name, "orders-app");
        assert!(r.allows("orders.eu", ScopeAction::Publish));
        assert!(!r.allows("payments", ScopeAction::Subscribe));
        assert!(!r.allows("orders.eu", ScopeAction::Admin));
    }

    #[test]
    fn wrong_secret_same_id_is_rejected() {
        let mut s = ApiKeyStore::default();
        let k = s.create("a", &[], 0).unwrap();
        let (id, secret) = split_key(&k.key).unwrap();
        let mut b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(secret)
            .unwrap();
        b[0] ^= 1;
        let forged = format!(
            "sk_{id}_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        );
        assert!(matches!(s.verify(&forged), Err(ApiKeyError::Rejected)));
        let other = ApiKeyStore::default().create("b", &[], 0).unwrap();
        assert!(matches!(s.verify(&other.key), Err(ApiKeyError::Rejected)));
        assert!(s.revoke(&k.record.id));
        assert!(matches!(s.verify(&k.key), Err(ApiKeyError::Rejected)));
    }

    #[test]
    fn malformed_keys() {
        let s = ApiKeyStore::default();
        for k in [
            "",
            "sk_",
            "pk_0011aabbccdd_AAAA",
            "sk_zz11aabbccdd_AAAA",
            "sk_0011aabbccdd_!!",
            "sk_0011aabbccdd",
        ] {
            assert!(matches!(s.verify(k), Err(ApiKeyError::Malformed)), "{k}");
        }
        assert!(matches!(
            s.verify(&"x".repeat(10_000)),
            Err(ApiKeyError::Malformed)
        ));
    }

    #[test]
    fn scopes_parse_and_refuse_nonsense() {
        let sc = Scope::parse("orders.*:publish,subscribe,publish").unwrap();
        assert_eq!(sc.to_string(), "orders.*:subscribe,publish");
        assert!(sc.allows("orders.", ScopeAction::Subscribe));
        assert!(!sc.allows("order", ScopeAction::Subscribe));
        let exact = Scope::parse("prices:subscribe").unwrap();
        assert!(exact.allows("prices", ScopeAction::Subscribe));
        assert!(!exact.allows("prices2", ScopeAction::Subscribe));
        for bad in [
            "orders",
            "orders:",
            ":subscribe",
            "a*b:subscribe",
            "x:delete",
            "sp ace:publish",
        ] {
            assert!(
                matches!(Scope::parse(bad), Err(ApiKeyError::BadScope(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            ApiKeyStore::default().create("", &[], 0),
            Err(ApiKeyError::BadName(_))
        ));
    }

    #[test]
    fn corrupt_store_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys.toml");
        std::fs::write(&path, "[[keys]]\nid = 1\n").unwrap();
        let e = ApiKeyStore::load(&path).unwrap_err();
        assert!(e.to_string().contains("api-keys.toml"), "{e}");
    }
}
