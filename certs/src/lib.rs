//! # sibyl-certs
//!
//! Development CA and leaf certificates, and the rustls configurations every Sibyl QUIC
//! endpoint uses (TLS 1.3 only, ring provider, ALPN [`ALPN`] = `sibyl/1`).
//!
//! ```text
//!  certs init ──▶ init_dir(dir) ──▶ DevCa (ca.pem, ca.key 0600) ──issue_leaf──▶ server.pem, server.key 0600
//!                                                                                   │
//!  hub / shard ──▶ ServerTlsBuilder(default cert, SNI map, mTLS CA?) ──▶ Arc<ServerConfig> + ReloadHandle
//!                      (resolver re-reads changed files at most once per reload_interval)
//!  SDK client  ──▶ ClientTlsBuilder(Trust::{CaFile, CaPem, PlatformRoots, PinnedSha256}) ──▶ Arc<ClientConfig>
//! ```
//!
//! Both configs can be wrapped by quinn 0.11's `QuicServerConfig::try_from` /
//! `QuicClientConfig::try_from`. 0-RTT is not enabled.
//!
//! **Key files.** Keys are written mode `0600` via a temporary file and a rename. Reading a
//! key whose mode grants group or others any access is *refused*
//! ([`CertError::InsecureKeyFile`]), as OpenSSH does.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod client;
mod error;
mod fingerprint;
mod issue;
mod pem;
mod server;

use std::sync::Arc;

pub use client::{ClientTlsBuilder, Trust};
pub use error::CertError;
pub use fingerprint::{fingerprint_hex, parse_fingerprint, sha256_fingerprint};
pub use issue::{CertPaths, DEFAULT_SANS, DEV_CA_COMMON_NAME, DevCa, InitOptions, Leaf, init_dir};
pub use pem::{MAX_PEM_FILE_BYTES, load_certs, load_key};
pub use server::{
    DEFAULT_RELOAD_INTERVAL, DEFAULT_SESSION_TICKETS, ReloadHandle, SESSION_CACHE_SIZE,
    ServerTlsBuilder,
};

/// The ALPN protocol identifier of Sibyl's QUIC protocol, version 1.
pub const ALPN: &[u8] = b"sibyl/1";

/// The TLS 1.3 cipher suites of [`provider`], most preferred first.
///
/// `TLS_AES_128_GCM_SHA256` leads (rustls' own default puts `TLS_AES_256_GCM_SHA384`
/// first). The handshake's key schedule runs on the suite's hash. On the development VM
/// ring computes SHA-256 with the CPU's SHA extensions and SHA-512 (which SHA-384 is) in
/// portable code, and bare quinn servers completed about 10 % more handshakes per second
/// with this order (`sibyl-bench baseline-admission`, docs/BENCHMARKS.md), with no
/// measurable change to bulk transfer. The other two stay for peers that want them; a
/// server follows the client's order.
pub const CIPHER_SUITES: [rustls::SupportedCipherSuite; 3] = [
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
];

/// The crypto provider every config of this crate is built with: rustls' ring provider with
/// [`CIPHER_SUITES`] in that order.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    })
}
