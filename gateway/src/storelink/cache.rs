//! Bounded per-partition record caches of a shard (I/O-free).
//!
//! A [`PartitionCache`] holds the most recent contiguous run of a partition's records as a
//! queue of [`RecordBatch`]es, bounded in bytes (oldest batches evicted first). A
//! [`ShardCache`] holds one per `(stream, partition)` under a shard-wide byte cap, evicting
//! the oldest batches of the least recently used partition first.
//!
//! Retention on the hub is not tracked: records the cache holds stay servable after the
//! store deleted them (they were valid records).

use std::collections::{HashMap, VecDeque};

use super::batch::{RecordBatch, collect};

/// Cache bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Bytes (encoded batch bodies) one partition may hold. Default 4 MiB. A batch larger
    /// than this is not cached.
    pub partition_bytes: usize,
    /// Bytes all partitions of the shard may hold together. Default 64 MiB.
    pub total_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            partition_bytes: 4 << 20,
            total_bytes: 64 << 20,
        }
    }
}

/// Counters of a [`ShardCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` calls served.
    pub hits: u64,
    /// `get` calls not served.
    pub misses: u64,
    /// Batches inserted (whole or as a trimmed suffix).
    pub inserted: u64,
    /// Batches evicted (per-partition or shard-wide cap).
    pub evicted: u64,
}

/// The cached run of one partition. See the [module documentation](self).
#[derive(Debug, Clone, Default)]
pub struct PartitionCache {
    batches: VecDeque<RecordBatch>,
    bytes: usize,
    last_used: u64,
}

/// What a partition cache holds ahead of a reader ([`PartitionCache::ahead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    /// Offset after the cached run (where a fetch would continue).
    pub next: u64,
    /// Body bytes of the cached batches ending after the reader's position.
    pub bytes: usize,
    /// Records of the newest cached batch (a small one was fetched at the tail).
    pub last_records: usize,
    /// Body bytes of the newest cached batch.
    pub last_bytes: usize,
}

impl PartitionCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// `(first, next)` offsets held, `None` when empty.
    pub fn range(&self) -> Option<(u64, u64)> {
        Some((
            self.batches.front()?.base_offset(),
            self.batches.back()?.next_offset(),
        ))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Batches held.
    pub fn batches(&self) -> usize {
        self.batches.len()
    }

    /// What is cached ahead of a reader at `from`; `None` when `from` is not inside the
    /// cached run.
    pub fn ahead(&self, from: u64) -> Option<Ahead> {
        let (first, next) = self.range()?;
        if from < first || from > next {
            return None;
        }
        let i = self.batches.partition_point(|b| b.next_offset() <= from);
        let bytes = self.batches.range(i..).map(RecordBatch::body_len).sum();
        let last = self.batches.back()?;
        Some(Ahead {
            next,
            bytes,
            last_records: last.len(),
            last_bytes: last.body_len(),
        })
    }

    /// The records from `from` on under the limits (see [`RecordBatch::slice`]), spanning
    /// consecutive cached batches; `None` when `from` is not cached. A whole cached batch that
    /// starts at `from` and fits is shared, not copied.
    pub fn get(&self, from: u64, max_records: usize, max_bytes: usize) -> Option<RecordBatch> {
        let (first, next) = self.range()?;
        if from < first || from >= next || max_records == 0 {
            return None;
        }
        let i = self.batches.partition_point(|b| b.next_offset() <= from);
        let b = self.batches.get(i)?;
        let whole = from == b.base_offset()
            && b.len() <= max_records
            && b.body_len() - 16 <= max_bytes
            // More would fit from the next batch: merge instead.
            && self.batches.get(i + 1).is_none_or(|n| {
                b.len() + n.len() > max_records || b.body_len() + n.body_len() - 32 > max_bytes
            });
        if whole {
            return Some(b.clone());
        }
        collect(
            b.partition(),
            self.batches.range(i..),
            from,
            max_records,
            max_bytes,
        )
    }

    /// Adds `batch`, keeping the most recent contiguous run under `cap` bytes: a batch
    /// continuing the run is appended (trimmed of records already held); a batch past the run
    /// replaces it; a batch before it is prepended if adjacent and it fits, else dropped.
    /// Returns the number of batches evicted.
    pub fn insert(&mut self, batch: RecordBatch, cap: usize) -> u64 {
        if batch.is_empty() || batch.body_len() > cap {
            return 0;
        }
        let Some((first, next)) = self.range() else {
            self.push_back(batch);
            return 0;
        };
        let mut evicted = 0;
        if batch.base_offset() > next {
            evicted = self.batches.len() as u64;
            self.batches.clear();
            self.bytes = 0;
            self.push_back(batch);
        } else if batch.next_offset() <= first {
            if batch.next_offset() == first && self.bytes + batch.body_len() <= cap {
                self.bytes += batch.body_len();
                self.batches.push_front(batch);
            }
            return 0;
        } else if batch.next_offset() > next {
            let suffix = if batch.base_offset() == next {
                Some(batch)
            } else {
                batch.slice(next, usize::MAX, usize::MAX)
            };
            if let Some(s) = suffix {
                self.push_back(s);
            }
        } else {
            return 0;
        }
        while self.bytes > cap {
            self.pop_front();
            evicted += 1;
        }
        evicted
    }

    fn push_back(&mut self, b: RecordBatch) {
        self.bytes += b.body_len();
        self.batches.push_back(b);
    }

    /// Evicts the oldest batch; returns its size.
    fn pop_front(&mut self) -> usize {
        let n = self.batches.pop_front().map_or(0, |b| b.body_len());
        self.bytes -= n;
        n
    }
}

/// All partition caches of a shard under one byte cap. See the [module documentation](self).
#[derive(Debug, Clone, Default)]
pub struct ShardCache {
    cfg: CacheConfig,
    parts: HashMap<String, HashMap<u32, PartitionCache>>,
    bytes: usize,
    tick: u64,
    stats: CacheStats,
}

impl ShardCache {
    /// An empty cache.
    pub fn new(cfg: CacheConfig) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    /// The bounds.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Bytes held by all partitions.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// A partition's cache, if it holds anything.
    pub fn partition(&self, stream: &str, partition: u32) -> Option<&PartitionCache> {
        self.parts.get(stream)?.get(&partition)
    }

    /// See [`PartitionCache::ahead`] (no statistics, no use mark).
    pub fn ahead(&self, stream: &str, partition: u32, from: u64) -> Option<Ahead> {
        self.partition(stream, partition)?.ahead(from)
    }

    /// See [`PartitionCache::get`]; marks the partition used.
    pub fn get(
        &mut self,
        stream: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Option<RecordBatch> {
        self.tick += 1;
        let hit = self
            .parts
            .get_mut(stream)
            .and_then(|m| m.get_mut(&partition))
            .and_then(|p| {
                p.last_used = self.tick;
                p.get(from, max_records, max_bytes)
            });
        if hit.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        hit
    }

    /// See [`PartitionCache::insert`]; then evicts the oldest batches of the least recently
    /// used partitions until the shard-wide cap holds.
    pub fn insert(&mut self, stream: &str, batch: RecordBatch) {
        if batch.is_empty() {
            return;
        }
        self.tick += 1;
        let cap = self.cfg.partition_bytes.min(self.cfg.total_bytes);
        let p = self
            .parts
            .entry(stream.to_owned())
            .or_default()
            .entry(batch.partition())
            .or_default();
        let before = p.bytes;
        p.last_used = self.tick;
        let evicted = p.insert(batch, cap);
        let after = p.bytes;
        self.bytes = self.bytes + after - before;
        self.stats.evicted += evicted;
        if after != before || evicted > 0 {
            self.stats.inserted += 1;
        }
        self.enforce_total();
        self.parts.retain(|_, m| {
            m.retain(|_, p| p.batches() > 0);
            !m.is_empty()
        });
    }

    /// Drops a partition's cache (e.g. after its stream was recreated).
    pub fn invalidate(&mut self, stream: &str, partition: u32) {
        if let Some(m) = self.parts.get_mut(stream)
            && let Some(p) = m.remove(&partition)
        {
            self.bytes -= p.bytes;
        }
    }

    fn enforce_total(&mut self) {
        while self.bytes > self.cfg.total_bytes {
            let lru = self
                .parts
                .iter_mut()
                .flat_map(|(_, m)| m.values_mut())
                .filter(|p| p.batches() > 0)
                .min_by_key(|p| p.last_used);
            let Some(p) = lru else { break };
            self.bytes -= p.pop_front();
            self.stats.evicted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sibyl_proto::frame::data::{RecordRef, Records};
    use std::sync::Arc;

    const PAYLOAD: [u8; 100] = [7; 100];

    /// Records `[from, from + n)` of partition `p`, 100-byte payloads.
    fn batch(p: u32, from: u64, n: u64) -> RecordBatch {
        let recs = (from..from + n).map(|o| RecordRef {
            offset: o,
            timestamp: o,
            key: b"",
            payload: &PAYLOAD,
        });
        RecordBatch::from_records(Records::new(p, recs).unwrap())
    }

    fn offsets(b: &RecordBatch) -> Vec<u64> {
        b.iter().map(|r| r.offset).collect()
    }

    fn same(a: &RecordBatch, b: &RecordBatch) -> bool {
        Arc::ptr_eq(&a.shared().unwrap(), &b.shared().unwrap())
    }

    #[test]
    fn ahead_counts_cached_bytes_past_a_position() {
        let mut c = PartitionCache::new();
        assert_eq!(c.ahead(0), None);
        let (a, b) = (batch(0, 10, 5), batch(0, 15, 3));
        let (la, lb) = (a.body_len(), b.body_len());
        c.insert(a, usize::MAX);
        c.insert(b, usize::MAX);
        let at = |from| {
            c.ahead(from)
                .map(|x| (x.next, x.bytes, x.last_records, x.last_bytes))
        };
        assert_eq!(at(10), Some((18, la + lb, 3, lb)));
        assert_eq!(at(14), Some((18, la + lb, 3, lb)));
        assert_eq!(at(15), Some((18, lb, 3, lb)));
        assert_eq!(at(18), Some((18, 0, 3, lb)));
        assert_eq!(at(9), None);
        assert_eq!(at(19), None);
    }

    #[test]
    fn hits_share_whole_batches_and_slice_the_rest() {
        let mut c = PartitionCache::new();
        let (a, b) = (batch(0, 10, 5), batch(0, 15, 5));
        c.insert(a.clone(), usize::MAX);
        c.insert(b.clone(), usize::MAX);
        assert_eq!(c.range(), Some((10, 20)));
        assert!(c.get(9, 100, 1 << 20).is_none());
        assert!(c.get(20, 100, 1 << 20).is_none(), "the tail is a miss");
        // Whole batch, no copy, when the next one would not fit.
        let got = c.get(10, 5, 1 << 20).unwrap();
        assert!(same(&got, &a));
        let got = c.get(15, 100, 1 << 20).unwrap();
        assert!(same(&got, &b));
        // Spanning two batches: merged into one.
        let got = c.get(12, 100, 1 << 20).unwrap();
        assert_eq!(offsets(&got), (12..20).collect::<Vec<_>>());
        assert_eq!((got.base_offset(), got.next_offset()), (12, 20));
        // Limits: records, then bytes (each record is 1 + 8 + 1 + 1 + 100 = 111 bytes).
        assert_eq!(offsets(&c.get(11, 3, 1 << 20).unwrap()), vec![11, 12, 13]);
        assert_eq!(offsets(&c.get(11, 100, 250).unwrap()), vec![11, 12]);
        assert_eq!(
            offsets(&c.get(11, 100, 1).unwrap()),
            vec![11],
            "at least one"
        );
        assert!(c.get(11, 0, 1 << 20).is_none());
    }

    #[test]
    fn per_partition_cap_evicts_oldest_batches() {
        let one = batch(0, 0, 10).body_len();
        let mut c = PartitionCache::new();
        let mut evicted = 0;
        for i in 0..5 {
            evicted += c.insert(batch(0, i * 10, 10), 3 * one);
        }
        assert_eq!(evicted, 2);
        assert_eq!(c.range(), Some((20, 50)));
        assert_eq!(c.bytes(), 3 * one);
        assert!(c.get(15, 10, 1 << 20).is_none());
        assert!(c.get(25, 10, 1 << 20).is_some());
        // Too large for the cap: not cached at all.
        assert_eq!(c.insert(batch(0, 50, 40), 3 * one), 0);
        assert_eq!(c.range(), Some((20, 50)));
    }

    #[test]
    fn insert_keeps_one_contiguous_recent_run() {
        let mut c = PartitionCache::new();
        c.insert(batch(0, 10, 10), usize::MAX);
        // Overlap: only the new suffix is added.
        c.insert(batch(0, 15, 10), usize::MAX);
        assert_eq!(c.range(), Some((10, 25)));
        assert_eq!(
            offsets(&c.get(10, 100, 1 << 20).unwrap()),
            (10..25).collect::<Vec<_>>()
        );
        // Already held: ignored.
        c.insert(batch(0, 12, 3), usize::MAX);
        assert_eq!(c.batches(), 2);
        // Adjacent older: prepended.
        c.insert(batch(0, 5, 5), usize::MAX);
        assert_eq!(c.range(), Some((5, 25)));
        // Older, not adjacent: dropped.
        c.insert(batch(0, 0, 2), usize::MAX);
        assert_eq!(c.range(), Some((5, 25)));
        // Past a gap: the newer run replaces the old one.
        let evicted = c.insert(batch(0, 30, 5), usize::MAX);
        assert_eq!(evicted, 3);
        assert_eq!(c.range(), Some((30, 35)));
        assert_eq!(c.bytes(), batch(0, 30, 5).body_len());
        // Empty batches are ignored.
        c.insert(RecordBatch::empty(0, 35), usize::MAX);
        assert_eq!(c.batches(), 1);
    }

    #[test]
    fn shard_cap_evicts_least_recently_used_partition_first() {
        let one = batch(0, 0, 10).body_len();
        let mut c = ShardCache::new(CacheConfig {
            partition_bytes: 10 * one,
            total_bytes: 4 * one,
        });
        c.insert("s", batch(0, 0, 10));
        c.insert("s", batch(0, 10, 10));
        c.insert("s", batch(1, 0, 10));
        c.insert("t", batch(0, 0, 10));
        assert_eq!(c.bytes(), 4 * one);
        // Touch s/0: s/1 becomes the least recently used.
        assert!(c.get("s", 0, 5, 100, 1 << 20).is_some());
        c.insert("t", batch(0, 10, 10));
        assert_eq!(c.bytes(), 4 * one);
        assert!(c.partition("s", 1).is_none(), "LRU partition evicted");
        assert_eq!(c.partition("s", 0).unwrap().range(), Some((0, 20)));
        // Next victim: the oldest batch of s/0 (now least recently used).
        c.insert("t", batch(0, 20, 10));
        assert_eq!(c.partition("s", 0).unwrap().range(), Some((10, 20)));
        assert_eq!(c.partition("t", 0).unwrap().range(), Some((0, 30)));
        let st = c.stats();
        assert_eq!((st.hits, st.misses, st.evicted), (1, 0, 2));
        assert!(c.get("s", 0, 5, 100, 1 << 20).is_none());
        assert!(c.get("nope", 0, 0, 100, 1 << 20).is_none());
        assert_eq!(c.stats().misses, 2);
        c.invalidate("t", 0);
        assert_eq!(c.bytes(), one);
    }

    #[test]
    fn slice_of_a_batch() {
        let b = batch(3, 100, 10);
        assert!(same(&b.slice(100, 10, 1 << 20).unwrap(), &b));
        let s = b.slice(105, 2, 1 << 20).unwrap();
        assert_eq!((s.partition(), offsets(&s)), (3, vec![105, 106]));
        assert!(b.slice(99, 10, 1 << 20).is_none());
        assert!(b.slice(110, 10, 1 << 20).is_none());
        assert!(RecordBatch::empty(3, 7).slice(7, 10, 10).is_none());
        assert_eq!(RecordBatch::empty(3, 7).next_offset(), 7);
    }
}
