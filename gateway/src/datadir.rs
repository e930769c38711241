//! The data directory: created on first start, reused afterwards.
//!
//! ```text
//! <data_dir>/            mode 0700
//!   certs/ca.pem ca.key server.pem server.key   (sibyl_certs::init_dir; keys 0600)
//!   keyring.cbor                                 (sibyl_tokens::Keyring::save; 0600)
//!   api-keys.toml                                (apikeys::ApiKeyStore; hashes only; 0600)
//! ```
//!
//! On first start (no `api-keys.toml`) one development API key with scope
//! `*:subscribe,publish` is created and returned once in [`Bootstrap::dev_api_key`]; it is
//! never stored in clear.
//!
//! At every start, not only the first, the directory and its secret files (private keys,
//! keyring, API-key hashes) must be inaccessible to group and others: otherwise the start
//! is refused with [`DataDirError::Exposed`], naming the path (as OpenSSH refuses a key file).

use std::path::{Path, PathBuf};

use sibyl_certs::{CertPaths, InitOptions};
use sibyl_tokens::Keyring;

use crate::apikeys::{ApiKeyError, ApiKeyStore};

/// File name of the token keyring inside the data dir.
pub const KEYRING_FILE: &str = "keyring.cbor";
/// File name of the API-key store inside the data dir.
pub const API_KEYS_FILE: &str = "api-keys.toml";
/// Sub-directory holding certificates.
pub const CERTS_DIR: &str = "certs";
/// Name of the development API key created on first start.
pub const DEV_KEY_NAME: &str = "dev";
/// Scope of the development API key.
pub const DEV_KEY_SCOPE: &str = "*:subscribe,publish";

/// Why the data directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Creating or inspecting the directory failed.
    #[error("data dir {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Certificates could not be created or read.
    #[error("certificates: {0}")]
    Certs(#[from] sibyl_certs::CertError),
    /// The keyring could not be created or read.
    #[error("token keyring: {0}")]
    Keyring(#[from] sibyl_tokens::KeyringError),
    /// The API-key store could not be created or read.
    #[error("{0}")]
    ApiKeys(#[from] ApiKeyError),
    /// The CA file holds no certificate.
    #[error("{0}: no certificate in file")]
    NoCaCert(PathBuf),
    /// The directory or one of its secret files is accessible to group or others.
    #[error(
        "{path} is accessible to group or others (mode {mode:04o}); refusing to start. \
         Fix: chmod {fix:o} {path}",
        path = path.display()
    )]
    Exposed {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// The mode to set (0700 for the directory, 0600 for files).
        fix: u32,
    },
}

/// Refuses `path` if group or others have any permission on it.
fn check_private(path: &Path, fix: u32) -> Result<(), DataDirError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| DataDirError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(DataDirError::Exposed {
            path: path.to_owned(),
            mode,
            fix,
        });
    }
    Ok(())
}

/// Paths inside a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    /// The directory.
    pub root: PathBuf,
    /// Certificate files.
    pub certs: CertPaths,
    /// The token keyring.
    pub keyring: PathBuf,
    /// The API-key store.
    pub api_keys: PathBuf,
}

impl DataDir {
    /// The layout under `root` (nothing is touched).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            certs: CertPaths::in_dir(&root.join(CERTS_DIR)),
            keyring: root.join(KEYRING_FILE),
            api_keys: root.join(API_KEYS_FILE),
        }
    }
}

/// The result of [`bootstrap`].
#[derive(Debug)]
pub struct Bootstrap {
    /// Paths.
    pub dir: DataDir,
    /// The loaded (or new) token keyring.
    pub keyring: Keyring,
    /// CA certificate fingerprint, `AB:CD:…`.
    pub ca_fingerprint: String,
    /// The development API key, only on the start that created it (print it once).
    pub dev_api_key: Option<String>,
    /// Which files were created on this start (for the log).
    pub created: Vec<PathBuf>,
}

/// Creates whatever is missing in `root` and loads the rest. `cert_names` are extra
/// subject names for a newly issued server certificate.
pub fn bootstrap(
    root: &Path,
    cert_names: &[String],
    now_unix: u64,
) -> Result<Bootstrap, DataDirError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = DataDir::at(root);
    let mut created = Vec::new();
    if !root.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|source| DataDirError::Io {
                path: root.to_owned(),
                source,
            })?;
        created.push(root.to_owned());
    }
    check_private(root, 0o700)?;
    let c = &dir.certs;
    if !(c.ca_cert.exists() && c.ca_key.exists() && c.server_cert.exists() && c.server_key.exists())
    {
        let opts = InitOptions {
            names: cert_names.to_vec(),
            ..InitOptions::default()
        };
        sibyl_certs::init_dir(&root.join(CERTS_DIR), &opts)?;
        created.push(root.join(CERTS_DIR));
    }
    let keyring = if dir.keyring.exists() {
        Keyring::load(&dir.keyring)?
    } else {
        let k = Keyring::generate()?;
        k.save(&dir.keyring)?;
        created.push(dir.keyring.clone());
        k
    };
    let dev_api_key = if dir.api_keys.exists() {
        // Parse it now so a corrupt store fails at start, not at the first client.
        ApiKeyStore::load(&dir.api_keys)?;
        None
    } else {
        let mut store = ApiKeyStore::default();
        let k = store.create(DEV_KEY_NAME, &[DEV_KEY_SCOPE.to_owned()], now_unix)?;
        store.save(&dir.api_keys)?;
        created.push(dir.api_keys.clone());
        Some(k.key)
    };
    for secret in [&c.ca_key, &c.server_key, &dir.keyring, &dir.api_keys] {
        check_private(secret, 0o600)?;
    }
    let ca = sibyl_certs::load_certs(&c.ca_cert)?;
    let first = ca
        .first()
        .ok_or_else(|| DataDirError::NoCaCert(c.ca_cert.clone()))?;
    let ca_fingerprint = sibyl_certs::fingerprint_hex(&sibyl_certs::sha256_fingerprint(first));
    Ok(Bootstrap {
        dir,
        keyring,
        ca_fingerprint,
        dev_api_key,
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn first_start_creates_everything_later_starts_reuse_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sibyl-data");
        let b = bootstrap(&root, &[], 1).unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let key = b.dev_api_key.clone().expect("dev key on first start");
        for p in [
            &b.dir.certs.ca_cert,
            &b.dir.certs.server_key,
            &b.dir.keyring,
            &b.dir.api_keys,
        ] {
            assert!(p.exists(), "{}", p.display());
        }
        assert_eq!(b.ca_fingerprint.len(), 32 * 3 - 1);
        let store = ApiKeyStore::load(&b.dir.api_keys).unwrap();
        assert_eq!(store.verify(&key).unwrap().name, DEV_KEY_NAME);

        let again = bootstrap(&root, &[], 2).unwrap();
        assert!(
            again.dev_api_key.is_none(),
            "the dev key is printed only once"
        );
        assert!(again.created.is_empty());
        assert_eq!(again.ca_fingerprint, b.ca_fingerprint);
        assert_eq!(again.keyring.to_bytes(), b.keyring.to_bytes());
        assert!(
            ApiKeyStore::load(&again.dir.api_keys)
                .unwrap()
                .verify(&key)
                .is_ok()
        );
    }

    #[test]
    fn a_corrupt_key_store_fails_the_start() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("d");
        bootstrap(&root, &[], 1).unwrap();
        std::fs::write(root.join(API_KEYS_FILE), "garbage = [").unwrap();
        assert!(matches!(
            bootstrap(&root, &[], 2),
            Err(DataDirError::ApiKeys(_))
        ));
    }

    #[test]
    fn an_exposed_dir_or_secret_file_fails_every_start() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("d");
        let b = bootstrap(&root, &[], 1).unwrap();
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        chmod(&root, 0o755);
        match bootstrap(&root, &[], 2) {
            Err(e @ DataDirError::Exposed { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&root.display().to_string()), "{msg}");
                assert!(msg.contains("0755") && msg.contains("chmod 700"), "{msg}");
            }
            other => panic!("expected Exposed, got {other:?}"),
        }
        chmod(&root, 0o700);
        for secret in [
            &b.dir.api_keys,
            &b.dir.certs.ca_key,
            &b.dir.certs.server_key,
        ] {
            chmod(secret, 0o640);
            assert!(
                matches!(bootstrap(&root, &[], 3), Err(DataDirError::Exposed { ref path, .. }) if path == secret),
                "{}",
                secret.display()
            );
            chmod(secret, 0o600);
        }
        bootstrap(&root, &[], 4).unwrap();
    }
}
