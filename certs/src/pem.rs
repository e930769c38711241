//! PEM files: bounded reads, key-file permission checks, atomic writes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Largest PEM file this crate reads (1 MiB); larger files are refused before allocation.
pub const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// Reads every `CERTIFICATE` section of a PEM file, in order (end-entity first for a chain).
///
/// Errors: [`CertError::Io`], [`CertError::TooLarge`], [`CertError::Pem`], and
/// [`CertError::NoCertificates`] when the file has none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read_bounded(path)?;
    certs_from_pem(&bytes, path)
}

/// Parses every `CERTIFICATE` section of in-memory PEM; `origin` names it in errors.
pub(crate) fn certs_from_pem(
    bytes: &[u8],
    origin: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Pem {
            path: origin.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificates {
            path: origin.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
///
/// **Permissions policy (Unix):** a key file whose mode grants group or others any access
/// (`mode & 0o077 != 0`, as OpenSSH checks) is *refused* with [`CertError::InsecureKeyFile`];
/// fix it with `chmod 600`. Files this crate writes are created `0600`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    check_key_mode(path)?;
    let bytes = read_bounded(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(CertError::NoKey {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(CertError::Pem {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Refuses a key file that group or others may access (Unix only).
pub(crate) fn check_key_mode(path: &Path) -> Result<(), CertError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| CertError::io(path, e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CertError::InsecureKeyFile {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// Reads a whole file, refusing anything over [`MAX_PEM_FILE_BYTES`].
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, CertError> {
    let file = std::fs::File::open(path).map_err(|e| CertError::io(path, e))?;
    let mut buf = Vec::new();
    // Read one byte past the limit so an over-long file is detected without trusting
    // metadata (the file may grow while we read it).
    file.take(MAX_PEM_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CertError::io(path, e))?;
    if buf.len() as u64 > MAX_PEM_FILE_BYTES {
        return Err(CertError::TooLarge {
            path: path.to_path_buf(),
            limit: MAX_PEM_FILE_BYTES,
        });
    }
    Ok(buf)
}

/// Who may read a file written by [`write_atomic`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum FileMode {
    /// `0644`: certificates.
    Public,
    /// `0600`: private keys.
    Private,
}

/// Writes `contents` to a temporary file in the same directory (created with the final
/// mode, so a key is never briefly world-readable), syncs it and renames it over `path`.
/// Readers see either the old or the new file, never a partial one.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: FileMode) -> Result<(), CertError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".sibyl-certs-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let bits = match mode {
            FileMode::Public => 0o644,
            FileMode::Private => 0o600,
        };
        builder.permissions(std::fs::Permissions::from_mode(bits));
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut tmp = builder
        .tempfile_in(&dir)
        .map_err(|e| CertError::io(&dir, e))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| CertError::io(tmp.path(), e))?;
    tmp.persist(path)
        .map_err(|e| CertError::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_garbage_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        write_atomic(&empty, b"", FileMode::Private).unwrap();
        assert!(matches!(
            load_certs(&empty),
            Err(CertError::NoCertificates { .. })
        ));
        assert!(matches!(load_key(&empty), Err(CertError::NoKey { .. })));

        let garbage = dir.path().join("garbage.pem");
        write_atomic(
            &garbage,
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            FileMode::Private,
        )
        .unwrap();
        let err = load_certs(&garbage).unwrap_err();
        assert!(matches!(err, CertError::Pem { .. }), "{err:?}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");

        let missing = dir.path().join("missing.pem");
        let err = load_certs(&missing).unwrap_err();
        assert!(matches!(err, CertError::Io { .. }));
        assert!(err.to_string().contains("missing.pem"));
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.pem");
        let len = usize::try_from(MAX_PEM_FILE_BYTES).unwrap() + 1;
        write_atomic(&big, &vec![b'A'; len], FileMode::Public).unwrap();
        assert!(matches!(load_certs(&big), Err(CertError::TooLarge { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn modes_and_insecure_key_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        let cert = dir.path().join("c.pem");
        write_atomic(&key, b"x", FileMode::Private).unwrap();
        write_atomic(&cert, b"x", FileMode::Public).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        // Overwriting keeps the mode and leaves no temporary files behind.
        write_atomic(&key, b"y", FileMode::Private).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key(&key).unwrap_err();
        assert!(
            matches!(err, CertError::InsecureKeyFile { mode: 0o640, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("k.key"));
    }
}
