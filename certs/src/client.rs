//! Client-side rustls configuration: how a client decides to trust a server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use subtle::ConstantTimeEq;

use crate::fingerprint::sha256_fingerprint;
use crate::pem::{certs_from_pem, load_certs, load_key};
use crate::{ALPN, CertError, provider};

/// How a client decides whether the server's certificate is genuine. There is no default:
/// every client picks one.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Trust {
    /// Trust the CA certificate(s) in this PEM file (e.g. the dev CA's `ca.pem`); the server
    /// name is checked against the leaf's SANs and validity is checked.
    CaFile(PathBuf),
    /// As [`CaFile`](Self::CaFile), from PEM bytes in memory.
    CaPem(Vec<u8>),
    /// Trust the operating system's root store (via `rustls-native-certs`, which also honours
    /// `SSL_CERT_FILE` / `SSL_CERT_DIR`).
    PlatformRoots,
    /// Development: trust exactly the server certificate whose DER has this SHA-256 (see
    /// [`sha256_fingerprint`]). The comparison is constant-time and the TLS 1.3 handshake
    /// signature is still verified against that certificate's key; the server name and the
    /// certificate's validity period are **not** checked (the pin is the identity).
    PinnedSha256([u8; 32]),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CaFile(p) => f.debug_tuple("CaFile").field(p).finish(),
            Self::CaPem(b) => write!(f, "CaPem({} bytes)", b.len()),
            Self::PlatformRoots => f.write_str("PlatformRoots"),
            Self::PinnedSha256(fp) => {
                write!(f, "PinnedSha256({})", crate::fingerprint_hex(fp))
            }
        }
    }
}

#[derive(Debug)]
enum Mode {
    Trust(Trust),
    DangerousAcceptAny,
}

/// Builds the client's `rustls::ClientConfig`: TLS 1.3 only, ring provider, ALPN
/// [`ALPN`], SNI on, no 0-RTT.
#[derive(Debug)]
#[must_use]
pub struct ClientTlsBuilder {
    mode: Mode,
    client_auth: Option<(PathBuf, PathBuf)>,
}

impl ClientTlsBuilder {
    /// A client that trusts servers according to `trust`.
    pub fn new(trust: Trust) -> Self {
        Self {
            mode: Mode::Trust(trust),
            client_auth: None,
        }
    }

    /// **Dangerous**: a client that accepts any server certificate, authenticating nobody
    /// (the handshake signature is still checked against whatever certificate is presented,
    /// which proves nothing about who the server is). For throwaway local experiments only;
    /// prefer [`Trust::PinnedSha256`].
    pub fn dangerous_accept_any_server_cert() -> Self {
        Self {
            mode: Mode::DangerousAcceptAny,
            client_auth: None,
        }
    }

    /// Presents this certificate chain (PEM, end-entity first) and key to servers that ask
    /// for client authentication (mTLS).
    pub fn client_auth(mut self, cert: &Path, key: &Path) -> Self {
        self.client_auth = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Loads the files and builds the configuration.
    pub fn build(self) -> Result<Arc<rustls::ClientConfig>, CertError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match self.mode {
            Mode::Trust(Trust::CaFile(path)) => {
                let certs = load_certs(&path)?;
                builder.with_root_certificates(root_store(certs, &path)?)
            }
            Mode::Trust(Trust::CaPem(bytes)) => {
                let origin = Path::new("<in-memory CA PEM>");
                let certs = certs_from_pem(&bytes, origin)?;
                builder.with_root_certificates(root_store(certs, origin)?)
            }
            Mode::Trust(Trust::PlatformRoots) => builder.with_root_certificates(platform_roots()?),
            Mode::Trust(Trust::PinnedSha256(pin)) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SignatureOnlyVerifier {
                    identity: Identity::Pinned(pin),
                    algs: provider.signature_verification_algorithms,
                })),
            Mode::DangerousAcceptAny => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SignatureOnlyVerifier {
                        identity: Identity::Any,
                        algs: provider.signature_verification_algorithms,
                    }))
            }
        };
        let mut config = match self.client_auth {
            Some((cert, key)) => {
                let chain = load_certs(&cert)?;
                let key_der = load_key(&key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|source| CertError::BadKey { path: key, source })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Arc::new(config))
    }
}

fn root_store(
    certs: Vec<CertificateDer<'static>>,
    origin: &Path,
) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|source| CertError::BadCertificate {
                path: origin.to_path_buf(),
                source,
            })?;
    }
    Ok(roots)
}

fn platform_roots() -> Result<RootCertStore, CertError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(loaded.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "ignored unparsable platform root certificates");
    }
    if added == 0 {
        let details = loaded
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(CertError::NoPlatformRoots {
            details: if details.is_empty() {
                String::new()
            } else {
                format!(": {details}")
            },
        });
    }
    Ok(roots)
}

/// Which end-entity certificates a [`SignatureOnlyVerifier`] accepts.
#[derive(Debug)]
enum Identity {
    /// Exactly one, by SHA-256 of its DER (compared in constant time).
    Pinned([u8; 32]),
    /// Any; reachable only through `dangerous_accept_any_server_cert`.
    Any,
}

/// A verifier that does not build a chain: it checks the end-entity certificate against
/// `identity` and still verifies the TLS 1.3 handshake signature, so the peer must hold the
/// certificate's private key.
#[derive(Debug)]
struct SignatureOnlyVerifier {
    identity: Identity,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SignatureOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let accepted = match &self.identity {
            Identity::Pinned(pin) => bool::from(sha256_fingerprint(end_entity).ct_eq(pin)),
            Identity::Any => true,
        };
        if accepted {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs built here only enable TLS 1.3.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
