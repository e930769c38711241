//! Server-side rustls configuration: certificates chosen by SNI and reloaded from disk,
//! optional client-certificate authentication.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::fingerprint::sha256_fingerprint;
use crate::pem::{load_certs, load_key};
use crate::{ALPN, CertError, provider};

/// Default for [`ServerTlsBuilder::session_tickets`]: 2 per handshake.
pub const DEFAULT_SESSION_TICKETS: usize = 2;
/// Default for [`ServerTlsBuilder::reload_interval`]: 2 seconds.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// TLS 1.3 sessions a server keeps for resumption (stateful tickets, in memory, per
/// process): 4096, so a client reconnecting to the same shard resumes (no certificate sent,
/// signed or verified) unless that many handshakes came between. rustls' default is 256;
/// an entry is a few hundred bytes. Tickets are not shared between processes: a ticket only
/// resumes on the shard (or hub) that issued it.
pub const SESSION_CACHE_SIZE: usize = 4096;

/// Builds the server's `rustls::ServerConfig`: TLS 1.3 only, ring provider, ALPN [`ALPN`],
/// certificates chosen by SNI and reloaded when their files change, no 0-RTT, an in-memory
/// session cache of [`SESSION_CACHE_SIZE`] for resumption.
#[derive(Debug)]
#[must_use]
pub struct ServerTlsBuilder {
    default: (PathBuf, PathBuf),
    sni: Vec<(String, PathBuf, PathBuf)>,
    client_auth: Option<(PathBuf, bool)>,
    reload_interval: Duration,
    early_data: bool,
    session_tickets: usize,
}

impl ServerTlsBuilder {
    /// A server presenting `default_cert` (PEM chain, end-entity first) with `default_key`
    /// when the client sends no SNI (e.g. it connected to an IP address) or an unknown name.
    pub fn new(default_cert: &Path, default_key: &Path) -> Self {
        Self {
            default: (default_cert.to_path_buf(), default_key.to_path_buf()),
            sni: Vec::new(),
            client_auth: None,
            reload_interval: DEFAULT_RELOAD_INTERVAL,
            early_data: false,
            session_tickets: DEFAULT_SESSION_TICKETS,
        }
    }

    /// Presents `cert`/`key` to clients whose SNI is `name` (exact match, ASCII
    /// case-insensitive; no wildcards). A later call for the same name replaces the earlier.
    pub fn sni(mut self, name: &str, cert: &Path, key: &Path) -> Self {
        let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
        self.sni.retain(|(n, _, _)| *n != name);
        self.sni.push((name, cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Asks clients for a certificate issued by a CA in `ca` (PEM). With `required`, clients
    /// without one are refused; otherwise they are let in unauthenticated (the application
    /// can tell from the connection's peer identity).
    pub fn client_auth(mut self, ca: &Path, required: bool) -> Self {
        self.client_auth = Some((ca.to_path_buf(), required));
        self
    }

    /// How often, at most, `resolve()` looks at the certificate files' metadata for changes.
    /// Default: [`DEFAULT_RELOAD_INTERVAL`] (2 s). `Duration::ZERO` checks on every handshake.
    pub fn reload_interval(mut self, d: Duration) -> Self {
        self.reload_interval = d;
        self
    }

    /// Accepts TLS 1.3 early data (QUIC 0-RTT) from clients resuming a session: sets
    /// `max_early_data_size` to `u32::MAX`, the only non-zero value QUIC allows. Off by
    /// default. 0-RTT data can be replayed by an attacker on the path; turn this on only
    /// for a protocol whose early requests are safe to replay (Sibyl's shards accept
    /// `EarlyAttach` and serve nothing until the handshake completes and the proof
    /// verifies). Resumption state lives in the stateful session cache, whose entries are
    /// single-use, so a ticket cannot be replayed into a second accepted 0-RTT flight.
    pub fn early_data(mut self, on: bool) -> Self {
        self.early_data = on;
        self
    }

    /// TLS 1.3 session tickets sent after each handshake (each lets the client resume once).
    /// Default: [`DEFAULT_SESSION_TICKETS`] (2, rustls' default); 0 disables resumption.
    pub fn session_tickets(mut self, n: usize) -> Self {
        self.session_tickets = n;
        self
    }

    /// Loads every certificate and key (any failure here is an error; later reload failures
    /// only warn) and builds the configuration and its [`ReloadHandle`].
    pub fn build(self) -> Result<(Arc<rustls::ServerConfig>, ReloadHandle), CertError> {
        let provider = provider();
        let default = Source::load(self.default.0, self.default.1, &provider)?;
        let mut by_name = HashMap::with_capacity(self.sni.len());
        for (name, cert, key) in self.sni {
            by_name.insert(name, Source::load(cert, key, &provider)?);
        }
        let resolver = Arc::new(ReloadingResolver {
            provider: provider.clone(),
            interval: self.reload_interval,
            state: Mutex::new(State {
                default,
                by_name,
                last_check: Instant::now(),
            }),
        });

        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match self.client_auth {
            Some((ca, required)) => {
                let mut roots = RootCertStore::empty();
                for cert in load_certs(&ca)? {
                    roots
                        .add(cert)
                        .map_err(|source| CertError::BadCertificate {
                            path: ca.clone(),
                            source,
                        })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if required {
                    verifier.build()?
                } else {
                    verifier.allow_unauthenticated().build()?
                };
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_SIZE);
        if self.early_data {
            config.max_early_data_size = u32::MAX;
        }
        config.send_tls13_tickets = self.session_tickets;
        Ok((Arc::new(config), ReloadHandle { resolver }))
    }
}

/// Controls the certificates of a built server configuration.
#[derive(Clone, Debug)]
pub struct ReloadHandle {
    resolver: Arc<ReloadingResolver>,
}

impl ReloadHandle {
    /// Re-reads every certificate and key file now, whether or not it changed. A file that
    /// fails to load keeps its previous certificate in service; the first such error is
    /// returned (all are logged).
    pub fn reload_now(&self) -> Result<(), CertError> {
        self.resolver.reload(Instant::now(), true)
    }

    /// SHA-256 of the end-entity certificate currently presented for `sni` (`None`: the
    /// default certificate). Unknown names give the default's, as in a handshake.
    pub fn fingerprint(&self, sni: Option<&str>) -> [u8; 32] {
        let state = self.resolver.lock();
        let source = sni
            .and_then(|n| state.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&state.default);
        source.fingerprint
    }
}

/// What identifies a version of a file on disk: modification time, length and (Unix) inode,
/// so an atomic rename is noticed even on file systems with coarse timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

impl Stamp {
    fn of(path: &Path) -> Result<Self, CertError> {
        let meta = std::fs::metadata(path).map_err(|e| CertError::io(path, e))?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let ino = 0;
        Ok(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            ino,
        })
    }
}

/// One certificate/key pair and the file versions it was loaded from.
#[derive(Debug)]
struct Source {
    cert_path: PathBuf,
    key_path: PathBuf,
    stamps: (Stamp, Stamp),
    /// Stamps of a version that failed to load, so it is warned about once, not every check.
    failed: Option<(Stamp, Stamp)>,
    key: Arc<CertifiedKey>,
    fingerprint: [u8; 32],
}

impl Source {
    fn load(cert: PathBuf, key: PathBuf, provider: &CryptoProvider) -> Result<Self, CertError> {
        let stamps = (Stamp::of(&cert)?, Stamp::of(&key)?);
        let (certified, fingerprint) = load_certified(&cert, &key, provider)?;
        Ok(Self {
            cert_path: cert,
            key_path: key,
            stamps,
            failed: None,
            key: certified,
            fingerprint,
        })
    }

    /// Reloads if the files changed (or always, with `force`). On failure the current key
    /// stays in service.
    fn refresh(&mut self, provider: &CryptoProvider, force: bool) -> Result<(), CertError> {
        let stamps = match (Stamp::of(&self.cert_path), Stamp::of(&self.key_path)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "certificate reload: keeping the previous certificate");
                return Err(e);
            }
        };
        if !force && (stamps == self.stamps || Some(stamps) == self.failed) {
            return Ok(());
        }
        match load_certified(&self.cert_path, &self.key_path, provider) {
            Ok((key, fingerprint)) => {
                if fingerprint != self.fingerprint {
                    tracing::info!(
                        cert = %self.cert_path.display(),
                        fingerprint = %crate::fingerprint_hex(&fingerprint),
                        "reloaded server certificate"
                    );
                }
                self.key = key;
                self.fingerprint = fingerprint;
                self.stamps = stamps;
                self.failed = None;
                Ok(())
            }
            Err(e) => {
                if force || self.failed != Some(stamps) {
                    tracing::warn!(
                        error = %e,
                        cert = %self.cert_path.display(),
                        "certificate reload failed: keeping the previous certificate"
                    );
                }
                self.failed = Some(stamps);
                Err(e)
            }
        }
    }
}

fn load_certified(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, [u8; 32]), CertError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let fingerprint = sha256_fingerprint(&chain[0]); // load_certs never returns an empty chain
    let certified =
        CertifiedKey::from_der(chain, key_der, provider).map_err(|source| CertError::BadKey {
            path: key.to_path_buf(),
            source,
        })?;
    Ok((Arc::new(certified), fingerprint))
}

#[derive(Debug)]
struct State {
    default: Source,
    by_name: HashMap<String, Source>,
    last_check: Instant,
}

/// The `ResolvesServerCert` behind [`ServerTlsBuilder`]: SNI lookup with a default, and a
/// metadata check of the files at most once per interval, done inside `resolve()`.
#[derive(Debug)]
struct ReloadingResolver {
    provider: Arc<CryptoProvider>,
    interval: Duration,
    state: Mutex<State>,
}

impl ReloadingResolver {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated: each field is
        // replaced whole. Keep serving rather than propagate the poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a check is due at `now`; if so, records `now` as the last check.
    fn check_due(state: &mut State, interval: Duration, now: Instant) -> bool {
        if now.saturating_duration_since(state.last_check) >= interval {
            state.last_check = now;
            true
        } else {
            false
        }
    }

    fn reload(&self, now: Instant, force: bool) -> Result<(), CertError> {
        let mut state = self.lock();
        if !force && !Self::check_due(&mut state, self.interval, now) {
            return Ok(());
        }
        state.last_check = now;
        let mut first_err = None;
        let state = &mut *state;
        for source in std::iter::once(&mut state.default).chain(state.by_name.values_mut()) {
            if let Err(e) = source.refresh(&self.provider, force) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Errors were logged and the old keys kept; a handshake always gets a certificate.
        let _ = self.reload(Instant::now(), false);
        let state = self.lock();
        let source = client_hello
            .server_name()
            .and_then(|n| state.by_name.get(&n.to_ascii_lowercase()))
            .unwrap_or(&state.default);
        Some(source.key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DevCa, InitOptions};

    fn setup(dir: &Path) -> (DevCa, PathBuf, PathBuf) {
        let opts = InitOptions::default();
        let ca = DevCa::generate(&opts).unwrap();
        let (c, k) = (dir.join("s.pem"), dir.join("s.key"));
        ca.issue_leaf(&[], &opts).unwrap().save(&c, &k).unwrap();
        (ca, c, k)
    }

    /// Runs one in-memory TLS 1.3 handshake (TLS over a byte pipe) and returns how it went.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> rustls::HandshakeKind {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        let mut buf = Vec::new();
        // Bounded: a TLS 1.3 handshake plus tickets takes a handful of flights.
        for _ in 0..10 {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind().unwrap()
    }

    #[test]
    fn a_returning_client_resumes_its_session() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, c, k) = setup(dir.path());
        let (server, _handle) = ServerTlsBuilder::new(&c, &k).build().unwrap();
        let client = crate::ClientTlsBuilder::new(crate::Trust::CaPem(ca.cert_pem().into()))
            .build()
            .unwrap();
        assert_eq!(handshake(&client, &server), rustls::HandshakeKind::Full);
        // The server issued a ticket into its session cache: the next handshake resumes.
        assert_eq!(handshake(&client, &server), rustls::HandshakeKind::Resumed);
        // Another server process (its own cache) cannot resume it: full handshake.
        let (other, _h) = ServerTlsBuilder::new(&c, &k).build().unwrap();
        assert_eq!(handshake(&client, &other), rustls::HandshakeKind::Full);
    }

    #[test]
    fn early_data_is_off_by_default_and_quic_sized_when_on() {
        let dir = tempfile::tempdir().unwrap();
        let (_ca, c, k) = setup(dir.path());
        let (off, _) = ServerTlsBuilder::new(&c, &k).build().unwrap();
        assert_eq!(off.max_early_data_size, 0);
        let (on, _) = ServerTlsBuilder::new(&c, &k)
            .early_data(true)
            .build()
            .unwrap();
        // QUIC requires exactly 0xffff_ffff (RFC 9001 §4.6.1); quinn refuses anything else.
        assert_eq!(on.max_early_data_size, u32::MAX);
        assert!(quinn_ok(on));
    }

    #[test]
    fn session_tickets_per_handshake_are_configurable() {
        let dir = tempfile::tempdir().unwrap();
        let (_ca, c, k) = setup(dir.path());
        let (default, _) = ServerTlsBuilder::new(&c, &k).build().unwrap();
        assert_eq!(default.send_tls13_tickets, DEFAULT_SESSION_TICKETS);
        let (one, _) = ServerTlsBuilder::new(&c, &k)
            .session_tickets(1)
            .build()
            .unwrap();
        assert_eq!(one.send_tls13_tickets, 1);
    }

    /// Whether quinn accepts `config` as a QUIC server crypto config.
    fn quinn_ok(config: Arc<rustls::ServerConfig>) -> bool {
        quinn::crypto::rustls::QuicServerConfig::try_from(config).is_ok()
    }

    #[test]
    fn check_is_rate_limited_on_synthetic_time() {
        let dir = tempfile::tempdir().unwrap();
        let (_ca, c, k) = setup(dir.path());
        let (_cfg, handle) = ServerTlsBuilder::new(&c, &k)
            .reload_interval(Duration::from_secs(2))
            .build()
            .unwrap();
        let r = &handle.resolver;
        let t0 = r.lock().last_check;
        let mut st = r.lock();
        assert!(!ReloadingResolver::check_due(&mut st, r.interval, t0));
        assert!(!ReloadingResolver::check_due(
            &mut st,
            r.interval,
            t0 + Duration::from_millis(1999)
        ));
        assert!(ReloadingResolver::check_due(
            &mut st,
            r.interval,
            t0 + Duration::from_secs(2)
        ));
        assert_eq!(st.last_check, t0 + Duration::from_secs(2));
        // Right after a check, the next one waits a full interval again.
        assert!(!ReloadingResolver::check_due(
            &mut st,
            r.interval,
            t0 + Duration::from_secs(3)
        ));
        // Time going backwards never triggers a check.
        assert!(!ReloadingResolver::check_due(&mut st, r.interval, t0));
    }

    #[test]
    fn changed_files_reload_on_next_due_check_and_bad_files_keep_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, c, k) = setup(dir.path());
        let (_cfg, handle) = ServerTlsBuilder::new(&c, &k)
            .reload_interval(Duration::from_secs(3600))
            .build()
            .unwrap();
        let old = handle.fingerprint(None);
        let t0 = handle.resolver.lock().last_check;

        let new_leaf = ca.issue_leaf(&[], &InitOptions::default()).unwrap();
        new_leaf.save(&c, &k).unwrap();
        // Not due yet: nothing changes.
        handle
            .resolver
            .reload(t0 + Duration::from_secs(1), false)
            .unwrap();
        assert_eq!(handle.fingerprint(None), old);
        // Due: the new files are picked up.
        handle
            .resolver
            .reload(t0 + Duration::from_secs(3600), false)
            .unwrap();
        assert_eq!(handle.fingerprint(None), new_leaf.fingerprint());

        // A garbage certificate is rejected and the current one stays.
        crate::pem::write_atomic(&c, b"not pem", crate::pem::FileMode::Public).unwrap();
        let err = handle
            .resolver
            .reload(t0 + Duration::from_secs(7200), false)
            .unwrap_err();
        assert!(matches!(err, CertError::NoCertificates { .. }), "{err:?}");
        assert_eq!(handle.fingerprint(None), new_leaf.fingerprint());
        // The same broken version is not retried (or re-warned) until it changes again...
        handle
            .resolver
            .reload(t0 + Duration::from_secs(10800), false)
            .unwrap();
        // ...but reload_now forces a retry and reports it.
        assert!(handle.reload_now().is_err());

        // A certificate that does not match its key is rejected too.
        let other = ca.issue_leaf(&[], &InitOptions::default()).unwrap();
        crate::pem::write_atomic(&c, other.cert_pem.as_bytes(), crate::pem::FileMode::Public)
            .unwrap();
        let err = handle.reload_now().unwrap_err();
        assert!(matches!(err, CertError::BadKey { .. }), "{err:?}");
        assert_eq!(handle.fingerprint(None), new_leaf.fingerprint());
    }

    #[test]
    fn sni_names_are_case_insensitive_and_unknown_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, c, k) = setup(dir.path());
        let (hc, hk) = (dir.path().join("h.pem"), dir.path().join("h.key"));
        let hub = ca
            .issue_leaf(&["hub.test".into()], &InitOptions::default())
            .unwrap();
        hub.save(&hc, &hk).unwrap();
        let (_cfg, handle) = ServerTlsBuilder::new(&c, &k)
            .sni("Hub.Test.", &hc, &hk)
            .build()
            .unwrap();
        assert_eq!(handle.fingerprint(Some("HUB.test")), hub.fingerprint());
        assert_ne!(handle.fingerprint(Some("other.test")), hub.fingerprint());
        assert_eq!(
            handle.fingerprint(Some("other.test")),
            handle.fingerprint(None)
        );
    }
}
