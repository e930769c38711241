//! Impairment proxies in front of a runner-owned `sibyl-gateway`: one
//! [`netem::Proxy`](crate::netem::Proxy) per shard and one for the hub, driven by a small
//! tokio runtime of their own (the runner itself is synchronous).
//!
//! ```text
//! free port range P..P+n ──▶ shard proxies (upstream 127.0.0.1:P+k) ──▶ gateway config:
//!   [shards] port_base = P, [advertise.rewrite] "127.0.0.1:P+k" = "<proxy k>"
//!   ──▶ gateway start ──▶ hub proxy (upstream: the hub) ──▶ client gets HUB_ADDR = hub proxy
//! ```

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use crate::netem::{DirectionConfig, Impairment, Proxy, ProxyHandle};
use crate::runner::RunnerError;
use crate::runner::case::ImpairmentKind;

/// Length of the `blackhole` case's blackhole.
pub const BLACKHOLE: Duration = Duration::from_secs(5);

/// The impairment of `kind` with `seed`: `Loss` is 3 % random loss and 20 ms delay in each
/// direction (40 ms RTT); `Blackhole` impairs nothing until [`Netem::set_blackhole`].
pub fn impairment_of(kind: ImpairmentKind, seed: u64) -> Impairment {
    match kind {
        ImpairmentKind::Loss => Impairment::symmetric(
            DirectionConfig {
                loss: 0.03,
                delay: Duration::from_millis(20),
                ..DirectionConfig::default()
            },
            seed,
        ),
        ImpairmentKind::Blackhole => Impairment {
            seed,
            ..Impairment::default()
        },
    }
}

/// Finds `n` consecutive UDP ports on 127.0.0.1 that are free right now (bound and released
/// here; a process may still take one before the gateway does, which then fails the cell with
/// the shard's bind error). Ports come from the kernel's ephemeral choice, never guessed.
pub fn free_port_range(n: u16) -> Result<u16, RunnerError> {
    let n = n.max(1);
    let mut last_err = None;
    for _ in 0..32 {
        let first = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| RunnerError::Io("binding a probe UDP socket".into(), e))?;
        let base = first
            .local_addr()
            .map_err(|e| RunnerError::Io("reading a probe address".into(), e))?
            .port();
        if u32::from(base) + u32::from(n) - 1 > u32::from(u16::MAX) {
            continue;
        }
        let mut held = vec![first];
        for k in 1..n {
            match UdpSocket::bind((Ipv4Addr::LOCALHOST, base + k)) {
                Ok(s) => held.push(s),
                Err(e) => {
                    last_err = Some(e);
                    break;
                }
            }
        }
        if held.len() == usize::from(n) {
            return Ok(base);
        }
    }
    Err(RunnerError::Server(format!(
        "no {n} consecutive free UDP ports found on 127.0.0.1 (last error: {last_err:?})"
    )))
}

/// The running proxies of one cell.
pub struct Netem {
    rt: tokio::runtime::Runtime,
    impairment: Impairment,
    /// (shard address as bound, its proxy), in port order.
    shards: Vec<(SocketAddr, ProxyHandle)>,
    hub: Option<ProxyHandle>,
}

impl std::fmt::Debug for Netem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netem")
            .field("shards", &self.shards)
            .field("hub", &self.hub)
            .finish_non_exhaustive()
    }
}

impl Netem {
    /// Starts one proxy per shard address (`127.0.0.1:base+k`, k < `n`), each listening on a
    /// free loopback port, proxy `k` seeded `impairment.seed + k`.
    pub fn for_shards(base: u16, n: u16, impairment: Impairment) -> Result<Self, RunnerError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("interop-netem")
            .enable_all()
            .build()
            .map_err(|e| RunnerError::Io("starting the netem runtime".into(), e))?;
        let mut me = Self {
            rt,
            impairment,
            shards: Vec::new(),
            hub: None,
        };
        for k in 0..n {
            let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, base + k));
            let p = me.spawn(upstream, u64::from(k))?;
            me.shards.push((upstream, p));
        }
        Ok(me)
    }

    fn spawn(&self, upstream: SocketAddr, salt: u64) -> Result<ProxyHandle, RunnerError> {
        let mut imp = self.impairment.clone();
        imp.seed = imp.seed.wrapping_add(salt);
        self.rt
            .block_on(Proxy::new(upstream).impairment(imp).spawn())
            .map_err(|e| RunnerError::Server(format!("netem proxy to {upstream}: {e}")))
    }

    /// `(bound, advertised)` for every shard: the gateway's `[advertise] rewrite`.
    pub fn rewrite(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.shards
            .iter()
            .map(|(a, p)| (*a, p.local_addr()))
            .collect()
    }

    /// Starts the hub's proxy (seeded after the shard proxies); returns its address.
    pub fn start_hub(&mut self, hub: SocketAddr) -> Result<SocketAddr, RunnerError> {
        let p = self.spawn(hub, self.shards.len() as u64)?;
        let a = p.local_addr();
        self.hub = Some(p);
        Ok(a)
    }

    /// Blackholes (or stops blackholing) every proxy, both directions.
    pub fn set_blackhole(&self, on: bool) {
        for (_, p) in &self.shards {
            p.set_blackhole(on);
        }
        if let Some(h) = &self.hub {
            h.set_blackhole(on);
        }
    }

    /// A one-line summary of the proxies' counters (for logs).
    pub fn stats_line(&self) -> String {
        let mut parts = Vec::new();
        let all = self
            .hub
            .iter()
            .map(|h| ("hub".to_owned(), h))
            .chain(self.shards.iter().map(|(a, p)| (a.to_string(), p)));
        for (name, p) in all {
            let s = p.stats();
            parts.push(format!(
                "{name}: up {}/{} dropped, down {}/{} dropped",
                s.up.dropped(),
                s.up.received,
                s.down.dropped(),
                s.down.received
            ));
        }
        parts.join("; ")
    }

    /// Stops every proxy and the runtime.
    pub fn stop(self) {
        let Self {
            rt, shards, hub, ..
        } = self;
        rt.block_on(async {
            for (_, p) in shards {
                p.shutdown().await;
            }
            if let Some(h) = hub {
                h.shutdown().await;
            }
        });
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}
