//! Pre-fetch sizing: how far ahead the shard reads and pushes each assigned partition.

use std::collections::BTreeMap;
use std::time::Duration;

use sibyl_proto::frame::Forecast;

use super::stream_priority;

/// A subscription on this shard (the session layer's handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubKey(pub u64);

/// Configuration of [`PrefetchPlanner`]. Every field has a documented default.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrefetchConfig {
    /// Memory for pre-fetch buffers across the whole shard, bytes. Default 64 MiB.
    pub budget_bytes: u64,
    /// Added to the connection's RTT to make the lead time. Default 20 ms.
    pub jitter_margin: Duration,
    /// Records pushed on a newly assigned partition before any forecast covers it (the
    /// warm-up batch). Default 32.
    pub warmup_records: u64,
    /// A partition is *hot* (gets a pre-fetch buffer) from this many predicted bytes/s.
    /// Default 1.
    pub hot_bytes_per_s: u64,
    /// Record size assumed when a forecast has records but no bytes. Default 1 KiB.
    pub fallback_record_bytes: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            budget_bytes: 64 << 20,
            jitter_margin: Duration::from_millis(20),
            warmup_records: 32,
            hot_bytes_per_s: 1,
            fallback_record_bytes: 1024,
        }
    }
}

/// A pre-fetch depth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Records.
    pub records: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What may be pushed ahead now: push records while fewer than `records` were pushed and
/// the bytes pushed stay ≤ `bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allowance {
    /// At most this many records (≤ the grant's tokens).
    pub records: u64,
    /// At most this many bytes (≤ the client's free buffer).
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
struct Sub {
    rtt: Duration,
    buffer_capacity: Option<u64>,
    rates: BTreeMap<u32, (u64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct Part {
    warmup_left: u64,
    alloc: Depth,
}

/// Sizes the shard's pre-fetch buffers and what it pushes ahead, I/O-free.
///
/// - **Depth** of a hot partition = predicted rate × lead time, lead = RTT + `jitter_margin`.
/// - **Budget**: if the depths add up to more than `budget_bytes`, each partition gets
///   `budget × its predicted bytes/s ÷ the total predicted bytes/s`, capped at its depth, so
///   the sum never exceeds the budget.
/// - **Push**: [`push_allowance`](Self::push_allowance) never exceeds the client's free
///   buffer (as passed, and as last advertised in its `Forecast`) nor the grant's tokens.
/// - **Warm-up**: a partition newly [`assigned`](Self::assigned) may push `warmup_records`
///   (within the same limits) even without a forecast; re-assigning an already assigned
///   partition does not restart it.
/// - **Priority**: [`priority`](Self::priority) maps predicted bytes/s to a QUIC stream
///   priority.
#[derive(Debug, Clone)]
pub struct PrefetchPlanner {
    config: PrefetchConfig,
    subs: BTreeMap<SubKey, Sub>,
    parts: BTreeMap<(SubKey, u32), Part>,
}

impl PrefetchPlanner {
    /// An empty planner.
    pub fn new(config: PrefetchConfig) -> Self {
        Self {
            config,
            subs: BTreeMap::new(),
            parts: BTreeMap::new(),
        }
    }

    /// Sets the RTT of the subscription's connection (from quinn's path stats).
    pub fn set_rtt(&mut self, sub: SubKey, rtt: Duration) {
        self.subs.entry(sub).or_default().rtt = rtt;
        self.reallocate();
    }

    /// Takes the subscription's latest `Forecast`: rates and advertised buffer capacity.
    pub fn update_forecast(&mut self, sub: SubKey, forecast: &Forecast) {
        let s = self.subs.entry(sub).or_default();
        s.buffer_capacity = Some(forecast.buffer_capacity_bytes);
        s.rates = forecast
            .partitions
            .iter()
            .map(|p| (p.partition, (p.records_per_s, p.bytes_per_s)))
            .collect();
        self.reallocate();
    }

    /// The partition is in the subscription's assignment. Returns true if it is newly
    /// assigned (its warm-up batch starts), false if it already was.
    pub fn assigned(&mut self, sub: SubKey, partition: u32) -> bool {
        self.subs.entry(sub).or_default();
        if self.parts.contains_key(&(sub, partition)) {
            return false;
        }
        self.parts.insert(
            (sub, partition),
            Part {
                warmup_left: self.config.warmup_records,
                alloc: Depth::default(),
            },
        );
        self.reallocate();
        true
    }

    /// The partition left the subscription's assignment.
    pub fn revoked(&mut self, sub: SubKey, partition: u32) {
        if self.parts.remove(&(sub, partition)).is_some() {
            self.reallocate();
        }
    }

    /// The subscription ended.
    pub fn remove_sub(&mut self, sub: SubKey) {
        self.subs.remove(&sub);
        self.parts.retain(|(s, _), _| *s != sub);
        self.reallocate();
    }

    /// `records` were pushed on the partition (counts down its warm-up batch).
    pub fn on_pushed(&mut self, sub: SubKey, partition: u32, records: u64) {
        if let Some(p) = self.parts.get_mut(&(sub, partition)) {
            p.warmup_left = p.warmup_left.saturating_sub(records);
        }
    }

    /// Records of the warm-up batch still to push.
    pub fn warmup_left(&self, sub: SubKey, partition: u32) -> u64 {
        self.parts
            .get(&(sub, partition))
            .map_or(0, |p| p.warmup_left)
    }

    /// The pre-fetch buffer depth for the partition, within the shard budget (zero for
    /// partitions not assigned or not hot).
    pub fn depth(&self, sub: SubKey, partition: u32) -> Depth {
        self.parts
            .get(&(sub, partition))
            .map_or(Depth::default(), |p| p.alloc)
    }

    /// Sum of all depths in bytes (≤ `budget_bytes`).
    pub fn allocated_bytes(&self) -> u64 {
        self.parts.values().map(|p| p.alloc.bytes).sum()
    }

    /// What may be pushed ahead on the partition now, given the client's free buffer space
    /// (bytes) and the tokens left in its grant (records).
    pub fn push_allowance(
        &self,
        sub: SubKey,
        partition: u32,
        client_buffer_free: u64,
        grant_tokens: u64,
    ) -> Allowance {
        let Some(p) = self.parts.get(&(sub, partition)) else {
            return Allowance::default();
        };
        let advertised = self
            .subs
            .get(&sub)
            .and_then(|s| s.buffer_capacity)
            .unwrap_or(u64::MAX);
        let bytes = client_buffer_free.min(advertised);
        let records = p.alloc.records.max(p.warmup_left).min(grant_tokens);
        if records == 0 || bytes == 0 {
            return Allowance::default();
        }
        Allowance { records, bytes }
    }

    /// The QUIC stream priority of the partition's uni stream (higher first).
    pub fn priority(&self, sub: SubKey, partition: u32) -> i32 {
        self.subs
            .get(&sub)
            .and_then(|s| s.rates.get(&partition))
            .map_or(0, |r| stream_priority(self.bytes_rate(*r)))
    }

    fn bytes_rate(&self, (records, bytes): (u64, u64)) -> u64 {
        if bytes == 0 {
            records.saturating_mul(self.config.fallback_record_bytes)
        } else {
            bytes
        }
    }

    fn reallocate(&mut self) {
        // (key, wanted depth, bytes/s weight, bytes per record)
        let mut wants: Vec<((SubKey, u32), Depth, u64, u64)> = Vec::new();
        for &(sub, partition) in self.parts.keys() {
            let Some(s) = self.subs.get(&sub) else {
                continue;
            };
            let Some(&(records, bytes)) = s.rates.get(&partition) else {
                continue;
            };
            let bps = self.bytes_rate((records, bytes));
            if bps < self.config.hot_bytes_per_s || records == 0 {
                continue;
            }
            let lead = (s.rtt + self.config.jitter_margin).as_secs_f64();
            let record_bytes = (bps / records).max(1);
            let want_bytes = (bps as f64 * lead).ceil() as u64;
            let want = Depth {
                records: want_bytes.div_ceil(record_bytes),
                bytes: want_bytes,
            };
            wants.push(((sub, partition), want, bps, record_bytes));
        }
        for p in self.parts.values_mut() {
            p.alloc = Depth::default();
        }
        let sum_want: u128 = wants.iter().map(|w| u128::from(w.1.bytes)).sum();
        let sum_weight: u128 = wants.iter().map(|w| u128::from(w.2)).sum();
        let budget = u128::from(self.config.budget_bytes);
        for (key, want, weight, record_bytes) in wants {
            let alloc = if sum_want <= budget {
                want
            } else {
                // weight ≤ sum_weight, so the share ≤ budget and fits in u64.
                let share = (budget * u128::from(weight) / sum_weight.max(1)) as u64;
                let bytes = share.min(want.bytes);
                Depth {
                    records: bytes / record_bytes,
                    bytes,
                }
            };
            if let Some(p) = self.parts.get_mut(&key) {
                p.alloc = alloc;
            }
        }
    }
}
