//! The operator commands' side of the admin API (`sibyl-gateway status`, `streams describe`,
//! `groups list|describe`): find the listener, GET a document, format it for a terminal.
//! Formatting is pure; [`AdminClient`] does the HTTP (ureq).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::view::{ConsumerGroupView, Status, StreamView};

/// Why an operator command could not read the admin API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No `--admin` address and no `<data_dir>/run/admin.addr` (the hub is not running, or
    /// its admin listener is disabled).
    #[error(
        "no admin address: pass --admin ADDR, or run the hub with [admin] enabled (it writes {0})"
    )]
    NoAddress(PathBuf),
    /// The request failed (connection refused, timeout, HTTP error status).
    #[error("admin API {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The answer is not the expected JSON.
    #[error("admin API {url}: unexpected answer: {reason}")]
    Decode {
        /// The URL.
        url: String,
        /// The JSON error.
        reason: String,
    },
}

/// Where the running hub writes its admin address.
pub fn addr_file(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("admin.addr")
}

/// The admin address: `given`, else the one the hub wrote under `data_dir`.
pub fn resolve_addr(given: Option<SocketAddr>, data_dir: &Path) -> Result<SocketAddr, ClientError> {
    if let Some(a) = given {
        return Ok(a);
    }
    let file = addr_file(data_dir);
    std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or(ClientError::NoAddress(file))
}

/// A blocking client of one admin listener.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client of `addr`, sending `token` as a bearer token if given.
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(super::CLIENT_TIMEOUT))
            .build()
            .into();
        Self {
            base: format!("http://{addr}"),
            token,
            agent,
        }
    }

    /// GETs `path` and decodes its JSON.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let text = self.get_text(path)?;
        serde_json::from_str(&text).map_err(|e| ClientError::Decode {
            url: format!("{}{path}", self.base),
            reason: e.to_string(),
        })
    }

    /// GETs `path` as text.
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let http = |reason: String| ClientError::Http {
            url: url.clone(),
            reason,
        };
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().map_err(|e| http(e.to_string()))?;
        resp.body_mut()
            .read_to_string()
            .map_err(|e| http(e.to_string()))
    }

    /// `/api/status`.
    pub fn status(&self) -> Result<Status, ClientError> {
        self.get("/api/status")
    }
}

/// `sibyl-gateway status`: the node in a few lines.
pub fn format_status(s: &Status) -> String {
    let mut o = String::new();
    let ready = s.shards.iter().filter(|x| x.state == "ready").count();
    let _ = writeln!(
        o,
        "hub {} · version {} · up {:.0}s · {ready}/{} shards ready",
        s.hub_addr,
        s.version,
        s.uptime_seconds,
        s.shards.len()
    );
    let _ = writeln!(o, "shards:");
    for x in &s.shards {
        let _ = writeln!(
            o,
            "  g{}.s{} {:<8} pid {:<7} {:<21} conns {:<5} subs {:<5} rss {:>6.1} MiB restarts {}",
            x.group,
            x.index,
            x.state,
            x.pid.map_or("-".to_owned(), |p| p.to_string()),
            x.addr.as_deref().unwrap_or("-"),
            x.connections,
            x.subscriptions,
            x.rss_bytes as f64 / 1048576.0,
            x.restarts
        );
    }
    let _ = writeln!(o, "streams:");
    for st in &s.streams {
        let records: u64 = st.partitions.iter().map(|p| p.end - p.start).sum();
        let _ = writeln!(
            o,
            "  {:<20} {} partitions · {records} records · {} bytes in {} segments · published {} · delivered {}",
            st.name,
            st.partitions.len(),
            st.bytes,
            st.segments,
            st.published_records + st.synthetic_records,
            st.delivered_records
        );
    }
    let _ = writeln!(o, "top clients (records/s delivered):");
    if s.clients.is_empty() {
        let _ = writeln!(o, "  (none attached)");
    }
    for c in s.clients.iter().take(5) {
        let _ = writeln!(
            o,
            "  {:<24} @g{}.s{} {:>10.0}/s  {} records",
            c.rate.client_id, c.group, c.shard, c.rate.records_per_s, c.rate.records
        );
    }
    let _ = writeln!(o, "consumer groups:");
    if s.consumer_groups.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for g in &s.consumer_groups {
        let _ = writeln!(
            o,
            "  {}/{}: {} members · lag {}",
            g.stream, g.group, g.members, g.lag
        );
    }
    o
}

/// `sibyl-gateway streams describe NAME`.
pub fn format_stream(st: &StreamView) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "stream {} · durability {} · {} bytes in {} segments",
        st.name, st.durability, st.bytes, st.segments
    );
    let _ = writeln!(
        o,
        "published {} records ({} bytes) · synthetic {} · delivered {} records ({} bytes)",
        st.published_records,
        st.published_bytes,
        st.synthetic_records,
        st.delivered_records,
        st.delivered_bytes
    );
    let _ = writeln!(o, "partition  start  end");
    for p in &st.partitions {
        let _ = writeln!(o, "{:>9}  {}  {}", p.partition, p.start, p.end);
    }
    o
}

/// `sibyl-gateway groups list`.
pub fn format_groups(gs: &[ConsumerGroupView]) -> String {
    let mut o = String::new();
    if gs.is_empty() {
        o.push_str("no consumer groups\n");
    }
    for g in gs {
        let _ = writeln!(
            o,
            "{}/{}  members {}  partitions {}  lag {}",
            g.stream,
            g.group,
            g.members,
            g.partitions.len(),
            g.lag
        );
    }
    o
}

/// `sibyl-gateway groups describe STREAM GROUP`.
pub fn format_group(g: &ConsumerGroupView) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "consumer group {} on {} · {} members · lag {}",
        g.group, g.stream, g.members, g.lag
    );
    let _ = writeln!(o, "partition  owner  position  end  lag");
    for p in &g.partitions {
        let _ = writeln!(
            o,
            "{:>9}  {}  {}  {}  {}",
            p.partition,
            p.owner.map_or("-".to_owned(), |m| m.to_string()),
            p.position.map_or("-".to_owned(), |m| m.to_string()),
            p.end,
            p.lag
        );
    }
    o
}
