//! `netem`: a userspace UDP impairment proxy for loopback tests.
//!
//! The kernel's netem is not available on the test machines, so loss and delay testing of the
//! gateway goes through this proxy, on loopback only.
//!
//! ```text
//! client ──udp──▶ listen socket ──▶ Impairer(up) ──▶ TimerQueue ──▶ upstream socket (one per
//!   ▲                                                                client address) ──▶ server
//!   └──udp── listen socket ◀── TimerQueue ◀── Impairer(down) ◀── upstream socket ◀──────┘
//! ```
//!
//! - [`Impairer`] is the I/O-free machine of one direction: given `(now, packet)` it returns a
//!   [`Verdict`] (drop, or copies to send at given instants). Blackholes, random and
//!   Gilbert–Elliott loss, a bandwidth queue with tail drop, delay, jitter, reordering,
//!   duplication and corruption, all from one seeded RNG.
//! - [`TimerQueue`] orders emissions; the driver sleeps until its `poll_timeout()`.
//! - [`Proxy`] / [`ProxyHandle`] are the thin tokio driver: one task per proxy plus one reader
//!   task per mapping, never a task per packet.
//! - [`spawn_many`] starts one proxy per upstream (e.g. one per shard).

mod config;
mod impairer;
mod proxy;
mod timer;

pub use config::{
    BlackholeWindow, ConfigError, Direction, DirectionConfig, GilbertElliott, Impairment,
    parse_duration,
};
pub use impairer::{DirectionStats, DropReason, Emission, Impairer, Verdict, serialization_time};
pub use proxy::{NetemError, Proxy, ProxyHandle, ProxyStats, spawn_many};
pub use timer::TimerQueue;
