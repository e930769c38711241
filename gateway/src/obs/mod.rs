//! Observability: metrics, the admin HTTP listener (Prometheus `/metrics`, a JSON API, the
//! live status page) and the operator commands' client side.
//!
//! ```text
//! hub/shard code ── one-line hooks below ──▶ metrics::LOCAL (atomics, per process)
//! shard: every heartbeat ── ShardToHub::Metrics(snapshot) ──▶ hub: metrics::SHARDS
//! hub: admin::AdminServer (axum, [admin] listen)
//!        GET /metrics   prometheus-client text (hub values + shard snapshots, group/shard labels)
//!        GET /api/...   JSON views built by view::NodeView (store, supervisor, groups)
//!        GET /          status.html (embedded; polls /api/status every second)
//! ```
//!
//! Policy is I/O-free: [`view`] turns plain inputs into the JSON documents and gauges, and
//! [`procstat`] parses `/proc` text it is given.

pub mod admin;
pub mod client;
pub mod clients;
pub mod metrics;
pub mod procstat;
pub mod view;

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use metrics::{Counter, Desc, Gauge, Histogram, Snapshot};

use metrics::LOCAL;

/// The counter `desc` with `labels` in this process: keep the handle on hot paths.
pub fn counter(desc: &'static Desc, labels: &[(&'static str, &str)]) -> Counter {
    LOCAL.counter(desc, labels)
}

/// Adds `n` to the counter `desc` with `labels`.
pub fn add(desc: &'static Desc, labels: &[(&'static str, &str)], n: u64) {
    LOCAL.counter(desc, labels).inc_by(n);
}

/// Adds 1 to the counter `desc` with `labels`.
pub fn inc(desc: &'static Desc, labels: &[(&'static str, &str)]) {
    add(desc, labels, 1);
}

/// Records the time since `since` in the histogram `desc`.
pub fn observe_since(desc: &'static Desc, since: Instant) {
    LOCAL.histogram(desc, &[]).observe_duration(since.elapsed());
}

/// Runs `f` and records its duration in the histogram `desc` (e.g. an fsync).
pub fn timed<T>(desc: &'static Desc, f: impl FnOnce() -> T) -> T {
    let t0 = Instant::now();
    let r = f();
    LOCAL.histogram(desc, &[]).observe_duration(t0.elapsed());
    r
}

/// `file.sync_data()`, timed into the fsync histogram.
pub fn fsync(file: &std::fs::File) -> std::io::Result<()> {
    timed(&metrics::FSYNC_SECONDS, || file.sync_data())
}

/// A publisher's batch reached the store: counts its records and key + payload bytes.
pub fn published(stream: &str, records: &[crate::store::NewRecord<'_>]) {
    let bytes = records
        .iter()
        .map(|r| (r.key.len() + r.payload.len()) as u64)
        .sum();
    per_stream(&metrics::PUBLISH_RECORDS, stream, records.len() as u64);
    per_stream(&metrics::PUBLISH_BYTES, stream, bytes);
}

/// A shard sent a `Records` batch of `records` records and `bytes` record-section bytes on
/// connection `conn`.
pub fn delivered(stream: &str, conn: usize, records: u64, bytes: u64) {
    per_stream(&metrics::DELIVERY_RECORDS, stream, records);
    per_stream(&metrics::DELIVERY_BYTES, stream, bytes);
    clients().delivered(conn, records, bytes);
}

thread_local! {
    /// Per-stream counter handles of this thread, so a data-path hook costs a hash lookup
    /// and an atomic add, not the metric set's lock.
    static STREAM_COUNTERS: std::cell::RefCell<HashMap<&'static str, HashMap<String, Counter>>> =
        std::cell::RefCell::default();
}

/// Adds `n` to the counter `desc{stream}` through this thread's handle cache.
fn per_stream(desc: &'static Desc, stream: &str, n: u64) {
    STREAM_COUNTERS.with(|c| {
        let mut c = c.borrow_mut();
        let by_stream = c.entry(desc.name).or_default();
        match by_stream.get(stream) {
            Some(counter) => counter.inc_by(n),
            None => {
                let counter = LOCAL.counter(desc, &[("stream", stream)]);
                counter.inc_by(n);
                by_stream.insert(stream.to_owned(), counter);
            }
        }
    });
}

/// This shard's client sessions.
static CLIENTS: LazyLock<Mutex<clients::ClientTable>> = LazyLock::new(Mutex::default);

fn clients() -> MutexGuard<'static, clients::ClientTable> {
    // Plain counters: a panic elsewhere leaves the table usable.
    CLIENTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A client session attached on connection `conn`; it is counted until the guard drops.
pub fn client_attached(conn: usize, client_id: &str) -> ClientGuard {
    clients().attached(conn, client_id);
    ClientGuard(conn)
}

/// Removes a session from the client table when dropped.
#[derive(Debug)]
pub struct ClientGuard(usize);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        clients().detached(self.0);
    }
}

/// The hub sent a ticket for shard group `group`.
pub fn ticket(group: u32) {
    inc(&metrics::TICKETS, &[("group", &group.to_string())]);
}

/// The hub refused a `Hello` with `code`.
pub fn refused(code: impl std::fmt::Display) {
    inc(&metrics::REFUSALS, &[("code", &code.to_string())]);
}

/// A shard attached a session whose connection it accepted at `accepted`.
pub fn attached(accepted: Instant) {
    inc(&metrics::ATTACHES, &[("result", "ok")]);
    observe_since(&metrics::ATTACH_SECONDS, accepted);
}

/// A shard refused an attach with `code`.
pub fn attach_refused(code: impl std::fmt::Display) {
    inc(&metrics::ATTACHES, &[("result", &code.to_string())]);
}

/// A QUIC handshake completed (`true`) or failed, on the hub (`hub`) or a shard.
pub fn handshake(hub: bool, ok: bool) {
    let desc = match (hub, ok) {
        (true, true) => &metrics::HUB_CONNECTIONS,
        (true, false) => &metrics::HUB_HANDSHAKES_FAILED,
        (false, true) => &metrics::SHARD_CONNECTIONS,
        (false, false) => &metrics::SHARD_HANDSHAKES_FAILED,
    };
    inc(desc, &[]);
}

/// The span of one attached client session on a shard: its log lines (text or JSON) carry
/// the client id, the shard group and the shard index.
/// Logs `session attached` inside it.
pub fn session_span(client_id: &str, group: u32, shard: u32) -> tracing::Span {
    let span = tracing::info_span!("session", client_id, group, shard);
    span.in_scope(|| tracing::info!("session attached"));
    span
}

/// The span of a client's hub connection after its ticket (publish streams): log lines
/// carry the client id.
pub fn hub_span(client_id: &str) -> tracing::Span {
    tracing::info_span!("hub_client", client_id)
}

/// The supervisor spawned a process for a slot of `group`.
pub fn shard_spawned(group: u32) {
    inc(&metrics::SHARD_SPAWNS, &[("group", &group.to_string())]);
}

/// A shard process of `group`/`index` exited; `t` is what the policy made of it.
pub fn shard_exited(group: u32, index: u32, t: &crate::supervisor::Transition) {
    use crate::supervisor::Transition;
    metrics::shard_gone(group, index);
    let g = group.to_string();
    match t {
        Transition::Died {
            cause,
            restart_in: Some(_),
            ..
        } => inc(
            &metrics::SHARD_CRASHES,
            &[("group", &g), ("cause", &format!("{cause:?}"))],
        ),
        _ => inc(&metrics::SHARD_RETIRES, &[("group", &g)]),
    }
}

/// Sets this process's RSS and CPU time from `/proc/self`.
pub fn refresh_process() {
    if let Some(p) = procstat::read_self() {
        LOCAL
            .gauge(&metrics::PROCESS_RSS, &[])
            .set(i64::try_from(p.rss_bytes).unwrap_or(i64::MAX));
        LOCAL
            .counter(&metrics::PROCESS_CPU, &[])
            .raise_to(u64::try_from(p.cpu.as_millis()).unwrap_or(u64::MAX));
    }
}

/// What a shard sends after each heartbeat: its values, process figures refreshed.
pub fn shard_report() -> crate::ipc::ShardToHub {
    refresh_process();
    let mut snapshot = LOCAL.snapshot();
    snapshot.clients = clients().top(Instant::now(), clients::TOP_CLIENTS);
    crate::ipc::ShardToHub::Metrics(Box::new(snapshot))
}

/// Default `[admin] listen`: loopback, a free port (printed in the banner and written to
/// `<data_dir>/run/admin.addr`).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:0";

/// How long an operator command waits for the admin API.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
