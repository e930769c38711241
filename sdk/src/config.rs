//! [`ClientBuilder`]: every decision a client makes before it connects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use sibyl_certs::{ClientTlsBuilder, Trust};
use sibyl_proto::frame::{Action, Hello, Profile, Want};
use sibyl_proto::{ALPN, ALPN_GROUP_HINT, ClientConfig, SUPPORTED_VERSIONS};

use crate::error::{ConfigError, ConnectError, TlsError, TransportError};
use crate::shard::ShardQuic;

/// The SDK version sent in `Hello.profile.sdk_version`.
pub const SDK_VERSION: &str = concat!("sibyl-sdk/", env!("CARGO_PKG_VERSION"));

/// Default QUIC idle timeout of the hub connection: 30 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default QUIC keep-alive interval of the hub connection: 10 s.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Default QUIC idle timeout of a shard connection: 5 s.
///
/// This is how long a client takes to notice a shard that died without closing its
/// connection (SIGKILL, host or network loss) and fail over to the next endpoint of its
/// ticket. The trade-off: a shorter timeout fails over faster but gives up on a path that is
/// only briefly dark (a blackhole or a Wi-Fi hand-over longer than the timeout costs a
/// reconnect; the subscription resumes without gap or duplicate either way), and needs the
/// keep-alive below it, which costs one PING (~50 bytes) per interval on an idle session.
pub const DEFAULT_SHARD_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default QUIC keep-alive interval of a shard connection: 1 s (a fifth of
/// [`DEFAULT_SHARD_IDLE_TIMEOUT`], so a few lost PINGs do not end a healthy session).
pub const DEFAULT_SHARD_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Default bound on the initial [`ClientBuilder::connect`]: 60 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the hub is: a socket address, or `host:port` resolved when connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubAddress {
    /// An IP address and port.
    Socket(SocketAddr),
    /// `host:port` (a DNS name or an IP address), resolved at connect time.
    HostPort(String),
}

impl From<SocketAddr> for HubAddress {
    fn from(a: SocketAddr) -> Self {
        Self::Socket(a)
    }
}

impl From<&str> for HubAddress {
    fn from(s: &str) -> Self {
        match s.parse() {
            Ok(a) => Self::Socket(a),
            Err(_) => Self::HostPort(s.to_owned()),
        }
    }
}

impl From<String> for HubAddress {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl HubAddress {
    /// The host part of `host:port` when it is a DNS name (used as the default server name).
    fn dns_host(&self) -> Option<&str> {
        match self {
            Self::Socket(_) => None,
            Self::HostPort(s) => {
                let (host, _) = s.rsplit_once(':')?;
                (!host.is_empty() && host.parse::<std::net::IpAddr>().is_err()).then_some(host)
            }
        }
    }

    pub(crate) async fn resolve(&self) -> Result<SocketAddr, ConnectError> {
        match self {
            Self::Socket(a) => Ok(*a),
            Self::HostPort(s) => tokio::net::lookup_host(s.as_str())
                .await
                .map_err(|_| ConfigError::BadHubAddress(s.clone()))?
                .next()
                .ok_or_else(|| ConfigError::BadHubAddress(s.clone()).into()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self {
            Self::Socket(a) if a.port() == 0 => Err(ConfigError::BadHubAddress(a.to_string())),
            Self::Socket(_) => Ok(()),
            Self::HostPort(s) => match s.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) =>
                {
                    Ok(())
                }
                _ => Err(ConfigError::BadHubAddress(s.clone())),
            },
        }
    }
}

#[derive(Debug)]
enum TrustChoice {
    Trust(Trust),
    DangerousAcceptAny,
    Custom(Arc<rustls::ClientConfig>),
}

/// Builds and connects a [`Client`](crate::Client). Obtain one with
/// [`Client::builder`](crate::Client::builder); `connect` is defined beside the client
/// (`client.rs`), so this module does not depend on it.
///
/// Required: [`hub`](Self::hub), [`api_key`](Self::api_key) and a trust decision
/// ([`trust`](Self::trust); there is deliberately no default). Defaults: hub server name
/// `"localhost"` (or the host of a `host:port` hub address when it is a DNS name), a random
/// client id, empty region and device class, no wants, [`ClientConfig::default`], hub
/// connection idle timeout [`DEFAULT_IDLE_TIMEOUT`] and keep-alive [`DEFAULT_KEEP_ALIVE`],
/// shard connection idle timeout [`DEFAULT_SHARD_IDLE_TIMEOUT`] and keep-alive
/// [`DEFAULT_SHARD_KEEP_ALIVE`] (fast failover; see there for the trade-off), initial connect bound
/// [`DEFAULT_CONNECT_TIMEOUT`], local socket `0.0.0.0:0` (`[::]:0` for an IPv6 hub).
#[derive(Debug)]
#[must_use]
pub struct ClientBuilder {
    hub: Option<HubAddress>,
    hub_server_name: Option<String>,
    api_key: Option<String>,
    client_id: Option<String>,
    trust: Option<TrustChoice>,
    client_cert: Option<(PathBuf, PathBuf)>,
    region: String,
    device_class: String,
    wants: Vec<Want>,
    machine: ClientConfig,
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
    shard_idle_timeout: Duration,
    shard_keep_alive: Option<Duration>,
    connect_timeout: Option<Duration>,
    bind: Option<SocketAddr>,
    group_hint: bool,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            hub: None,
            hub_server_name: None,
            api_key: None,
            client_id: None,
            trust: None,
            client_cert: None,
            region: String::new(),
            device_class: String::new(),
            wants: Vec::new(),
            machine: ClientConfig::default(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: Some(DEFAULT_KEEP_ALIVE),
            shard_idle_timeout: DEFAULT_SHARD_IDLE_TIMEOUT,
            shard_keep_alive: Some(DEFAULT_SHARD_KEEP_ALIVE),
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            bind: None,
            group_hint: true,
        }
    }
}

impl ClientBuilder {
    /// The hub's address: a `SocketAddr`, or `"host:port"` (resolved when connecting).
    pub fn hub(mut self, addr: impl Into<HubAddress>) -> Self {
        self.hub = Some(addr.into());
        self
    }

    /// The name the hub's certificate is checked against (and sent as SNI).
    pub fn hub_server_name(mut self, name: impl Into<String>) -> Self {
        self.hub_server_name = Some(name.into());
        self
    }

    /// The API key sent in `Hello`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// The application-chosen client id, stable across reconnects. Default: random.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// How to authenticate the hub and shards: a CA file or PEM, a pinned SHA-256
    /// certificate fingerprint, or the platform roots. Required.
    pub fn trust(mut self, trust: Trust) -> Self {
        self.trust = Some(TrustChoice::Trust(trust));
        self
    }

    /// **Dangerous**: accept any server certificate (no authentication of the hub or the
    /// shards). For throwaway local experiments only; prefer [`Trust::PinnedSha256`].
    pub fn dangerous_accept_any_server_cert(mut self) -> Self {
        self.trust = Some(TrustChoice::DangerousAcceptAny);
        self
    }

    /// A complete rustls client configuration of your own (it must offer ALPN `sibyl/1` and
    /// TLS 1.3). Replaces [`trust`](Self::trust) and [`client_cert`](Self::client_cert).
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.trust = Some(TrustChoice::Custom(config));
        self
    }

    /// Presents this certificate chain (PEM) and key to servers asking for mTLS.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Profile hint: the client's region (helps the hub choose a shard group).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// Profile hint: the device class (e.g. `"server"`, `"mobile"`).
    pub fn device_class(mut self, class: impl Into<String>) -> Self {
        self.device_class = class.into();
        self
    }

    /// Announces that this client will subscribe to `stream`.
    pub fn want_subscribe(mut self, stream: impl Into<String>) -> Self {
        self.wants.push(Want {
            stream: stream.into(),
            action: Action::Subscribe,
        });
        self
    }

    /// Announces that this client will publish to `stream`.
    pub fn want_publish(mut self, stream: impl Into<String>) -> Self {
        self.wants.push(Want {
            stream: stream.into(),
            action: Action::Publish,
        });
        self
    }

    /// The connection machine's backoff, race width, attach timeout and token expiry margin.
    ///
    /// Errors: `race_width` 0, `attach_timeout` 0, or `backoff_initial > backoff_max`.
    pub fn config(mut self, config: ClientConfig) -> Result<Self, ConfigError> {
        if config.race_width == 0 {
            return Err(out_of_range("race_width", "must be at least 1"));
        }
        if config.attach_timeout.is_zero() {
            return Err(out_of_range("attach_timeout", "must be positive"));
        }
        if config.backoff_initial > config.backoff_max {
            return Err(out_of_range(
                "backoff_initial",
                "must not exceed backoff_max",
            ));
        }
        self.machine = config;
        Ok(self)
    }

    /// QUIC idle timeout of the hub connection. Errors outside `1 ms ..= 1 day`.
    pub fn idle_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        check_idle("idle_timeout", timeout)?;
        self.idle_timeout = timeout;
        Ok(self)
    }

    /// QUIC keep-alive interval of the hub connection (`None` disables). Errors unless `0 <
    /// interval < idle_timeout` (set the idle timeout first).
    pub fn keep_alive_interval(mut self, interval: Option<Duration>) -> Result<Self, ConfigError> {
        check_keep_alive("keep_alive_interval", interval, self.idle_timeout)?;
        self.keep_alive = interval;
        Ok(self)
    }

    /// QUIC idle timeout of shard connections: how long a silent shard (killed, or cut off)
    /// takes to be declared lost and failed over. Default [`DEFAULT_SHARD_IDLE_TIMEOUT`]
    /// (5 s). The effective timeout is the smaller of this and the shard's own
    /// (`[connection] idle_timeout`, 30 s by default). Errors outside `1 ms ..= 1 day`.
    pub fn shard_idle_timeout(mut self, timeout: Duration) -> Result<Self, ConfigError> {
        check_idle("shard_idle_timeout", timeout)?;
        self.shard_idle_timeout = timeout;
        Ok(self)
    }

    /// QUIC keep-alive interval of shard connections (`None` disables; then a quiet session
    /// relies on the shard's keep-alive). Default [`DEFAULT_SHARD_KEEP_ALIVE`] (1 s). Errors
    /// unless `0 < interval < shard_idle_timeout` (set the shard idle timeout first).
    pub fn shard_keep_alive_interval(
        mut self,
        interval: Option<Duration>,
    ) -> Result<Self, ConfigError> {
        check_keep_alive(
            "shard_keep_alive_interval",
            interval,
            self.shard_idle_timeout,
        )?;
        self.shard_keep_alive = interval;
        Ok(self)
    }

    /// Bound on [`connect`](Self::connect) as a whole (`None` waits as long as the machine
    /// retries). Errors on zero.
    pub fn connect_timeout(mut self, timeout: Option<Duration>) -> Result<Self, ConfigError> {
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(out_of_range("connect_timeout", "must be positive"));
        }
        self.connect_timeout = timeout;
        Ok(self)
    }

    /// Whether hub connections ask for a `GroupHint` (ALPN `sibyl/1+hint`; default `true`):
    /// the hub then names the likely shard group's endpoints during its handshake and the
    /// client starts the shard handshake while `Hello` is on its way (PROTOCOL.md §5.1), so
    /// a connect without a cached ticket takes about one round trip less. With `false` the
    /// client contacts no shard before it holds a ticket.
    pub fn group_hint(mut self, on: bool) -> Self {
        self.group_hint = on;
        self
    }

    /// The local UDP address of the client's one QUIC endpoint.
    pub fn bind_addr(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// Everything [`connect`](Self::connect) does before its first packet: checks the
    /// configuration, loads the trust anchors, builds the TLS and QUIC configurations and,
    /// when the hub's address family is known (an IP address, or
    /// [`bind_addr`](Self::bind_addr) set), binds the client's UDP socket. A configuration
    /// or trust error surfaces here, and [`Connector::connect`] then spends its time on the
    /// network only (an application can build at start-up and connect when needed).
    ///
    /// Must be called within a tokio runtime (the socket is registered with it).
    pub fn build(self) -> Result<Connector, ConnectError> {
        let prepared = self.prepare()?;
        let endpoint = match prepared.known_bind() {
            Some(bind) => Some(bind_endpoint(bind)?),
            None => None,
        };
        Ok(Connector { prepared, endpoint })
    }

    /// Validates and builds everything that needs no network.
    pub(crate) fn prepare(self) -> Result<Prepared, ConnectError> {
        let hub = self.hub.ok_or(ConfigError::MissingHub)?;
        hub.validate()?;
        let api_key = self.api_key.ok_or(ConfigError::MissingApiKey)?;
        let trust = self.trust.ok_or(ConfigError::MissingTrust)?;
        // An application's own rustls config keeps its resumption setting; the SDK's own
        // gets one TLS session cache per shard address (see `ShardQuic`).
        let own_tls = matches!(trust, TrustChoice::Custom(_));
        let tls = match trust {
            TrustChoice::Custom(c) => c,
            other => {
                let b = match other {
                    TrustChoice::Trust(t) => ClientTlsBuilder::new(t),
                    _ => ClientTlsBuilder::dangerous_accept_any_server_cert(),
                };
                let b = match &self.client_cert {
                    Some((c, k)) => b.client_auth(c, k),
                    None => b,
                };
                b.build().map_err(TlsError::from)?
            }
        };
        // Hub connections also offer `sibyl/1+hint` (first): the hub then sends a `GroupHint`
        // in 0.5-RTT and the shard handshake overlaps `Hello` (PROTOCOL.md §5.1).
        let mut hub_tls = (*tls).clone();
        hub_tls.alpn_protocols = hub_alpn(&hub_tls.alpn_protocols, self.group_hint);
        let crypto = QuicClientConfig::try_from(Arc::new(hub_tls))
            .map_err(|e| TlsError::NotQuic(e.to_string()))?;
        let quic = quic_config(
            Arc::new(crypto),
            "idle_timeout",
            self.idle_timeout,
            self.keep_alive,
        )?;
        let shard_transport = transport_config(
            "shard_idle_timeout",
            self.shard_idle_timeout,
            self.shard_keep_alive,
        )?;
        let shard_quic = ShardQuic::new(tls, shard_transport, !own_tls);

        let hub_server_name = self
            .hub_server_name
            .or_else(|| hub.dns_host().map(str::to_owned))
            .unwrap_or_else(|| "localhost".to_owned());
        let client_id = self
            .client_id
            .unwrap_or_else(|| format!("sibyl-{:016x}", rand::random::<u64>()));
        let hello = Hello {
            client_id,
            api_key,
            profile: Profile {
                region: self.region,
                device_class: self.device_class,
                sdk_version: SDK_VERSION.to_owned(),
            },
            wants: self.wants,
            versions: SUPPORTED_VERSIONS.to_vec(),
        };
        Ok(Prepared {
            hub,
            hub_server_name,
            hello,
            quic,
            shard_quic,
            machine: self.machine,
            bind: self.bind,
            connect_timeout: self.connect_timeout,
        })
    }
}

fn out_of_range(name: &'static str, detail: &'static str) -> ConfigError {
    ConfigError::OutOfRange { name, detail }
}

fn check_idle(field: &'static str, timeout: Duration) -> Result<(), ConfigError> {
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(86_400) {
        return Err(out_of_range(field, "must be within 1 ms ..= 1 day"));
    }
    Ok(())
}

fn check_keep_alive(
    field: &'static str,
    interval: Option<Duration>,
    idle: Duration,
) -> Result<(), ConfigError> {
    if let Some(i) = interval
        && (i.is_zero() || i >= idle)
    {
        return Err(out_of_range(
            field,
            "must be positive and below the idle timeout",
        ));
    }
    Ok(())
}

/// A quinn client config with `idle` / `keep_alive` on the shared TLS config.
fn quic_config(
    crypto: Arc<QuicClientConfig>,
    field: &'static str,
    idle: Duration,
    keep_alive: Option<Duration>,
) -> Result<quinn::ClientConfig, ConfigError> {
    let mut quic = quinn::ClientConfig::new(crypto);
    quic.transport_config(transport_config(field, idle, keep_alive)?);
    Ok(quic)
}

/// Stream receive window of SDK connections: 16 MiB, as the gateway's (quinn's default,
/// 1.25 MB, caps one partition stream at about 1.25 MB per round trip). The SDK still reads a
/// partition stream only as fast as the app consumes, so the window is an upper bound on what
/// quinn buffers per stream, not an allocation.
pub(crate) const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Connection receive window of SDK connections: 32 MiB, as the gateway's (bounds what all
/// streams of a connection buffer together; quinn's default is unbounded).
pub(crate) const RECEIVE_WINDOW: u32 = 32 << 20;
/// Send window of SDK connections: 32 MiB, as the gateway's (quinn's default is 10 MB).
pub(crate) const SEND_WINDOW: u64 = 32 << 20;

/// A quinn transport config with `idle` / `keep_alive` and the gateway's windows
/// ([`STREAM_RECEIVE_WINDOW`], [`RECEIVE_WINDOW`], [`SEND_WINDOW`]), quinn's defaults
/// otherwise.
fn transport_config(
    field: &'static str,
    idle: Duration,
    keep_alive: Option<Duration>,
) -> Result<Arc<quinn::TransportConfig>, ConfigError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(SEND_WINDOW);
    // Invariant: check_idle bounds the value to ≤ 1 day, far below QUIC's 2^62 ms; still an
    // error rather than a panic.
    let idle = quinn::IdleTimeout::try_from(idle)
        .map_err(|_| out_of_range(field, "too large for QUIC"))?;
    transport.max_idle_timeout(Some(idle));
    transport.keep_alive_interval(keep_alive);
    Ok(Arc::new(transport))
}

/// A built client that has not connected yet: see [`ClientBuilder::build`].
#[derive(Debug)]
pub struct Connector {
    prepared: Prepared,
    /// Bound at build time when the address family was known; otherwise at connect.
    endpoint: Option<quinn::Endpoint>,
}

impl Connector {
    /// The local address of the client's UDP socket, once bound (always, unless the hub is
    /// a DNS name and no [`ClientBuilder::bind_addr`] was given: then `connect` binds).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref()?.local_addr().ok()
    }

    /// The validated configuration and the endpoint bound at build time, if any (what
    /// [`connect`](Self::connect), next to [`Client`](crate::Client), starts from).
    pub(crate) fn into_parts(self) -> (Prepared, Option<quinn::Endpoint>) {
        (self.prepared, self.endpoint)
    }
}

/// A quinn client endpoint on a UDP socket bound to `bind`.
pub(crate) fn bind_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
    quinn::Endpoint::client(bind).map_err(|e| {
        TransportError::Io {
            what: "binding the client UDP socket",
            source: Arc::new(e),
        }
        .into()
    })
}

/// A validated configuration, ready to connect.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) hub: HubAddress,
    pub(crate) hub_server_name: String,
    pub(crate) hello: Hello,
    /// Hub connections.
    pub(crate) quic: quinn::ClientConfig,
    /// Shard connections (shorter idle timeout, keep-alive: fast failover).
    pub(crate) shard_quic: ShardQuic,
    pub(crate) machine: ClientConfig,
    pub(crate) bind: Option<SocketAddr>,
    pub(crate) connect_timeout: Option<Duration>,
}

impl Prepared {
    /// The address to bind when it is known without resolving the hub's name.
    fn known_bind(&self) -> Option<SocketAddr> {
        match (&self.bind, &self.hub) {
            (Some(b), _) => Some(*b),
            (None, HubAddress::Socket(hub)) => Some(unspecified_for(*hub)),
            (None, HubAddress::HostPort(s)) => s.parse().ok().map(unspecified_for),
        }
    }

    /// The address to bind for a hub at `hub`.
    pub(crate) fn bind_for(&self, hub: SocketAddr) -> SocketAddr {
        self.bind.unwrap_or_else(|| unspecified_for(hub))
    }
}

/// The ALPN list of hub connections: `sibyl/1+hint` first when `group_hint` and the list
/// speaks `sibyl/1` (an application's own TLS configuration may not), else `alpn` as is.
fn hub_alpn(alpn: &[Vec<u8>], group_hint: bool) -> Vec<Vec<u8>> {
    let mut out = alpn.to_vec();
    if group_hint && out.iter().any(|p| p == ALPN) && !out.iter().any(|p| p == ALPN_GROUP_HINT) {
        out.insert(0, ALPN_GROUP_HINT.to_vec());
    }
    out
}

/// Port 0 on the unspecified address of `peer`'s family.
fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv6() {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ClientBuilder {
        ClientBuilder::default()
            .hub("127.0.0.1:4433")
            .api_key("sk_test")
            .dangerous_accept_any_server_cert()
    }

    fn config_err(b: ClientBuilder) -> ConfigError {
        match b.prepare() {
            Err(ConnectError::Config(c)) => c,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn hub_connections_ask_for_the_group_hint_unless_told_not_to() {
        let plain = vec![ALPN.to_vec()];
        assert_eq!(
            hub_alpn(&plain, true),
            vec![ALPN_GROUP_HINT.to_vec(), ALPN.to_vec()]
        );
        assert_eq!(hub_alpn(&plain, false), plain);
        // An application's config without `sibyl/1`, or one that already asks: untouched.
        let other = vec![b"h3".to_vec()];
        assert_eq!(hub_alpn(&other, true), other);
        let asked = hub_alpn(&plain, true);
        assert_eq!(hub_alpn(&asked, true), asked);
    }

    #[tokio::test]
    async fn build_binds_when_the_address_family_is_known() {
        let v4 = base().build().unwrap();
        let a = v4.local_addr().expect("bound at build");
        assert!(a.is_ipv4() && a.port() != 0, "{a}");
        let named = base().hub("gw.example.com:4433").build().unwrap();
        assert_eq!(named.local_addr(), None, "a DNS name binds after resolving");
        let pinned = base()
            .hub("gw.example.com:4433")
            .bind_addr("127.0.0.1:0".parse().unwrap())
            .build()
            .unwrap();
        assert!(pinned.local_addr().is_some_and(|a| a.ip().is_loopback()));
        // A bad configuration fails at build, before any socket or packet.
        assert!(matches!(
            ClientBuilder::default().hub("127.0.0.1:1").build(),
            Err(ConnectError::Config(ConfigError::MissingApiKey))
        ));
    }

    #[test]
    fn missing_trust_hub_or_key_is_a_config_error() {
        let no_trust = ClientBuilder::default().hub("127.0.0.1:1").api_key("k");
        assert_eq!(config_err(no_trust), ConfigError::MissingTrust);
        let no_hub = ClientBuilder::default()
            .api_key("k")
            .trust(Trust::PinnedSha256([0; 32]));
        assert_eq!(config_err(no_hub), ConfigError::MissingHub);
        let no_key = ClientBuilder::default()
            .hub("127.0.0.1:1")
            .trust(Trust::PinnedSha256([0; 32]));
        assert_eq!(config_err(no_key), ConfigError::MissingApiKey);
        assert!(!ConnectError::from(ConfigError::MissingTrust).retryable());
    }

    #[test]
    fn hub_addresses_are_checked() {
        for bad in [
            "nohost",
            ":4433",
            "host:",
            "host:0",
            "host:99999",
            "127.0.0.1:0",
        ] {
            assert!(
                matches!(config_err(base().hub(bad)), ConfigError::BadHubAddress(_)),
                "{bad}"
            );
        }
        assert_eq!(
            HubAddress::from("10.0.0.1:1"),
            HubAddress::Socket("10.0.0.1:1".parse().unwrap())
        );
        assert!(base().hub("[::1]:4433").prepare().is_ok());
        assert!(base().hub("gw.example.com:4433").prepare().is_ok());
    }

    #[test]
    fn server_name_defaults_to_dns_host_else_localhost() {
        let p = base().hub("gw.example.com:4433").prepare().unwrap();
        assert_eq!(p.hub_server_name, "gw.example.com");
        let p = base().prepare().unwrap();
        assert_eq!(p.hub_server_name, "localhost");
        let p = base().hub_server_name("hub-1").prepare().unwrap();
        assert_eq!(p.hub_server_name, "hub-1");
    }

    #[test]
    fn hello_carries_profile_wants_version_and_a_random_client_id() {
        let p = base()
            .region("eu")
            .device_class("server")
            .want_subscribe("orders")
            .want_publish("prices")
            .prepare()
            .unwrap();
        assert_eq!(p.hello.profile.region, "eu");
        assert_eq!(p.hello.profile.device_class, "server");
        assert_eq!(p.hello.profile.sdk_version, SDK_VERSION);
        assert!(SDK_VERSION.ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(p.hello.wants.len(), 2);
        assert_eq!(p.hello.wants[0].action, Action::Subscribe);
        assert_eq!(p.hello.wants[1].stream, "prices");
        assert_eq!(p.hello.versions, SUPPORTED_VERSIONS);
        let other = base().prepare().unwrap();
        assert!(p.hello.client_id.starts_with("sibyl-"));
        assert_ne!(p.hello.client_id, other.hello.client_id);
        let fixed = base().client_id("app-1").prepare().unwrap();
        assert_eq!(fixed.hello.client_id, "app-1");
    }

    #[test]
    fn bounded_setters_reject_out_of_range_values() {
        assert!(base().idle_timeout(Duration::ZERO).is_err());
        assert!(base().idle_timeout(Duration::from_secs(90_000)).is_err());
        let b = base().idle_timeout(Duration::from_secs(5)).unwrap();
        assert!(b.keep_alive_interval(Some(Duration::from_secs(5))).is_err());
        let b = base().idle_timeout(Duration::from_secs(5)).unwrap();
        assert!(b.keep_alive_interval(Some(Duration::from_secs(1))).is_ok());
        assert!(base().keep_alive_interval(None).is_ok());
        // Shard connections have their own pair, checked against each other.
        assert!(base().shard_idle_timeout(Duration::ZERO).is_err());
        assert!(
            base()
                .shard_keep_alive_interval(Some(DEFAULT_SHARD_IDLE_TIMEOUT))
                .is_err()
        );
        assert!(
            base()
                .shard_keep_alive_interval(Some(DEFAULT_SHARD_KEEP_ALIVE))
                .is_ok()
        );
        let b = base().shard_idle_timeout(Duration::from_secs(60)).unwrap();
        assert!(
            b.shard_keep_alive_interval(Some(Duration::from_secs(30)))
                .is_ok()
        );
        assert!(DEFAULT_SHARD_KEEP_ALIVE < DEFAULT_SHARD_IDLE_TIMEOUT);
        assert!(base().connect_timeout(Some(Duration::ZERO)).is_err());
        let mut c = ClientConfig::default();
        c.race_width = 0;
        assert!(base().config(c).is_err());
        let mut c = ClientConfig::default();
        c.backoff_initial = Duration::from_secs(20);
        assert!(base().config(c).is_err());
        let mut c = ClientConfig::default();
        c.attach_timeout = Duration::ZERO;
        assert!(base().config(c).is_err());
        assert!(base().config(ClientConfig::default()).is_ok());
    }

    #[test]
    fn unreadable_ca_file_is_a_tls_error() {
        let err = base()
            .trust(Trust::CaFile("/nonexistent/sibyl/ca.pem".into()))
            .prepare()
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::Tls(TlsError::Cert(_))),
            "{err:?}"
        );
        assert!(!err.retryable());
    }
}
