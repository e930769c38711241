//! The development CA and the leaf certificates it issues (rcgen), and `certs init`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::CertError;
use crate::fingerprint::sha256_fingerprint;
use crate::pem::{FileMode, check_key_mode, read_bounded, write_atomic};

/// Names every leaf certificate carries, besides the configured ones.
pub const DEFAULT_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Common name of the CA that [`DevCa::generate`] creates.
pub const DEV_CA_COMMON_NAME: &str = "Sibyl development CA";

/// The four files of a certificate directory (see [`init_dir`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertPaths {
    /// CA certificate, `ca.pem` (give this to clients as their trust anchor).
    pub ca_cert: PathBuf,
    /// CA private key, `ca.key` (mode 0600).
    pub ca_key: PathBuf,
    /// Server leaf certificate, `server.pem`.
    pub server_cert: PathBuf,
    /// Server leaf private key, `server.key` (mode 0600).
    pub server_key: PathBuf,
}

impl CertPaths {
    /// `ca.pem`, `ca.key`, `server.pem` and `server.key` inside `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }
}

/// Options for issuing certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitOptions {
    /// Extra subject alternative names for leaves (DNS names or IP addresses), on top of
    /// [`DEFAULT_SANS`]. Default: none.
    pub names: Vec<String>,
    /// Leaf validity after *now*. Default: 90 days.
    pub leaf_lifetime: Duration,
    /// CA validity after *now*. Default: 10 years (3650 days).
    pub ca_lifetime: Duration,
    /// How far before *now* `notBefore` is set, to tolerate clock skew. Default: 1 hour.
    pub backdate: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        const DAY: u64 = 24 * 60 * 60;
        Self {
            names: Vec::new(),
            leaf_lifetime: Duration::from_secs(90 * DAY),
            ca_lifetime: Duration::from_secs(3650 * DAY),
            backdate: Duration::from_secs(60 * 60),
        }
    }
}

/// A development certificate authority: a self-signed ECDSA P-256 CA certificate and its key.
pub struct DevCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    /// rcgen's issuer view of the CA (subject name, key identifier), used for signing.
    issuer: rcgen::Certificate,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field(
                "fingerprint",
                &crate::fingerprint_hex(&sha256_fingerprint(&self.cert_der)),
            )
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its private key, as PEM.
#[derive(Clone)]
#[non_exhaustive]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("fingerprint", &crate::fingerprint_hex(&self.fingerprint()))
            .finish_non_exhaustive()
    }
}

impl Leaf {
    /// SHA-256 of the certificate's DER (what a pinned client compares).
    pub fn fingerprint(&self) -> [u8; 32] {
        sha256_fingerprint(&self.cert_der)
    }

    /// Writes the certificate (mode 0644) and the key (mode 0600), each atomically. The key
    /// is written first so that a resolver watching both never pairs a new certificate with
    /// an old key for longer than the gap between the two renames.
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), CertError> {
        write_atomic(key, self.key_pem.as_bytes(), FileMode::Private)?;
        write_atomic(cert, self.cert_pem.as_bytes(), FileMode::Public)
    }
}

fn validity(
    now: SystemTime,
    backdate: Duration,
    lifetime: Duration,
) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let now = OffsetDateTime::from(now);
    let back = time::Duration::try_from(backdate)
        .map_err(|_| CertError::InvalidOptions("backdate out of range"))?;
    let life = time::Duration::try_from(lifetime)
        .map_err(|_| CertError::InvalidOptions("lifetime out of range"))?;
    let not_before = now
        .checked_sub(back)
        .ok_or(CertError::InvalidOptions("backdate out of range"))?;
    let not_after = now
        .checked_add(life)
        .ok_or(CertError::InvalidOptions("lifetime out of range"))?;
    // X.509 GeneralizedTime covers years up to 9999.
    if not_after.year() > 9999 || not_before.year() < 1950 {
        return Err(CertError::InvalidOptions(
            "validity must stay within the years 1950..=9999",
        ));
    }
    Ok((not_before, not_after))
}

impl DevCa {
    /// A new CA valid from `now - backdate` for `ca_lifetime`.
    pub fn generate(opts: &InitOptions) -> Result<Self, CertError> {
        Self::generate_at(opts, SystemTime::now())
    }

    /// [`generate`](Self::generate) with an explicit clock reading.
    pub fn generate_at(opts: &InitOptions, now: SystemTime) -> Result<Self, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, DEV_CA_COMMON_NAME);
        dn.push(DnType::OrganizationName, "Sibyl");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = validity(now, opts.backdate, opts.ca_lifetime)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
            issuer: cert,
        })
    }

    /// Loads a CA from its PEM certificate and key (the key file's mode is checked as in
    /// [`load_key`](crate::load_key)).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CertError> {
        let cert_bytes = read_bounded(cert)?;
        let cert_der = crate::pem::certs_from_pem(&cert_bytes, cert)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::NoCertificates {
                path: cert.to_path_buf(),
            })?;
        let cert_pem = String::from_utf8(cert_bytes).map_err(|_| CertError::BadCa {
            path: cert.to_path_buf(),
            source: rcgen::Error::CouldNotParseCertificate,
        })?;
        check_key_mode(key)?;
        let key_bytes = read_bounded(key)?;
        let key_pem = std::str::from_utf8(&key_bytes).map_err(|_| CertError::NoKey {
            path: key.to_path_buf(),
        })?;
        let key_pair = KeyPair::from_pem(key_pem).map_err(|source| CertError::BadCa {
            path: key.to_path_buf(),
            source,
        })?;
        let params =
            CertificateParams::from_ca_cert_der(&cert_der).map_err(|source| CertError::BadCa {
                path: cert.to_path_buf(),
                source,
            })?;
        if key_pair.public_key_der() != spki_of(&cert_der, cert)? {
            return Err(CertError::BadCa {
                path: key.to_path_buf(),
                source: rcgen::Error::CouldNotParseKeyPair,
            });
        }
        // Re-signing the parsed parameters gives rcgen an issuer with the same subject and
        // key identifier as the stored certificate; its own DER is not used.
        let issuer = params.self_signed(&key_pair)?;
        Ok(Self {
            cert_pem,
            cert_der,
            key: key_pair,
            issuer,
        })
    }

    /// Writes the certificate (0644) and key (0600), each atomically.
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), CertError> {
        write_atomic(key, self.key.serialize_pem().as_bytes(), FileMode::Private)?;
        write_atomic(cert, self.cert_pem.as_bytes(), FileMode::Public)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate's DER.
    pub fn fingerprint(&self) -> [u8; 32] {
        sha256_fingerprint(&self.cert_der)
    }

    /// Issues a leaf (fresh ECDSA P-256 key) for [`DEFAULT_SANS`] plus `names`, valid from
    /// `now - opts.backdate` for `opts.leaf_lifetime`, usable for both server and client
    /// authentication. `opts.names` is not consulted; pass the names here.
    pub fn issue_leaf(&self, names: &[String], opts: &InitOptions) -> Result<Leaf, CertError> {
        self.issue_leaf_at(names, opts, SystemTime::now())
    }

    /// [`issue_leaf`](Self::issue_leaf) with an explicit clock reading.
    pub fn issue_leaf_at(
        &self,
        names: &[String],
        opts: &InitOptions,
        now: SystemTime,
    ) -> Result<Leaf, CertError> {
        let mut sans: Vec<String> = DEFAULT_SANS.iter().map(|s| (*s).to_owned()).collect();
        for n in names {
            let n = n.trim().to_ascii_lowercase();
            if !n.is_empty() && !sans.contains(&n) {
                sans.push(n);
            }
        }
        // CertificateParams::new makes IP SANs of what parses as an address, DNS SANs of
        // the rest.
        let mut params = CertificateParams::new(sans.clone())?;
        let mut dn = DistinguishedName::new();
        let cn = names
            .iter()
            .map(|n| n.trim())
            .find(|n| !n.is_empty())
            .unwrap_or("localhost");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::NoCa; // not ExplicitNoCa: DER forbids encoding the default cA=FALSE (strict parsers, e.g. Python cryptography, reject it)
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(now, opts.backdate, opts.leaf_lifetime)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }
}

/// The SubjectPublicKeyInfo DER of a certificate.
fn spki_of(cert_der: &CertificateDer<'_>, path: &Path) -> Result<Vec<u8>, CertError> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert_der).map_err(|source| {
        CertError::BadCertificate {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(parsed.subject_public_key_info().as_ref().to_vec())
}

/// `certs init`: makes `dir` (mode 0700 when created), reuses `ca.pem`/`ca.key` if both
/// exist (or generates and saves a new CA if neither does), then issues a fresh server leaf
/// for `opts.names` into `server.pem`/`server.key`. Key files are written 0600, atomically.
///
/// If only one of the CA files exists this fails with [`CertError::IncompleteCa`] rather
/// than overwrite the other.
pub fn init_dir(dir: &Path, opts: &InitOptions) -> Result<CertPaths, CertError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| CertError::io(dir, e))?;

    let paths = CertPaths::in_dir(dir);
    let ca = match (paths.ca_cert.exists(), paths.ca_key.exists()) {
        (true, true) => DevCa::load(&paths.ca_cert, &paths.ca_key)?,
        (false, false) => {
            let ca = DevCa::generate(opts)?;
            ca.save(&paths.ca_cert, &paths.ca_key)?;
            tracing::info!(
                fingerprint = %crate::fingerprint_hex(&ca.fingerprint()),
                path = %paths.ca_cert.display(),
                "generated development CA"
            );
            ca
        }
        (true, false) => {
            return Err(CertError::IncompleteCa {
                present: paths.ca_cert.clone(),
                missing: paths.ca_key.clone(),
            });
        }
        (false, true) => {
            return Err(CertError::IncompleteCa {
                present: paths.ca_key.clone(),
                missing: paths.ca_cert.clone(),
            });
        }
    };
    let leaf = ca.issue_leaf(&opts.names, opts)?;
    leaf.save(&paths.server_cert, &paths.server_key)?;
    Ok(paths)
}
