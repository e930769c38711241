//! The metric table, a process-wide set of labelled values, shard snapshots and the
//! Prometheus collector over all of them.
//!
//! ```text
//! hooks (hub, shard) ── counter(&DESC, labels).inc_by(n) ──▶ MetricSet (this process)
//! shard: MetricSet::snapshot() ──ShardToHub::Metrics (bounded)──▶ hub: Snapshots
//! scrape: NodeCollector = hub MetricSet + every shard's latest snapshot (+ group, shard labels)
//!         ──prometheus-client text encoder──▶ /metrics
//! ```
//!
//! Adding a metric is one line in the `metrics!` table below plus its hook. Values are
//! plain atomics; the format is prometheus-client's encoder, never written by hand.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use serde::{Deserialize, Serialize};

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Monotonic count; exposed as `<name>_total`.
    Counter,
    /// Monotonic count kept in integer units, exposed as `<name>_total` = value × the factor
    /// (e.g. CPU milliseconds exposed as seconds).
    ScaledCounter(f64),
    /// A value that goes up and down.
    Gauge,
    /// Observations in the given upper bounds (`+Inf` is implied).
    Histogram(&'static [f64]),
}

/// A metric's name, help and kind: one entry of the table.
#[derive(Debug)]
pub struct Desc {
    /// Name without the `_total` suffix counters get when exposed.
    pub name: &'static str,
    /// `# HELP` text.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
}

/// Latency buckets, seconds: 100 µs .. 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

macro_rules! metrics {
    ($($(#[$m:meta])* $id:ident = $kind:expr, $name:literal, $help:literal;)*) => {
        $(
            #[doc = $help]
            $(#[$m])*
            pub static $id: Desc = Desc { name: $name, help: $help, kind: $kind };
        )*
        /// Every metric, in exposition order.
        pub static ALL: &[&Desc] = &[$(&$id),*];
    };
}

// One line per metric: `ID = kind, "name", "help";` (counters without `_total`).
metrics! {
    HUB_CONNECTIONS = Kind::Counter, "sibyl_hub_connections", "QUIC connections accepted by the hub.";
    HUB_HANDSHAKES_FAILED = Kind::Counter, "sibyl_hub_handshakes_failed", "Hub QUIC handshakes that failed.";
    TICKETS = Kind::Counter, "sibyl_tickets", "Tickets issued by the hub, per shard group.";
    REFUSALS = Kind::Counter, "sibyl_refusals", "Hellos the hub refused, per error code.";
    SHARD_CONNECTIONS = Kind::Counter, "sibyl_shard_connections", "QUIC connections accepted by a shard.";
    SHARD_HANDSHAKES_FAILED = Kind::Counter, "sibyl_shard_handshakes_failed", "Shard QUIC handshakes that failed.";
    ATTACHES = Kind::Counter, "sibyl_attaches", "Sessions attached on a shard (result=ok) or refused (result=the error code).";
    ATTACH_SECONDS = Kind::Histogram(LATENCY_BUCKETS), "sibyl_attach_seconds", "Time from a shard accepting a connection to its session attached.";
    PUBLISH_RECORDS = Kind::Counter, "sibyl_publish_records", "Records appended by publishers, per stream.";
    PUBLISH_BYTES = Kind::Counter, "sibyl_publish_bytes", "Key and payload bytes appended by publishers, per stream.";
    SYNTHETIC_RECORDS = Kind::Counter, "sibyl_synthetic_records", "Records appended by the hub's synthetic publishers, per stream.";
    DELIVERY_RECORDS = Kind::Counter, "sibyl_delivery_records", "Records a shard sent to subscribers, per stream.";
    DELIVERY_BYTES = Kind::Counter, "sibyl_delivery_bytes", "Bytes of the record sections of the Records batches a shard sent, per stream.";
    GRANTS = Kind::Counter, "sibyl_grants", "Grant frames a shard sent.";
    SUBSCRIPTIONS = Kind::Counter, "sibyl_subscriptions", "Subscriptions a shard accepted.";
    FSYNC_SECONDS = Kind::Histogram(LATENCY_BUCKETS), "sibyl_store_fsync_seconds", "Duration of the store's segment fsyncs.";
    STORE_BYTES = Kind::Gauge, "sibyl_store_bytes", "Bytes of segment files, per stream.";
    STORE_SEGMENTS = Kind::Gauge, "sibyl_store_segments", "Segment files, per stream.";
    STREAM_END_OFFSET = Kind::Gauge, "sibyl_stream_end_offset", "Next offset of a partition (records ever appended).";
    GROUP_LAG = Kind::Gauge, "sibyl_consumer_group_lag", "Records between a partition's end and its consumer group's last known position.";
    GROUP_MEMBERS = Kind::Gauge, "sibyl_consumer_group_members", "Members of consumer groups across all shards.";
    SHARD_SLOTS = Kind::Gauge, "sibyl_shards", "Shard slots per state (ready, starting, draining, dead), per group.";
    SHARD_SPAWNS = Kind::Counter, "sibyl_shard_spawns", "Shard processes spawned (first starts and restarts).";
    SHARD_RESTARTS = Kind::Counter, "sibyl_shard_restarts", "Shard processes restarted after a death.";
    SHARD_CRASHES = Kind::Counter, "sibyl_shard_crashes", "Shard deaths (exit, missed heartbeats or start-up timeout), per cause.";
    SHARD_RETIRES = Kind::Counter, "sibyl_shard_retires", "Shard processes that exited after a drain.";
    SHARD_OPEN_CONNECTIONS = Kind::Gauge, "sibyl_shard_open_connections", "Open client connections of a shard (last heartbeat).";
    SHARD_OPEN_SUBSCRIPTIONS = Kind::Gauge, "sibyl_shard_open_subscriptions", "Active subscriptions of a shard (last heartbeat).";
    PROCESS_RSS = Kind::Gauge, "process_resident_memory_bytes", "Resident set size of the process.";
    PROCESS_CPU = Kind::ScaledCounter(0.001), "process_cpu_seconds", "User and system CPU time of the process.";
}

/// Labels of one value: static keys, owned values.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
enum Cell {
    Counter(Arc<AtomicU64>),
    Gauge(Arc<AtomicI64>),
    Histogram(Arc<HistogramCell>),
}

/// A counter handle: clone it into a hot path, `inc_by` is one relaxed atomic add.
#[derive(Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    /// Adds 1.
    pub fn inc(&self) {
        self.inc_by(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// Raises the value to `v` (counters maintained elsewhere, e.g. CPU time).
    pub fn raise_to(&self, v: u64) {
        self.0.fetch_max(v, Relaxed);
    }
}

/// A gauge handle.
#[derive(Debug, Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Observation counts per bucket and their sum.
#[derive(Debug)]
pub struct HistogramCell {
    bounds: &'static [f64],
    /// One per bound plus the `+Inf` bucket.
    counts: Box<[AtomicU64]>,
    /// Sum of observations in nanounits (seconds → ns), so it stays an integer atomic.
    sum_nanos: AtomicU64,
}

/// A histogram handle.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<HistogramCell>);

impl Histogram {
    /// Records one observation (seconds for the `_seconds` histograms).
    pub fn observe(&self, v: f64) {
        let c = &self.0;
        let i = c
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(c.bounds.len());
        c.counts[i].fetch_add(1, Relaxed);
        c.sum_nanos.fetch_add((v.max(0.0) * 1e9) as u64, Relaxed);
    }
    /// Records a duration.
    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }
}

/// Every labelled value of one process.
#[derive(Debug, Default)]
pub struct MetricSet {
    cells: Mutex<BTreeMap<(&'static str, Labels), Cell>>,
}

/// Most values one snapshot carries (bounds the IPC frame: ~100 bytes each).
pub const MAX_SAMPLES: usize = 2048;
/// Longest label value kept in a snapshot.
pub const MAX_LABEL_LEN: usize = 128;

impl MetricSet {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(&'static str, Labels), Cell>> {
        // Values are plain atomics: a panic elsewhere leaves the map consistent.
        self.cells
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cell(&self, desc: &'static Desc, labels: &[(&'static str, &str)]) -> Cell {
        let key = (
            desc.name,
            labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        );
        let mut cells = self.lock();
        let cell = cells.entry(key).or_insert_with(|| match desc.kind {
            Kind::Counter | Kind::ScaledCounter(_) => Cell::Counter(Arc::default()),
            Kind::Gauge => Cell::Gauge(Arc::default()),
            Kind::Histogram(bounds) => Cell::Histogram(Arc::new(HistogramCell {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            })),
        });
        match cell {
            Cell::Counter(c) => Cell::Counter(c.clone()),
            Cell::Gauge(g) => Cell::Gauge(g.clone()),
            Cell::Histogram(h) => Cell::Histogram(h.clone()),
        }
    }

    /// The counter `desc` with `labels` (created at 0). `desc` must be a counter.
    pub fn counter(&self, desc: &'static Desc, labels: &[(&'static str, &str)]) -> Counter {
        match self.cell(desc, labels) {
            Cell::Counter(c) => Counter(c),
            _ => Counter(Arc::default()), // a kind mismatch in the table: a detached handle
        }
    }

    /// The gauge `desc` with `labels`. `desc` must be a gauge.
    pub fn gauge(&self, desc: &'static Desc, labels: &[(&'static str, &str)]) -> Gauge {
        match self.cell(desc, labels) {
            Cell::Gauge(g) => Gauge(g),
            _ => Gauge(Arc::default()),
        }
    }

    /// The histogram `desc` with `labels`. `desc` must be a histogram.
    pub fn histogram(&self, desc: &'static Desc, labels: &[(&'static str, &str)]) -> Histogram {
        match self.cell(desc, labels) {
            Cell::Histogram(h) => Histogram(h),
            _ => Histogram(Arc::new(HistogramCell {
                bounds: &[],
                counts: Box::new([AtomicU64::new(0)]),
                sum_nanos: AtomicU64::new(0),
            })),
        }
    }

    /// Drops every value of `desc` (gauges recomputed from scratch at each scrape).
    pub fn clear(&self, desc: &'static Desc) {
        self.lock().retain(|(name, _), _| *name != desc.name);
    }

    /// A copy of every value, at most [`MAX_SAMPLES`].
    pub fn snapshot(&self) -> Snapshot {
        let cells = self.lock();
        let samples = cells
            .iter()
            .take(MAX_SAMPLES)
            .map(|((name, labels), cell)| Sample {
                name: (*name).to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), truncate(v)))
                    .collect(),
                value: match cell {
                    Cell::Counter(c) => Value::Counter(c.load(Relaxed)),
                    Cell::Gauge(g) => Value::Gauge(g.load(Relaxed)),
                    Cell::Histogram(h) => Value::Histogram {
                        sum_nanos: h.sum_nanos.load(Relaxed),
                        counts: h.counts.iter().map(|c| c.load(Relaxed)).collect(),
                    },
                },
            })
            .collect();
        Snapshot {
            samples,
            clients: Vec::new(),
        }
    }
}

fn truncate(v: &str) -> String {
    let mut end = v.len().min(MAX_LABEL_LEN);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    v[..end].to_owned()
}

/// The values of one process at one instant: what a shard sends the hub.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// At most [`MAX_SAMPLES`] values.
    pub samples: Vec<Sample>,
    /// A shard's busiest client sessions, at most [`super::clients::TOP_CLIENTS`].
    #[serde(default)]
    pub clients: Vec<super::clients::ClientRate>,
}

/// One labelled value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The metric's table name.
    pub name: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: Value,
}

/// A sample's value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// Counter value.
    Counter(u64),
    /// Gauge value.
    Gauge(i64),
    /// Per-bucket counts (the table's bounds, then `+Inf`) and the sum in nanounits.
    Histogram {
        /// Sum of observations × 10⁹.
        sum_nanos: u64,
        /// Count per bucket (not cumulative).
        counts: Vec<u64>,
    },
}

impl Snapshot {
    /// The value of `desc` whose labels include every pair of `want` (summed over the
    /// matching counters or gauges; histograms count observations).
    pub fn sum(&self, desc: &Desc, want: &[(&str, &str)]) -> i128 {
        self.samples
            .iter()
            .filter(|s| s.name == desc.name)
            .filter(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| match &s.value {
                Value::Counter(c) => i128::from(*c),
                Value::Gauge(g) => i128::from(*g),
                Value::Histogram { counts, .. } => counts.iter().map(|c| i128::from(*c)).sum(),
            })
            .sum()
    }
}

/// This process's values.
pub static LOCAL: LazyLock<MetricSet> = LazyLock::new(MetricSet::default);

/// The latest snapshot of every live shard, keyed by (group, shard index).
pub static SHARDS: LazyLock<Mutex<BTreeMap<(u32, u32), Snapshot>>> = LazyLock::new(Mutex::default);

/// Stores a shard's latest snapshot (hub side).
pub fn shard_snapshot(group: u32, shard: u32, snapshot: Snapshot) {
    let mut s = SHARDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    s.insert((group, shard), snapshot);
}

/// Forgets a shard whose process exited (hub side); its restart reports afresh.
pub fn shard_gone(group: u32, shard: u32) {
    let mut s = SHARDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    s.remove(&(group, shard));
}

/// The node's view: this process's values plus every shard's latest snapshot with `group`
/// and `shard` labels.
pub fn node_snapshot() -> Snapshot {
    let mut all = LOCAL.snapshot();
    let shards = SHARDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for ((group, shard), snap) in shards.iter() {
        for s in &snap.samples {
            let mut s = s.clone();
            s.labels.push(("group".to_owned(), group.to_string()));
            s.labels.push(("shard".to_owned(), shard.to_string()));
            all.samples.push(s);
        }
    }
    all
}

/// A prometheus-client collector over [`node_snapshot`]: one descriptor per table entry
/// that has values, then its values.
#[derive(Debug, Default)]
pub struct NodeCollector;

impl prometheus_client::collector::Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = node_snapshot();
        for desc in ALL {
            let samples: Vec<&Sample> = snap
                .samples
                .iter()
                .filter(|s| s.name == desc.name)
                .collect();
            if samples.is_empty() {
                continue;
            }
            let ty = match desc.kind {
                Kind::Counter | Kind::ScaledCounter(_) => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram(_) => MetricType::Histogram,
            };
            let mut family = encoder.encode_descriptor(desc.name, desc.help, None, ty)?;
            for s in samples {
                let labels: Vec<(&str, &str)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                if labels.is_empty() {
                    encode_value(&mut family, &s.value, desc.kind)?;
                } else {
                    encode_value(&mut family.encode_family(&labels)?, &s.value, desc.kind)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_value(
    m: &mut MetricEncoder<'_>,
    value: &Value,
    kind: Kind,
) -> Result<(), std::fmt::Error> {
    match (value, kind) {
        (Value::Counter(v), Kind::Counter) => m.encode_counter::<NoLabelSet, _, u64>(v, None),
        (Value::Counter(v), Kind::ScaledCounter(f)) => {
            m.encode_counter::<NoLabelSet, _, u64>(&(*v as f64 * f), None)
        }
        (Value::Gauge(v), Kind::Gauge) => m.encode_gauge(v),
        (Value::Histogram { sum_nanos, counts }, Kind::Histogram(bounds))
            if counts.len() == bounds.len() + 1 =>
        {
            let buckets: Vec<(f64, u64)> = bounds
                .iter()
                .copied()
                .chain([f64::MAX])
                .zip(counts.iter().copied())
                .collect();
            let count = counts.iter().sum();
            m.encode_histogram::<NoLabelSet>(*sum_nanos as f64 / 1e9, count, &buckets, None)
        }
        // A snapshot from another build whose kind differs: skip the value.
        _ => Ok(()),
    }
}

/// The node's metrics in the Prometheus text format (prometheus-client's encoder).
pub fn encode_text() -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(NodeCollector));
    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_follow_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for d in ALL {
            assert!(seen.insert(d.name), "{} twice", d.name);
            assert!(
                !d.name.ends_with("_total"),
                "{}: the encoder adds _total",
                d.name
            );
            if let Kind::Histogram(_) = d.kind {
                assert!(d.name.ends_with("_seconds"), "{}", d.name);
            }
        }
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../../docs/OBSERVABILITY.md");
        for d in ALL {
            assert!(
                doc.contains(d.name),
                "{} is not in docs/OBSERVABILITY.md",
                d.name
            );
        }
    }

    #[test]
    fn counters_snapshot_and_encode() {
        let set = MetricSet::default();
        set.counter(&PUBLISH_RECORDS, &[("stream", "a")]).inc_by(5);
        set.counter(&PUBLISH_RECORDS, &[("stream", "a")]).inc();
        set.histogram(&ATTACH_SECONDS, &[]).observe(0.003);
        let snap = set.snapshot();
        assert_eq!(snap.sum(&PUBLISH_RECORDS, &[("stream", "a")]), 6);
        assert_eq!(snap.sum(&ATTACH_SECONDS, &[]), 1);
        let bytes = sibyl_proto::cbor::to_vec(&snap).unwrap();
        let back: Snapshot = sibyl_proto::cbor::from_slice(&bytes).unwrap();
        assert_eq!(back, snap);
    }

    #[test]
    fn collector_adds_shard_labels() {
        LOCAL.counter(&TICKETS, &[("group", "hub-test")]).inc();
        let mut shard = MetricSet::default();
        shard
            .counter(&DELIVERY_RECORDS, &[("stream", "s")])
            .inc_by(7);
        shard
            .histogram(&ATTACH_SECONDS, &[])
            .observe_duration(std::time::Duration::from_millis(2));
        shard_snapshot(901, 3, std::mem::take(&mut shard).snapshot());
        let text = encode_text();
        assert!(
            text.contains("sibyl_delivery_records_total{stream=\"s\",group=\"901\",shard=\"3\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE sibyl_attach_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("sibyl_attach_seconds_count{group=\"901\",shard=\"3\"} 1"),
            "{text}"
        );
        shard_gone(901, 3);
        assert!(!encode_text().contains("group=\"901\""));
    }
}
