//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong creating, reading or using certificates.
///
/// Every variant that concerns a file names its path in the message. Broadly:
/// [`Io`](Self::Io), [`TooLarge`](Self::TooLarge), [`Pem`](Self::Pem),
/// [`NoCertificates`](Self::NoCertificates), [`NoKey`](Self::NoKey),
/// [`BadCertificate`](Self::BadCertificate), [`BadKey`](Self::BadKey) and
/// [`BadCa`](Self::BadCa) are problems with the files' contents or the file system;
/// [`InsecureKeyFile`](Self::InsecureKeyFile) and [`IncompleteCa`](Self::IncompleteCa) are
/// operator set-up mistakes; [`BadFingerprint`](Self::BadFingerprint) and
/// [`InvalidOptions`](Self::InvalidOptions) are caller misuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Reading, writing or creating a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file is larger than [`MAX_PEM_FILE_BYTES`](crate::MAX_PEM_FILE_BYTES).
    #[error("{}: file is larger than {limit} bytes, refusing to read it as PEM", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file is not valid PEM.
    #[error("{}: invalid PEM: {source}", path.display())]
    Pem {
        /// The file (or a `<...>` placeholder for in-memory PEM).
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file holds no `CERTIFICATE` section.
    #[error("{}: no certificate found", path.display())]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no private key (PKCS#8, PKCS#1 or SEC1).
    #[error("{}: no private key found", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A private key file can be read or written by group or others (`mode & 0o077 != 0`).
    #[error(
        "{}: private key file has mode {mode:o}, which lets group or others access it; \
         run `chmod 600` on it",
        path.display()
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate could not be used (for example as a trust anchor).
    #[error("{}: unusable certificate: {source}", path.display())]
    BadCertificate {
        /// The file the certificate came from.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// A private key could not be loaded by the crypto provider, or does not match its
    /// certificate.
    #[error("{}: unusable private key: {source}", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// An existing CA certificate or key could not be loaded for signing.
    #[error("{}: cannot use as CA: {source}", path.display())]
    BadCa {
        /// The CA certificate or key file.
        path: PathBuf,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// Only one of the CA certificate and CA key exists; refusing to overwrite the other.
    #[error(
        "{} exists but {} does not; remove it or restore the missing file",
        present.display(),
        missing.display()
    )]
    IncompleteCa {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused a configuration.
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    /// No usable platform root certificate was found.
    #[error("no usable platform root certificates found{details}")]
    NoPlatformRoots {
        /// Errors reported while loading them, if any (starts with `": "`).
        details: String,
    },
    /// A certificate fingerprint string is not 32 bytes of hex.
    #[error("bad SHA-256 fingerprint: {0}")]
    BadFingerprint(String),
    /// An option is out of range (for example a lifetime that overflows the date range).
    #[error("invalid option: {0}")]
    InvalidOptions(&'static str),
}

impl CertError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
