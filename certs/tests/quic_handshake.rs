//! Real QUIC handshakes (quinn on 127.0.0.1, port 0) with the configs this crate builds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;
use sibyl_certs::{
    ALPN, CertError, ClientTlsBuilder, DevCa, InitOptions, ReloadHandle, ServerTlsBuilder, Trust,
    fingerprint_hex, init_dir, load_certs, sha256_fingerprint,
};

/// Upper bound for one handshake round trip on loopback; a safety net against hangs, not a
/// timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(20);

struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"test over");
    }
}

/// Runs a server that, on each accepted connection, opens a uni stream and writes
/// `client:<hex fingerprint of the client cert or none>`.
fn serve(config: Arc<rustls::ServerConfig>) -> Server {
    let crypto = QuicServerConfig::try_from(config).expect("TLS 1.3 config with AES-128-GCM");
    let server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let who = conn
                    .peer_identity()
                    .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
                    .and_then(|chain| {
                        chain
                            .first()
                            .map(|c| fingerprint_hex(&sha256_fingerprint(c)))
                    })
                    .unwrap_or_else(|| "none".to_owned());
                if let Ok(mut s) = conn.open_uni().await {
                    let _ = s.write_all(format!("client:{who}").as_bytes()).await;
                    let _ = s.finish();
                }
                conn.closed().await;
            });
        }
    });
    Server { endpoint, addr }
}

/// What the client learned from a successful connection.
#[derive(Debug)]
struct Outcome {
    alpn: Option<Vec<u8>>,
    server_fp: [u8; 32],
    /// What the server said about our client certificate.
    server_says: String,
}

/// Connects, completes the handshake and reads the server's greeting, so that a server-side
/// rejection (e.g. missing client certificate) shows as an error too.
async fn connect(
    server: &Server,
    client: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> anyhow::Result<Outcome> {
    // Every test connection is a full handshake: a resumed TLS 1.3 session carries the
    // peer certificate of the session it resumes, which would hide SNI and reload effects.
    let mut client = (*client).clone();
    client.resumption = rustls::client::Resumption::disabled();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(Arc::new(client))?,
    )));
    let result = tokio::time::timeout(HANG_GUARD, async {
        let conn = endpoint.connect(server.addr, server_name)?.await?;
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<HandshakeData>().ok())
            .and_then(|d| d.protocol);
        let chain = conn
            .peer_identity()
            .context("no peer identity")?
            .downcast::<Vec<CertificateDer<'static>>>()
            .map_err(|_| anyhow!("peer identity is not a certificate chain"))?;
        let server_fp = sha256_fingerprint(chain.first().context("empty chain")?);
        let mut recv = conn.accept_uni().await?;
        let greeting = recv.read_to_end(1024).await?;
        conn.close(0u32.into(), b"done");
        Ok::<_, anyhow::Error>(Outcome {
            alpn,
            server_fp,
            server_says: String::from_utf8(greeting)?,
        })
    })
    .await;
    endpoint.close(0u32.into(), b"done");
    match result {
        Ok(r) => r,
        Err(_) => bail!("handshake did not finish within the hang guard"),
    }
}

fn fp_of(path: &Path) -> [u8; 32] {
    sha256_fingerprint(&load_certs(path).unwrap()[0])
}

fn opts(names: &[&str]) -> InitOptions {
    InitOptions {
        names: names.iter().map(|s| (*s).to_owned()).collect(),
        ..InitOptions::default()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    paths: sibyl_certs::CertPaths,
}

fn fixture(names: &[&str]) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let paths = init_dir(&dir.join("certs"), &opts(names)).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        paths,
    }
}

fn plain_server(f: &Fixture) -> (Server, ReloadHandle) {
    let (cfg, handle) = ServerTlsBuilder::new(&f.paths.server_cert, &f.paths.server_key)
        .build()
        .unwrap();
    (serve(cfg), handle)
}

#[tokio::test]
async fn ca_file_trust_succeeds_with_alpn() {
    let f = fixture(&[]);
    let (server, _h) = plain_server(&f);
    let client = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .build()
        .unwrap();
    for name in ["localhost", "127.0.0.1", "::1"] {
        // "::1" is a SAN even though we dial the v4 loopback: name checks use the SAN.
        let out = connect(&server, client.clone(), name).await.unwrap();
        assert_eq!(out.alpn.as_deref(), Some(ALPN));
        assert_eq!(out.server_fp, fp_of(&f.paths.server_cert));
        assert_eq!(out.server_says, "client:none");
    }
}

#[tokio::test]
async fn ca_pem_trust_succeeds_and_wrong_name_fails() {
    let f = fixture(&[]);
    let (server, _h) = plain_server(&f);
    let pem = std::fs::read(&f.paths.ca_cert).unwrap();
    let client = ClientTlsBuilder::new(Trust::CaPem(pem)).build().unwrap();
    connect(&server, client.clone(), "localhost").await.unwrap();
    let err = connect(&server, client, "not-in-the-cert.example")
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
}

#[tokio::test]
async fn cert_from_another_ca_fails() {
    let f = fixture(&[]);
    let other = fixture(&[]);
    let (server, _h) = plain_server(&f);
    let client = ClientTlsBuilder::new(Trust::CaFile(other.paths.ca_cert.clone()))
        .build()
        .unwrap();
    let err = connect(&server, client, "localhost").await.unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
}

#[tokio::test]
async fn pinned_fingerprint_succeeds_and_wrong_pin_fails() {
    let f = fixture(&[]);
    let (server, _h) = plain_server(&f);
    let pin = fp_of(&f.paths.server_cert);
    let client = ClientTlsBuilder::new(Trust::PinnedSha256(pin))
        .build()
        .unwrap();
    let out = connect(&server, client, "localhost").await.unwrap();
    assert_eq!(out.server_fp, pin);
    assert_eq!(out.alpn.as_deref(), Some(ALPN));

    // Pinning the CA instead of the leaf is a wrong pin too.
    for wrong in [fp_of(&f.paths.ca_cert), [0u8; 32], {
        let mut p = pin;
        p[31] ^= 1;
        p
    }] {
        let client = ClientTlsBuilder::new(Trust::PinnedSha256(wrong))
            .build()
            .unwrap();
        let err = connect(&server, client, "localhost").await.unwrap_err();
        assert!(
            format!("{err:#}").to_lowercase().contains("certificate"),
            "{err:#}"
        );
    }
}

/// A resolver that presents a fixed (possibly forged) certificate/key pairing.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test]
async fn pinned_cert_with_someone_elses_key_fails_handshake_signature() {
    // An impostor presents the pinned certificate but holds a different key: the pin
    // matches, the TLS 1.3 CertificateVerify signature must not.
    let f = fixture(&[]);
    let ca = DevCa::load(&f.paths.ca_cert, &f.paths.ca_key).unwrap();
    let impostor = ca.issue_leaf(&[], &InitOptions::default()).unwrap();
    let (ic, ik) = (f.dir.join("impostor.pem"), f.dir.join("impostor.key"));
    impostor.save(&ic, &ik).unwrap();

    // Our builder refuses such a pairing outright...
    let err = ServerTlsBuilder::new(&f.paths.server_cert, &ik)
        .build()
        .unwrap_err();
    assert!(matches!(err, CertError::BadKey { .. }), "{err:?}");

    // ...so build the forged server by hand.
    let provider = sibyl_certs::provider();
    let wrong_key = provider
        .key_provider
        .load_private_key(sibyl_certs::load_key(&ik).unwrap())
        .unwrap();
    let forged =
        rustls::sign::CertifiedKey::new(load_certs(&f.paths.server_cert).unwrap(), wrong_key);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(forged))));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    let server = serve(Arc::new(cfg));

    let pinned = ClientTlsBuilder::new(Trust::PinnedSha256(fp_of(&f.paths.server_cert)))
        .build()
        .unwrap();
    let err = connect(&server, pinned, "localhost").await.unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("signature"),
        "{err:#}"
    );
    // Even the dangerous client checks the handshake signature.
    let any = ClientTlsBuilder::dangerous_accept_any_server_cert()
        .build()
        .unwrap();
    assert!(connect(&server, any, "localhost").await.is_err());

    // Control: the genuine pairing passes with the same pin.
    let (genuine, _h) = plain_server(&f);
    let pinned = ClientTlsBuilder::new(Trust::PinnedSha256(fp_of(&f.paths.server_cert)))
        .build()
        .unwrap();
    connect(&genuine, pinned, "localhost").await.unwrap();
}

#[tokio::test]
async fn dangerous_accept_any_connects_to_anything() {
    let f = fixture(&[]);
    let (server, _h) = plain_server(&f);
    let client = ClientTlsBuilder::dangerous_accept_any_server_cert()
        .build()
        .unwrap();
    let out = connect(&server, client, "whatever.invalid").await.unwrap();
    assert_eq!(out.server_fp, fp_of(&f.paths.server_cert));
}

#[tokio::test]
async fn mtls_required() {
    let f = fixture(&[]);
    let (cfg, _h) = ServerTlsBuilder::new(&f.paths.server_cert, &f.paths.server_key)
        .client_auth(&f.paths.ca_cert, true)
        .build()
        .unwrap();
    let server = serve(cfg);

    // A client certificate from the same dev CA.
    let ca = DevCa::load(&f.paths.ca_cert, &f.paths.ca_key).unwrap();
    let client_leaf = ca
        .issue_leaf(&["app-1".to_owned()], &InitOptions::default())
        .unwrap();
    let (cc, ck) = (f.dir.join("client.pem"), f.dir.join("client.key"));
    client_leaf.save(&cc, &ck).unwrap();

    let without = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .build()
        .unwrap();
    assert!(connect(&server, without, "localhost").await.is_err());

    let with = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .client_auth(&cc, &ck)
        .build()
        .unwrap();
    let out = connect(&server, with, "localhost").await.unwrap();
    assert_eq!(
        out.server_says,
        format!("client:{}", fingerprint_hex(&client_leaf.fingerprint()))
    );

    // A client certificate from another CA is refused.
    let other = fixture(&[]);
    let stranger = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .client_auth(&other.paths.server_cert, &other.paths.server_key)
        .build()
        .unwrap();
    assert!(connect(&server, stranger, "localhost").await.is_err());
}

#[tokio::test]
async fn mtls_optional() {
    let f = fixture(&[]);
    let (cfg, _h) = ServerTlsBuilder::new(&f.paths.server_cert, &f.paths.server_key)
        .client_auth(&f.paths.ca_cert, false)
        .build()
        .unwrap();
    let server = serve(cfg);
    let anon = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .build()
        .unwrap();
    let out = connect(&server, anon, "localhost").await.unwrap();
    assert_eq!(out.server_says, "client:none");

    // The server leaf doubles as a client certificate (it has the clientAuth EKU).
    let authed = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .client_auth(&f.paths.server_cert, &f.paths.server_key)
        .build()
        .unwrap();
    let out = connect(&server, authed, "localhost").await.unwrap();
    assert_eq!(
        out.server_says,
        format!("client:{}", fingerprint_hex(&fp_of(&f.paths.server_cert)))
    );
}

#[tokio::test]
async fn sni_picks_the_right_certificate() {
    let f = fixture(&[]);
    let ca = DevCa::load(&f.paths.ca_cert, &f.paths.ca_key).unwrap();
    let mut files = Vec::new();
    for name in ["hub.sibyl.test", "shard-1.sibyl.test"] {
        let leaf = ca
            .issue_leaf(&[name.to_owned()], &InitOptions::default())
            .unwrap();
        let (c, k) = (
            f.dir.join(format!("{name}.pem")),
            f.dir.join(format!("{name}.key")),
        );
        leaf.save(&c, &k).unwrap();
        files.push((name, c, k, leaf.fingerprint()));
    }
    let mut builder = ServerTlsBuilder::new(&f.paths.server_cert, &f.paths.server_key);
    for (name, c, k, _) in &files {
        builder = builder.sni(name, c, k);
    }
    let (cfg, handle) = builder.build().unwrap();
    let server = serve(cfg);
    let client = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .build()
        .unwrap();

    assert_ne!(files[0].3, files[1].3);
    for (name, _, _, fp) in &files {
        let out = connect(&server, client.clone(), name).await.unwrap();
        assert_eq!(out.server_fp, *fp, "wrong certificate for {name}");
        assert_eq!(handle.fingerprint(Some(name)), *fp);
    }
    // No SNI (IP address) and an unknown-but-valid name both get the default.
    let default_fp = fp_of(&f.paths.server_cert);
    for name in ["127.0.0.1", "localhost"] {
        let out = connect(&server, client.clone(), name).await.unwrap();
        assert_eq!(out.server_fp, default_fp, "{name}");
    }
}

#[tokio::test]
async fn reload_presents_the_new_certificate_without_restart() {
    let f = fixture(&[]);
    let (cfg, handle) = ServerTlsBuilder::new(&f.paths.server_cert, &f.paths.server_key)
        .reload_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let server = serve(cfg);
    let client = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .build()
        .unwrap();
    let old_fp = fp_of(&f.paths.server_cert);
    assert_eq!(
        connect(&server, client.clone(), "localhost")
            .await
            .unwrap()
            .server_fp,
        old_fp
    );

    // Overwrite the default files with a fresh leaf from the same CA.
    let ca = DevCa::load(&f.paths.ca_cert, &f.paths.ca_key).unwrap();
    let new_leaf = ca.issue_leaf(&[], &InitOptions::default()).unwrap();
    new_leaf
        .save(&f.paths.server_cert, &f.paths.server_key)
        .unwrap();
    assert_ne!(new_leaf.fingerprint(), old_fp);

    let mut seen_new = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let out = connect(&server, client.clone(), "localhost").await.unwrap();
        if out.server_fp == new_leaf.fingerprint() {
            seen_new = true;
            break;
        }
        assert_eq!(
            out.server_fp, old_fp,
            "neither the old nor the new certificate"
        );
    }
    assert!(seen_new, "new certificate never presented");
    assert_eq!(handle.fingerprint(None), new_leaf.fingerprint());
    // Once the new certificate is in service it stays.
    let out = connect(&server, client.clone(), "localhost").await.unwrap();
    assert_eq!(out.server_fp, new_leaf.fingerprint());
}

#[tokio::test]
async fn bad_new_files_keep_the_old_certificate_in_service() {
    let f = fixture(&[]);
    let (cfg, handle) = ServerTlsBuilder::new(&f.paths.server_cert, &f.paths.server_key)
        .reload_interval(Duration::ZERO)
        .build()
        .unwrap();
    let server = serve(cfg);
    let client = ClientTlsBuilder::new(Trust::CaFile(f.paths.ca_cert.clone()))
        .build()
        .unwrap();
    let old_fp = fp_of(&f.paths.server_cert);
    std::fs::write(
        &f.paths.server_cert,
        b"-----BEGIN CERTIFICATE-----\ngarbage",
    )
    .unwrap();
    let err = handle.reload_now().unwrap_err();
    assert!(err.to_string().contains("server.pem"), "{err}");
    // With a zero interval every handshake re-checks; the broken file is skipped each time.
    for _ in 0..3 {
        let out = connect(&server, client.clone(), "localhost").await.unwrap();
        assert_eq!(out.server_fp, old_fp);
    }
    // Repairing the file and reloading brings a new certificate in.
    let ca = DevCa::load(&f.paths.ca_cert, &f.paths.ca_key).unwrap();
    let fixed = ca.issue_leaf(&[], &InitOptions::default()).unwrap();
    fixed
        .save(&f.paths.server_cert, &f.paths.server_key)
        .unwrap();
    handle.reload_now().unwrap();
    let out = connect(&server, client, "localhost").await.unwrap();
    assert_eq!(out.server_fp, fixed.fingerprint());
}

#[tokio::test]
async fn platform_roots_do_not_trust_the_dev_ca() {
    let f = fixture(&[]);
    let (server, _h) = plain_server(&f);
    match ClientTlsBuilder::new(Trust::PlatformRoots).build() {
        Ok(client) => {
            assert!(connect(&server, client, "localhost").await.is_err());
        }
        Err(CertError::NoPlatformRoots { .. }) => {
            // A machine without a CA bundle: the error is the documented one.
            assert!(!Path::new("/etc/ssl/certs/ca-certificates.crt").exists());
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

#[test]
fn build_errors_name_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope.pem");
    let err = ClientTlsBuilder::new(Trust::CaFile(missing.clone()))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    let err = ServerTlsBuilder::new(&missing, &tmp.path().join("nope.key"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
    let err = ClientTlsBuilder::new(Trust::CaPem(b"nothing here".to_vec()))
        .build()
        .unwrap_err();
    assert!(matches!(err, CertError::NoCertificates { .. }), "{err:?}");
}
