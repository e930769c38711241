//! Which TLS 1.3 cipher suite the configs of this crate negotiate (in-memory rustls
//! handshakes: the suite choice is the same over QUIC).

use std::sync::Arc;

use rustls::crypto::ring::cipher_suite;
use rustls::{CipherSuite, ClientConnection, ServerConnection};
use rustls_pki_types::ServerName;
use sibyl_certs::{
    ALPN, CIPHER_SUITES, ClientTlsBuilder, InitOptions, ServerTlsBuilder, Trust, init_dir,
    load_certs,
};

/// Runs a handshake between `client` and `server` in memory; the negotiated suite.
fn negotiate(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>) -> CipherSuite {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = ClientConnection::new(client, name).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    // A handshake takes a few flights; a bound instead of a loop that could spin.
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets().unwrap();
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets().unwrap();
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake did not finish"
    );
    let suite = c.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(Some(suite), s.negotiated_cipher_suite().map(|s| s.suite()));
    suite
}

struct Configs {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn configs() -> Configs {
    let dir = tempfile::tempdir().unwrap();
    let paths = init_dir(&dir.path().join("certs"), &InitOptions::default()).unwrap();
    let client = ClientTlsBuilder::new(Trust::CaFile(paths.ca_cert.clone()))
        .build()
        .unwrap();
    let (server, _reload) = ServerTlsBuilder::new(&paths.server_cert, &paths.server_key)
        .build()
        .unwrap();
    Configs {
        _dir: dir,
        ca: paths.ca_cert,
        client,
        server,
    }
}

#[test]
fn sibyl_client_and_server_agree_on_aes_128_gcm_sha256() {
    assert_eq!(CIPHER_SUITES[0], cipher_suite::TLS13_AES_128_GCM_SHA256);
    let c = configs();
    assert_eq!(
        negotiate(c.client, c.server),
        CipherSuite::TLS13_AES_128_GCM_SHA256
    );
}

#[test]
fn the_server_follows_a_client_that_prefers_another_suite() {
    let c = configs();
    for wanted in [
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![wanted, cipher_suite::TLS13_AES_128_GCM_SHA256];
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(&c.ca).unwrap() {
            roots.add(cert).unwrap();
        }
        let mut rebuilt = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        rebuilt.alpn_protocols = vec![ALPN.to_vec()];
        assert_eq!(
            negotiate(Arc::new(rebuilt), c.server.clone()),
            wanted.suite()
        );
    }
}
