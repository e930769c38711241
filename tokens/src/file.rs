//! Key files: [`Keyring::load`] and [`Keyring::save`].
//!
//! The file holds [`Keyring::to_bytes`] (CBOR: `{"v": 1, "k": [{"i": id, "k": 32 bytes,
//! "r": retire-at or null}, …]}`, ascending ids, the last key active). On Unix it is written
//! with mode 0600 through a temporary file in the same directory, fsynced and renamed over the
//! target; loading refuses a file whose mode grants any access to group or others.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::claims::fill_random;
use crate::error::KeyringError;
use crate::keyring::{Keyring, MAX_KEYRING_LEN};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyringError + '_ {
    move |source| KeyringError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Keyring {
    /// Loads a key file written by [`Keyring::save`], refusing it (on Unix) when group or
    /// others have any permission on it.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let file = fs::File::open(path).map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        check_permissions(path, &meta)?;
        if meta.len() > MAX_KEYRING_LEN as u64 {
            return Err(KeyringError::TooLarge {
                len: usize::try_from(meta.len()).unwrap_or(usize::MAX),
            });
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        file.take(MAX_KEYRING_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        Self::from_bytes(&bytes)
    }

    /// Writes the keyring to `path` atomically (temporary file, fsync, rename), with mode 0600
    /// on Unix.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        let bytes = Zeroizing::new(self.to_bytes());
        let tmp = temp_path(path)?;
        let result = write_new(&tmp, &bytes).and_then(|()| {
            fs::rename(&tmp, path).map_err(io_err(path))?;
            sync_parent(path)
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &fs::Metadata) -> Result<(), KeyringError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyringError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &fs::Metadata) -> Result<(), KeyringError> {
    Ok(())
}

fn temp_path(path: &Path) -> Result<PathBuf, KeyringError> {
    let name = path.file_name().ok_or_else(|| KeyringError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let mut suffix = [0u8; 8];
    fill_random(&mut suffix)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", u64::from_le_bytes(suffix)));
    Ok(path.with_file_name(tmp_name))
}

fn write_new(tmp: &Path, bytes: &[u8]) -> Result<(), KeyringError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tmp).map_err(io_err(tmp))?;
    file.write_all(bytes).map_err(io_err(tmp))?;
    file.sync_all().map_err(io_err(tmp))
}

#[cfg(unix)]
fn sync_parent(path: &Path) -> Result<(), KeyringError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err(parent))
}

#[cfg(not(unix))]
fn sync_parent(_path: &Path) -> Result<(), KeyringError> {
    Ok(())
}
