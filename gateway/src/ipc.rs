//! Hub ↔ shard control channel over an inherited Unix socketpair.
//!
//! Frames are `u32` big-endian length + one CBOR body (via [`sibyl_proto::cbor`]); the
//! length is bounded by [`MAX_FRAME_LEN`] before any allocation. The codec ([`encode`],
//! [`decode`]) is I/O-free; [`IpcChannel`] is a thin async wrapper over a tokio
//! [`UnixStream`].
//!
//! ```text
//! hub ── Init{shard, group, config subset, keyring, cert paths} ──▶ shard
//! hub ◀───────────── Ready{udp_port} ─────────────────────────────── shard
//! hub ◀───────────── Heartbeat{connections, subscriptions, rss} ─── shard (every interval)
//! hub ◀───────────── Metrics{snapshot} ────────────────────────────── shard (after each, [admin])
//! hub ── Drain{deadline} / KeyringUpdate{keyring} ─────────────────▶ shard
//! hub ◀───────────── Draining, Exiting{reason} ──────────────────── shard
//! ```
//!
//! Secrets (keyring bytes) and configuration travel only over this channel, never argv or
//! the environment. The child's end is passed as a bare fd number (`--ipc-fd N`).

use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::config::ShardLimits;

/// Largest accepted frame body (keyrings and configs are a few KiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;
const HEADER_LEN: usize = 4;

/// Why an IPC frame could not be encoded, decoded, sent or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// The peer announced a frame longer than [`MAX_FRAME_LEN`] (peer garbage).
    #[error("ipc frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte bound")]
    TooLarge(usize),
    /// The body is not a valid message (peer garbage).
    #[error("malformed ipc message: {0}")]
    Malformed(#[from] sibyl_proto::cbor::CborError),
    /// The stream ended in the middle of a frame.
    #[error("ipc stream ended inside a frame")]
    Truncated,
    /// Socket error.
    #[error("ipc i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends one frame holding `msg` to `out`.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), IpcError> {
    let body = sibyl_proto::cbor::to_vec(msg)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(IpcError::TooLarge(body.len()));
    }
    // The bound above keeps the length within u32.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when `buf` holds an incomplete frame (read more), `Ok(Some((msg,
/// consumed)))` for a complete one, and an error for an oversized or malformed frame.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, IpcError> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let msg = sibyl_proto::cbor::from_slice(body)?;
    Ok(Some((msg, HEADER_LEN + len)))
}

/// The body length announced by a header at the start of `buf`, bounded.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, IpcError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = u32::from_be_bytes(h) as usize;
    if len > MAX_FRAME_LEN {
        return Err(IpcError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Everything a shard needs to start, sent once by the hub as the first frame.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInit {
    /// Shard index within its group.
    pub shard: u32,
    /// Shard-group id.
    pub group: u32,
    /// Incarnation number of this shard slot (increments on every restart).
    pub generation: u64,
    /// IP the shard binds its QUIC (UDP) socket on.
    pub bind_ip: std::net::IpAddr,
    /// UDP port to bind (`[shards] port_base` + the shard's ordinal); 0: a free port.
    #[serde(default)]
    pub bind_port: u16,
    /// How often to send [`ShardToHub::Heartbeat`].
    pub heartbeat_interval: Duration,
    /// Resource limits the shard applies to itself (rlimits) at start.
    pub limits: ShardLimits,
    /// Token lifetime (for shard-side checks).
    pub token_lifetime: Duration,
    /// Clock skew tolerated when opening tokens.
    pub token_clock_skew: Duration,
    /// Log filter (`RUST_LOG` syntax) for the shard's own log output.
    pub log_filter: String,
    /// The token keyring, serialized by `sibyl_tokens::Keyring::to_bytes`.
    #[serde(with = "serde_bytes")]
    pub keyring: Vec<u8>,
    /// CA certificate (PEM) that issued the shard's certificate.
    pub ca_cert: PathBuf,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Per-connection limits of the shard's QUIC connections.
    #[serde(default)]
    pub connection: crate::config::ConnectionConfig,
    /// Deployment id: the AAD tokens are sealed with (`tokens.deployment_id`).
    #[serde(default = "default_deployment_id")]
    pub deployment_id: String,
    /// The hub's store link socket (`<data>/run/store.sock`); `None`: no subscriptions.
    #[serde(default)]
    pub store_socket: Option<PathBuf>,
    /// How subscriptions are served (grants, batch sizes, cache).
    #[serde(default)]
    pub subscribe: crate::config::SubscribeConfig,
    /// Log line format.
    #[serde(default)]
    pub log_format: crate::config::LogFormat,
    /// Send [`ShardToHub::Metrics`] after each heartbeat (`[admin] enabled`).
    #[serde(default)]
    pub metrics: bool,
}

fn default_deployment_id() -> String {
    crate::config::DEFAULT_DEPLOYMENT_ID.to_owned()
}

impl std::fmt::Debug for ShardInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardInit")
            .field("shard", &self.shard)
            .field("group", &self.group)
            .field("generation", &self.generation)
            .field("bind_ip", &self.bind_ip)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("limits", &self.limits)
            .field(
                "keyring",
                &format_args!("<{} bytes redacted>", self.keyring.len()),
            )
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// Hub → shard messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HubToShard {
    /// First frame: configuration and secrets.
    Init(Box<ShardInit>),
    /// Stop accepting, tell clients to go away, exit within `within`.
    Drain {
        /// Time budget for the drain.
        within: Duration,
    },
    /// The keyring rotated; replace it.
    KeyringUpdate {
        /// `sibyl_tokens::Keyring::to_bytes` output.
        #[serde(with = "serde_bytes")]
        keyring: Vec<u8>,
    },
}

/// Shard → hub messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ShardToHub {
    /// The shard's endpoint is bound and serving.
    Ready {
        /// The bound UDP port (on `ShardInit::bind_ip`).
        udp_port: u16,
    },
    /// Periodic liveness and load report.
    Heartbeat(Load),
    /// The shard's metric values (bounded: [`crate::obs::metrics::MAX_SAMPLES`]), sent after
    /// a heartbeat when `ShardInit::metrics` is set.
    Metrics(Box<crate::obs::Snapshot>),
    /// The shard received a drain request (or SIGTERM) and is draining.
    Draining,
    /// The shard is about to exit.
    Exiting {
        /// Why.
        reason: String,
    },
}

/// A shard's load report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Open client connections.
    pub connections: u64,
    /// Active subscriptions.
    pub subscriptions: u64,
    /// Resident set size in bytes.
    pub rss_bytes: u64,
}

/// One end of the control channel, sending `S` and receiving `R`.
#[derive(Debug)]
pub struct IpcChannel<S, R> {
    rx: IpcReceiver<R>,
    tx: IpcSender<S>,
}

/// The hub's end of a shard's channel.
pub type HubIpc = IpcChannel<HubToShard, ShardToHub>;
/// The shard's end of its channel.
pub type ShardIpc = IpcChannel<ShardToHub, HubToShard>;

/// Receiving half of an [`IpcChannel`].
#[derive(Debug)]
pub struct IpcReceiver<R> {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
    _p: PhantomData<fn() -> R>,
}

/// Sending half of an [`IpcChannel`].
#[derive(Debug)]
pub struct IpcSender<S> {
    wr: OwnedWriteHalf,
    buf: Vec<u8>,
    _p: PhantomData<fn(S)>,
}

impl<S: Serialize, R: DeserializeOwned> IpcChannel<S, R> {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        let (rd, wr) = stream.into_split();
        Self {
            rx: IpcReceiver {
                rd,
                buf: Vec::new(),
                _p: PhantomData,
            },
            tx: IpcSender {
                wr,
                buf: Vec::new(),
                _p: PhantomData,
            },
        }
    }

    /// Wraps a std socket (set non-blocking here); must be called inside a tokio runtime.
    pub fn from_std(stream: std::os::unix::net::UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self::new(UnixStream::from_std(stream)?))
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &S) -> Result<(), IpcError> {
        self.tx.send(msg).await
    }

    /// Receives one message; `Ok(None)` when the peer closed the channel cleanly.
    pub async fn recv(&mut self) -> Result<Option<R>, IpcError> {
        self.rx.recv().await
    }

    /// Splits into independently usable halves.
    pub fn into_split(self) -> (IpcReceiver<R>, IpcSender<S>) {
        (self.rx, self.tx)
    }
}

impl<S: Serialize> IpcSender<S> {
    /// Sends one message.
    pub async fn send(&mut self, msg: &S) -> Result<(), IpcError> {
        self.buf.clear();
        encode(msg, &mut self.buf)?;
        self.wr.write_all(&self.buf).await?;
        Ok(())
    }
}

impl<R: DeserializeOwned> IpcReceiver<R> {
    /// Receives one message; `Ok(None)` when the peer closed the channel at a frame boundary.
    ///
    /// Cancel-safe: a partially read frame stays buffered.
    pub async fn recv(&mut self) -> Result<Option<R>, IpcError> {
        loop {
            if let Some((msg, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(msg));
            }
            // The header (if complete) was bounded by `decode`; reserve what the frame needs.
            let want = match frame_len(&self.buf)? {
                Some(len) => HEADER_LEN + len - self.buf.len(),
                None => HEADER_LEN - self.buf.len(),
            };
            self.buf.reserve(want);
            let n = self.rd.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(IpcError::Truncated)
                };
            }
        }
    }
}

/// Creates a socketpair for a child: `(parent_end, child_end)`. The child's end has
/// close-on-exec cleared so it survives `exec`; the parent's keeps it set.
///
/// The caller spawns the child and then drops `child_end` (the child holds its own copy).
/// Spawns must be serialized (the supervisor driver is one task), so no other child
/// inherits this end by accident.
pub fn child_socketpair() -> std::io::Result<(
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
)> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::AsRawFd;
    let (parent, child) = std::os::unix::net::UnixStream::pair()?;
    fcntl(child.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
    Ok((parent, child))
}

/// Takes ownership of the inherited control socket `fd` in a shard process.
///
/// Fails unless `fd` is an open Unix stream socket. Call once, early in `main` of the
/// `shard` subcommand. Re-sets close-on-exec so the shard's own children never inherit it.
pub fn take_inherited(fd: i32) -> std::io::Result<std::os::unix::net::UnixStream> {
    inherit::take(fd)
}

#[allow(unsafe_code)]
mod inherit {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    static TAKEN: AtomicBool = AtomicBool::new(false);

    pub(super) fn take(fd: i32) -> std::io::Result<std::os::unix::net::UnixStream> {
        let bad = |m: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("--ipc-fd {fd}: {m}"),
            )
        };
        if fd < 3 {
            return Err(bad("must be ≥ 3 (0-2 are stdio)"));
        }
        // F_GETFD fails with EBADF unless `fd` is open in this process.
        fcntl(fd, FcntlArg::F_GETFD).map_err(|_| bad("not an open file descriptor"))?;
        // SAFETY: `fd` is open (checked above) and we are not taking ownership yet.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match getsockopt(&borrowed, sockopt::SockType) {
            Ok(SockType::Stream) => {}
            _ => return Err(bad("not a stream socket")),
        }
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Err(bad("already taken"));
        }
        // SAFETY: the fd is open, is a stream socket, was inherited from the hub for this
        // purpose and nothing else in this process refers to it (the hub passes it only to
        // the `shard` subcommand, which calls this once, guarded by TAKEN). We become its
        // sole owner, so closing it on drop is correct.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(std::io::Error::from)?;
        Ok(std::os::unix::net::UnixStream::from(owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_init() -> ShardInit {
        ShardInit {
            shard: 1,
            group: 2,
            generation: 3,
            bind_ip: "127.0.0.1".parse().unwrap(),
            bind_port: 0,
            heartbeat_interval: Duration::from_millis(500),
            limits: ShardLimits::default(),
            token_lifetime: Duration::from_secs(3600),
            token_clock_skew: Duration::from_secs(30),
            log_filter: "info".into(),
            keyring: vec![9; 80],
            ca_cert: "/d/ca.pem".into(),
            cert: "/d/server.pem".into(),
            key: "/d/server.key".into(),
            connection: crate::config::ConnectionConfig::default(),
            deployment_id: "test".into(),
            store_socket: Some("/d/run/store.sock".into()),
            subscribe: crate::config::SubscribeConfig::default(),
            log_format: crate::config::LogFormat::Json,
            metrics: true,
        }
    }

    #[test]
    fn round_trip_every_message() {
        let hub = [
            HubToShard::Init(Box::new(sample_init())),
            HubToShard::Drain {
                within: Duration::from_secs(10),
            },
            HubToShard::KeyringUpdate {
                keyring: vec![1, 2, 3],
            },
        ];
        let shard = [
            ShardToHub::Ready { udp_port: 5555 },
            ShardToHub::Heartbeat(Load {
                connections: 1,
                subscriptions: 2,
                rss_bytes: 3,
            }),
            ShardToHub::Metrics(Box::new({
                let set = crate::obs::metrics::MetricSet::default();
                set.counter(&crate::obs::metrics::GRANTS, &[]).inc();
                set.snapshot()
            })),
            ShardToHub::Draining,
            ShardToHub::Exiting {
                reason: "drained".into(),
            },
        ];
        let mut buf = Vec::new();
        for m in &hub {
            encode(m, &mut buf).unwrap();
        }
        let mut at = 0;
        for m in &hub {
            let (got, used) = decode::<HubToShard>(&buf[at..]).unwrap().unwrap();
            assert_eq!(&got, m);
            at += used;
        }
        assert_eq!(at, buf.len());
        for m in &shard {
            let mut b = Vec::new();
            encode(m, &mut b).unwrap();
            assert_eq!(
                decode::<ShardToHub>(&b).unwrap().unwrap(),
                (m.clone(), b.len())
            );
        }
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let mut buf = Vec::new();
        encode(&ShardToHub::Ready { udp_port: 1 }, &mut buf).unwrap();
        for cut in 0..buf.len() {
            assert!(
                decode::<ShardToHub>(&buf[..cut]).unwrap().is_none(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let buf = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        assert!(
            matches!(decode::<ShardToHub>(&buf), Err(IpcError::TooLarge(n)) if n == MAX_FRAME_LEN + 1)
        );
        assert!(matches!(
            decode::<ShardToHub>(&u32::MAX.to_be_bytes()),
            Err(IpcError::TooLarge(_))
        ));
        let huge = HubToShard::KeyringUpdate {
            keyring: vec![0; MAX_FRAME_LEN + 1],
        };
        assert!(matches!(
            encode(&huge, &mut Vec::new()),
            Err(IpcError::TooLarge(_))
        ));
    }

    #[test]
    fn garbage_body_is_malformed() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode::<ShardToHub>(&buf),
            Err(IpcError::Malformed(_))
        ));
        // A valid CBOR item of the wrong shape.
        let mut buf = Vec::new();
        encode(&42u32, &mut buf).unwrap();
        assert!(matches!(
            decode::<ShardToHub>(&buf),
            Err(IpcError::Malformed(_))
        ));
    }

    #[test]
    fn init_debug_redacts_the_keyring() {
        let s = format!("{:?}", sample_init());
        assert!(s.contains("redacted"));
        assert!(!s.contains("9, 9"));
    }

    #[tokio::test]
    async fn channel_over_a_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut hub = HubIpc::from_std(a).unwrap();
        let mut shard = ShardIpc::from_std(b).unwrap();
        hub.send(&HubToShard::Drain {
            within: Duration::from_secs(1),
        })
        .await
        .unwrap();
        assert_eq!(
            shard.recv().await.unwrap(),
            Some(HubToShard::Drain {
                within: Duration::from_secs(1)
            })
        );
        shard.send(&ShardToHub::Draining).await.unwrap();
        assert_eq!(hub.recv().await.unwrap(), Some(ShardToHub::Draining));
        drop(hub);
        assert_eq!(shard.recv().await.unwrap(), None);
    }

    #[tokio::test]
    async fn channel_refuses_truncated_and_oversized_frames() {
        use std::io::Write;
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut shard = ShardIpc::from_std(b).unwrap();
        a.write_all(&[0, 0, 0, 10, 1, 2]).unwrap();
        drop(a);
        assert!(matches!(shard.recv().await, Err(IpcError::Truncated)));

        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut shard = ShardIpc::from_std(b).unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(shard.recv().await, Err(IpcError::TooLarge(_))));
    }

    #[test]
    fn child_end_is_inheritable_parent_end_is_not() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        use std::os::fd::AsRawFd;
        let (p, c) = child_socketpair().unwrap();
        let flags = |fd| FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD).unwrap());
        assert!(flags(p.as_raw_fd()).contains(FdFlag::FD_CLOEXEC));
        assert!(!flags(c.as_raw_fd()).contains(FdFlag::FD_CLOEXEC));
        assert!(take_inherited(0).is_err());
        assert!(take_inherited(100_000).is_err());
    }
}
