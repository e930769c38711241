//! [`CachedReader`]: reads through the shard's caches, then the link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::batch::RecordBatch;
use super::cache::{CacheConfig, CacheStats, ShardCache};
use super::client::{LinkError, StoreLink};
use super::raw::RawHint;

/// How much a cache miss fetches from the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderConfig {
    /// Records per fetch (at least what the caller asked for). Default 16 384.
    pub fetch_records: u32,
    /// Bytes per fetch (at least what the caller asked for). Default 1 MiB.
    pub fetch_bytes: u32,
    /// A partition whose last fetch averaged at least this many bytes per record is read
    /// with raw reads (the hub sends segment bytes with `sendfile`, this shard checks and
    /// re-encodes them: [`super::raw`]); smaller records are read the verifying way, where
    /// the hub's per-record work is cheaper than a second pass here. `u32::MAX` turns raw
    /// reads off. Default 2 KiB.
    pub raw_min_record_bytes: u32,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        Self {
            fetch_records: 16 * 1024,
            fetch_bytes: 1 << 20,
            raw_min_record_bytes: 2 << 10,
        }
    }
}

/// How a partition is fetched: what its last fetch taught.
#[derive(Debug, Clone, Copy, Default)]
struct Fetching {
    /// Use a raw read (the last fetch's records were large).
    raw: bool,
    /// Where the last raw read ended.
    hint: Option<RawHint>,
}

type Waiters = Vec<oneshot::Sender<Result<RecordBatch, LinkError>>>;
type FetchKey = (String, u32, u64);

struct Shared {
    link: StoreLink,
    cfg: ReaderConfig,
    cache: Mutex<ShardCache>,
    inflight: Mutex<HashMap<FetchKey, Waiters>>,
    fetches: AtomicU64,
    raw_fetches: AtomicU64,
    fetching: Mutex<HashMap<(String, u32), Fetching>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; recover the data if one ever did.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The shard's read path: one [`ShardCache`] and one [`StoreLink`] shared by every
/// subscription of the shard (clone it freely).
///
/// A read is served from the cache when it can be; otherwise one fetch of
/// [`ReaderConfig::fetch_records`] / [`fetch_bytes`](ReaderConfig::fetch_bytes) goes to the hub
/// and fills the cache. Concurrent misses at the same position share that one fetch, so N
/// subscribers at a partition's tail cost one hub read per append, not N.
#[derive(Clone)]
pub struct CachedReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CachedReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedReader")
            .field("link", &self.shared.link)
            .field("cfg", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

/// Removes the in-flight entry if the fetching call is cancelled; waiters then retry.
struct InflightGuard<'a> {
    shared: &'a Shared,
    key: Option<FetchKey>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            lock(&self.shared.inflight).remove(&k);
        }
    }
}

impl CachedReader {
    /// A reader over `link` with a cache bounded by `cache`.
    pub fn new(link: StoreLink, cache: CacheConfig, cfg: ReaderConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                link,
                cfg,
                cache: Mutex::new(ShardCache::new(cache)),
                inflight: Mutex::new(HashMap::new()),
                fetches: AtomicU64::new(0),
                raw_fetches: AtomicU64::new(0),
                fetching: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The underlying link (bounds, time lookups, tail watches).
    pub fn link(&self) -> &StoreLink {
        &self.shared.link
    }

    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        lock(&self.shared.cache).stats()
    }

    /// Reads sent to the hub so far (one per cache miss position, shared by concurrent
    /// readers).
    pub fn fetches(&self) -> u64 {
        self.shared.fetches.load(Relaxed)
    }

    /// Of [`fetches`](Self::fetches), those sent as raw reads.
    pub fn raw_fetches(&self) -> u64 {
        self.shared.raw_fetches.load(Relaxed)
    }

    /// Bytes the cache holds.
    pub fn cache_bytes(&self) -> usize {
        lock(&self.shared.cache).bytes()
    }

    /// Read-ahead while a reader catches up: when the newest cached batch of the partition
    /// was a full fetch (at least half of [`ReaderConfig::fetch_records`] or
    /// [`fetch_bytes`](ReaderConfig::fetch_bytes), so the log likely holds more; tail
    /// appends make small batches and never trigger it) and less than one fetch's worth is
    /// cached past the caller's new position, starts one background fetch at the end of the
    /// cached run unless it is already in flight. The caller's next read then finds its
    /// batch in the cache: the hub's read overlaps the shard's sending instead of following
    /// it. The background fetch does not read ahead itself, so the cache stays at most about
    /// two fetches ahead of the partition's readers.
    fn read_ahead(&self, stream: &str, partition: u32, got: &RecordBatch) {
        let sh = &*self.shared;
        if got.is_empty() || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Some(a) = lock(&sh.cache).ahead(stream, partition, got.next_offset()) else {
            return;
        };
        let full = a.last_records * 2 >= sh.cfg.fetch_records as usize
            || a.last_bytes * 2 >= sh.cfg.fetch_bytes as usize;
        if !full || a.bytes >= sh.cfg.fetch_bytes as usize {
            return;
        }
        let end = a.next;
        let key = (stream.to_owned(), partition, end);
        {
            let mut inflight = lock(&sh.inflight);
            if inflight.contains_key(&key) {
                return;
            }
            inflight.insert(key.clone(), Vec::new());
        }
        let reader = self.clone();
        tokio::spawn(async move {
            let sh = &*reader.shared;
            let guard = InflightGuard {
                shared: sh,
                key: Some(key),
            };
            let (stream, partition, from) = guard.key.clone().unwrap_or_default();
            let r = reader.fetch(guard, &stream, partition, from, 1, 0).await;
            drop(r);
        });
    }

    /// Reads like [`StoreLink::read`] (an empty batch at the tail), from the cache when
    /// possible.
    pub async fn read(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<RecordBatch, LinkError> {
        let (max_r, max_b) = (max_records.max(1) as usize, max_bytes as usize);
        let sh = &*self.shared;
        loop {
            let hit = lock(&sh.cache).get(stream, partition, from, max_r, max_b);
            if let Some(b) = hit {
                self.read_ahead(stream, partition, &b);
                return Ok(b);
            }
            let key = (stream.to_owned(), partition, from);
            let wait = {
                let mut inflight = lock(&sh.inflight);
                match inflight.get_mut(&key) {
                    Some(w) => {
                        let (tx, rx) = oneshot::channel();
                        w.push(tx);
                        Some(rx)
                    }
                    None => {
                        inflight.insert(key.clone(), Vec::new());
                        None
                    }
                }
            };
            if let Some(rx) = wait {
                match rx.await {
                    Ok(Ok(b)) => return Ok(b.slice(from, max_r, max_b).unwrap_or(b)),
                    Ok(Err(e)) => return Err(e),
                    // The fetching call was cancelled: try again.
                    Err(_) => continue,
                }
            }
            let guard = InflightGuard {
                shared: sh,
                key: Some(key),
            };
            let r = self
                .fetch(guard, stream, partition, from, max_records, max_bytes)
                .await;
            return r.map(|b| {
                let b = b.slice(from, max_r, max_b).unwrap_or(b);
                self.read_ahead(stream, partition, &b);
                b
            });
        }
    }

    /// One fetch through the link for the in-flight entry `guard` holds: fills the cache and
    /// answers the entry's waiters.
    async fn fetch(
        &self,
        mut guard: InflightGuard<'_>,
        stream: &str,
        partition: u32,
        from: u64,
        max_records: u32,
        max_bytes: u32,
    ) -> Result<RecordBatch, LinkError> {
        let sh = &*self.shared;
        sh.fetches.fetch_add(1, Relaxed);
        let (max_records, max_bytes) = (
            sh.cfg.fetch_records.max(max_records),
            sh.cfg.fetch_bytes.max(max_bytes),
        );
        let part = (stream.to_owned(), partition);
        let how = lock(&sh.fetching).get(&part).copied().unwrap_or_default();
        let r = if how.raw {
            sh.raw_fetches.fetch_add(1, Relaxed);
            sh.link
                .read_raw(stream, partition, from, max_records, max_bytes, how.hint)
                .await
        } else {
            sh.link
                .read(stream, partition, from, max_records, max_bytes)
                .await
                .map(|b| (b, None))
        };
        let r = r.map(|(b, hint)| {
            if let Some(records) = b.records() {
                let mean = records.body_len() / (records.count().max(1) as usize);
                let raw = mean >= sh.cfg.raw_min_record_bytes as usize;
                lock(&sh.fetching).insert(part, Fetching { raw, hint });
            }
            b
        });
        if let Ok(b) = &r {
            lock(&sh.cache).insert(stream, b.clone());
        }
        let waiters = guard
            .key
            .take()
            .and_then(|k| lock(&sh.inflight).remove(&k))
            .unwrap_or_default();
        for w in waiters {
            let _ = w.send(r.clone());
        }
        r
    }
}
