//! The embedded durable partitioned log: stream → partitions → records
//! `(offset, timestamp_ms, key, payload)`.
//!
//! ```text
//! append ─▶ Store ─▶ Stream ─▶ Partition (mutex) ─▶ active segment: one pwrite per batch
//!                                         │            (+ one fsync under Durability::Always)
//!            flush_due(now) ◀── driver ───┘ fsync of Interval partitions past their deadline
//! read ───▶ snapshot under the lock (file, byte range, holes) ─▶ pread outside the lock
//! ```
//!
//! # On disk
//!
//! ```text
//! <dir>/.lock                                   flock: one process per store directory
//! <dir>/<stream>/stream.toml                    StreamConfig (written last: the commit point)
//! <dir>/<stream>/<partition>/<base:020>.log     segments, named by their first offset
//! ```
//!
//! A segment is a sequence of frames `len u32 | crc32c u32 | offset u64 | ts u64 | key_len u32 |
//! key | payload` (little-endian). The sparse offset index (one entry per
//! [`StoreConfig::index_interval_bytes`]) lives in memory only and is rebuilt on open.
//!
//! # Idempotent producers
//!
//! [`Store::append_idempotent`] appends batches of a producer id exactly once: the first
//! record of each batch carries a **producer mark** (`producer, seq, count, written_ms`, in
//! the same write as the records), and each partition keeps, per producer, its last
//! [`PRODUCER_WINDOW`] batches (`seq` → offsets). A batch whose seq is already there is
//! answered with its original offsets and not written; the state changes only under the
//! partition lock right after the write, so it is exactly what the log holds. Recovery
//! rebuilds it from the marks, and cuts a last batch that was only partly written (a crash
//! mid-write) with the torn tail. Producers idle past [`IDLE_HORIZON_MS`] (or beyond
//! [`MAX_PRODUCERS`] per partition) are forgotten; so are those whose marks retention
//! deleted, at the next open.
//!
//! # Recovery
//!
//! [`Store::open`] reads every segment and verifies every CRC and offset:
//! - bytes after the last valid record that no valid record follows (a partial record, a bad
//!   CRC on the last record, garbage) are a **torn tail**: the file is truncated and later
//!   appends continue at the right offset ([`StoreMetrics::torn_tails_truncated`]);
//! - an undecodable region *followed by valid records* is **corruption**: it is logged with
//!   `tracing::error!`, counted in [`StoreMetrics::corrupt_records`], and never served. A read
//!   that reaches it returns the records before it; a read starting on it fails with
//!   [`StoreError::Corrupt`] naming the offset and `resume_at`, the next readable offset. The
//!   caller decides whether to skip.
//!
//! Recovery reads every byte of the store, so opening costs one sequential read of the data.
//!
//! # Concurrency
//!
//! [`Store`] is `Send + Sync`. Each partition has its own mutex, held for the write (and the
//! fsync under `Always`) of a batch; reads only take it to snapshot the byte range and read the
//! file outside it; `Interval` fsyncs run outside it too. Calls block on disk I/O: async code
//! calls them through `spawn_blocking` or a dedicated thread, and drives [`Store::flush_due`]
//! from a timer at [`Store::next_flush_deadline`].

mod codec;
mod config;
mod error;
mod index;
mod partition;
mod policy;
mod producers;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::watch;

pub use config::{
    Durability, MAX_PARTITIONS, MAX_STREAM_NAME, StoreConfig, StreamConfig, validate_stream_name,
};
pub use error::StoreError;
pub use producers::{BatchOutcome, IDLE_HORIZON_MS, MAX_PRODUCERS, WINDOW as PRODUCER_WINDOW};

pub(crate) use codec::{Decode, FrameRef, decode_frame};
pub use partition::RawRange;

/// What [`Store::raw_read`] found.
#[derive(Debug, Clone)]
pub enum RawRead {
    /// `from` is the partition's `next`: nothing to read yet.
    Tail,
    /// The bytes to send.
    Range(RawRange),
    /// No raw range starts here: read the verifying way.
    Unsuitable,
}

use partition::{MarkedBatch, PartitionId, PartitionLog, sync_dir};

/// A record to append. The offset is assigned by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewRecord<'a> {
    /// Producer timestamp, milliseconds since the Unix epoch (used by time lookups, segment
    /// age and retention by age; not required to be monotonic).
    pub timestamp_ms: u64,
    /// Record key (at most [`StoreConfig::max_key`] bytes).
    pub key: &'a [u8],
    /// Record payload (at most [`StoreConfig::max_payload`] bytes).
    pub payload: &'a [u8],
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Offset in its partition.
    pub offset: u64,
    /// Producer timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Record key.
    pub key: Vec<u8>,
    /// Record payload.
    pub payload: Vec<u8>,
}

/// One batch of an idempotent producer for [`Store::append_idempotent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch<'a, 'r> {
    /// The batch's sequence number (`Produce.seq`), above the previous batch's.
    pub seq: u64,
    /// Its records (at least one).
    pub records: &'a [NewRecord<'r>],
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Offset of the batch's first record (the partition's `next` offset if the batch was
    /// empty).
    pub base_offset: u64,
    /// Number of records appended.
    pub count: u32,
}

/// Receives the partition's `next` offset each time it grows.
pub type TailWatch = watch::Receiver<u64>;

/// Counters of the store, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Records appended since open.
    pub records_appended: AtomicU64,
    /// Encoded bytes appended since open.
    pub bytes_appended: AtomicU64,
    /// Records returned by reads.
    pub records_read: AtomicU64,
    /// Fsyncs of segment data.
    pub fsyncs: AtomicU64,
    /// Records found corrupt and never served: lost offsets found by recovery (at least one per
    /// corrupt region), plus damage detected by reads after open.
    pub corrupt_records: AtomicU64,
    /// Segments whose torn tail recovery truncated.
    pub torn_tails_truncated: AtomicU64,
    /// Valid records found by recovery.
    pub records_recovered: AtomicU64,
    /// Segments rolled.
    pub segments_rolled: AtomicU64,
    /// Segments deleted by retention.
    pub segments_deleted: AtomicU64,
    /// Idempotent batches found already appended (answered with their original offsets).
    pub duplicate_batches: AtomicU64,
}

struct Partition {
    log: Mutex<PartitionLog>,
    tail: watch::Sender<u64>,
    id: PartitionId,
}

impl Partition {
    fn lock(&self) -> Result<MutexGuard<'_, PartitionLog>, StoreError> {
        self.log.lock().map_err(|_| StoreError::Poisoned {
            stream: self.id.stream.clone(),
            partition: self.id.partition,
        })
    }
}

struct Stream {
    name: String,
    config: StreamConfig,
    partitions: Vec<Partition>,
}

impl Stream {
    fn partition(&self, partition: u32) -> Result<&Partition, StoreError> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| StoreError::NoSuchPartition {
                stream: self.name.clone(),
                partition,
                partitions: self.config.partitions,
            })
    }
}

/// The embedded log. See the [module documentation](self).
pub struct Store {
    cfg: StoreConfig,
    streams: RwLock<HashMap<String, Arc<Stream>>>,
    metrics: StoreMetrics,
    /// The flush driver's thread, unparked when an append arms a flush deadline.
    flush_waker: Mutex<Option<std::thread::Thread>>,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

const META_FILE: &str = "stream.toml";
const LOCK_FILE: &str = ".lock";

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Store {
    /// Opens the store in `cfg.dir` (creating it if needed), takes its lock, and recovers
    /// every stream found on disk.
    pub fn open(cfg: StoreConfig) -> Result<Self, StoreError> {
        cfg.validate()?;
        fs::create_dir_all(&cfg.dir).map_err(StoreError::io(&cfg.dir))?;
        let lock_path = cfg.dir.join(LOCK_FILE);
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::io(&lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            StoreError::Locked {
                path: lock_path.clone(),
            }
        })?;
        let metrics = StoreMetrics::default();
        let mut streams = HashMap::new();
        // Producers idle past the horizon are not rebuilt.
        let now_ms = ms_since_epoch(SystemTime::now());
        for entry in fs::read_dir(&cfg.dir).map_err(StoreError::io(&cfg.dir))? {
            let entry = entry.map_err(StoreError::io(&cfg.dir))?;
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(?path, "ignoring directory with a non-UTF-8 name");
                continue;
            };
            if validate_stream_name(&name).is_err() || !path.join(META_FILE).exists() {
                tracing::warn!(?path, "ignoring directory that is not a stream");
                continue;
            }
            let config = read_meta(&path.join(META_FILE))?;
            let stream = open_stream(&cfg, &name, config, &metrics, now_ms)?;
            streams.insert(name, Arc::new(stream));
        }
        Ok(Self {
            cfg,
            streams: RwLock::new(streams),
            metrics,
            flush_waker: Mutex::new(None),
            _lock: lock,
        })
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Creates a stream, or does nothing if it exists with the same configuration
    /// ([`StoreError::ConfigMismatch`] if it exists with another).
    pub fn create_stream(&self, name: &str, cfg: StreamConfig) -> Result<(), StoreError> {
        validate_stream_name(name)?;
        cfg.validate()?;
        let mut streams = self
            .streams
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = streams.get(name) {
            return if s.config == cfg {
                Ok(())
            } else {
                Err(StoreError::ConfigMismatch {
                    stream: name.to_owned(),
                })
            };
        }
        let dir = self.cfg.dir.join(name);
        fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        let now_ms = ms_since_epoch(SystemTime::now());
        let stream = open_stream(&self.cfg, name, cfg.clone(), &self.metrics, now_ms)?;
        // The metadata file is the commit point: a directory without it is ignored on open.
        write_meta(&dir, &cfg)?;
        sync_dir(&self.cfg.dir)?;
        streams.insert(name.to_owned(), Arc::new(stream));
        tracing::info!(stream = name, partitions = cfg.partitions, "created stream");
        Ok(())
    }

    /// Every stream and its configuration, sorted by name.
    pub fn streams(&self) -> Vec<(String, StreamConfig)> {
        let streams = self
            .streams
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = streams
            .values()
            .map(|s| (s.name.clone(), s.config.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn stream(&self, name: &str) -> Result<Arc<Stream>, StoreError> {
        let streams = self
            .streams
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        streams
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NoSuchStream {
                stream: name.to_owned(),
            })
    }

    fn all_streams(&self) -> Vec<Arc<Stream>> {
        let streams = self
            .streams
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        streams.values().cloned().collect()
    }

    /// Appends a batch to one partition with one write; when it returns the batch is durable
    /// per the stream's [`Durability`]. All records are size-checked before anything is
    /// written, so a rejected batch writes nothing.
    pub fn append(
        &self,
        stream: &str,
        partition: u32,
        records: &[NewRecord<'_>],
    ) -> Result<AppendResult, StoreError> {
        self.check_sizes(records)?;
        let count = u32::try_from(records.len()).map_err(|_| StoreError::InvalidConfig {
            reason: "a batch holds at most u32::MAX records".to_owned(),
        })?;
        let s = self.stream(stream)?;
        let p = s.partition(partition)?;
        let mut log = p.lock()?;
        if records.is_empty() {
            return Ok(AppendResult {
                base_offset: log.bounds().1,
                count: 0,
            });
        }
        let was_armed = log.flush_deadline().is_some();
        let (base_offset, next) =
            log.append(records, &self.cfg, s.config.durability, &self.metrics)?;
        let armed = !was_armed && log.flush_deadline().is_some();
        drop(log);
        p.tail.send_replace(next);
        if armed {
            // A new interval deadline: the flush driver may be asleep without one.
            self.wake_flusher();
        }
        Ok(AppendResult { base_offset, count })
    }

    /// Appends the batches of idempotent `producer` to one partition with one write (like
    /// [`append`](Self::append)), skipping those already appended: each batch is answered
    /// [`BatchOutcome::Appended`], [`BatchOutcome::Duplicate`] (its original offsets) or
    /// [`BatchOutcome::OutOfOrder`]. `now_ms` (hub clock, ms since the Unix epoch) dates the
    /// producer's activity for the idle horizon. The `Err` is for the call (no such partition,
    /// a record too large, an empty batch: nothing appended); a failed write comes back
    /// beside the answers, with the batches it carried [`BatchOutcome::Failed`].
    pub fn append_idempotent(
        &self,
        stream: &str,
        partition: u32,
        producer: u64,
        batches: &[ProducerBatch<'_, '_>],
        now_ms: u64,
    ) -> Result<(Vec<BatchOutcome>, Option<StoreError>), StoreError> {
        let mut records = Vec::new();
        let mut marked = Vec::with_capacity(batches.len());
        for b in batches {
            if b.records.is_empty() {
                return Err(StoreError::InvalidConfig {
                    reason: "an idempotent batch holds at least one record".to_owned(),
                });
            }
            self.check_sizes(b.records)?;
            let start = records.len();
            records.extend_from_slice(b.records);
            marked.push(MarkedBatch {
                seq: b.seq,
                start,
                end: records.len(),
            });
        }
        u32::try_from(records.len()).map_err(|_| StoreError::InvalidConfig {
            reason: "a batch holds at most u32::MAX records".to_owned(),
        })?;
        let s = self.stream(stream)?;
        let p = s.partition(partition)?;
        let mut log = p.lock()?;
        let was_armed = log.flush_deadline().is_some();
        let (outcomes, err) = log.append_idempotent(
            producer,
            &marked,
            &records,
            &self.cfg,
            s.config.durability,
            &self.metrics,
            now_ms,
        );
        let next = log.bounds().1;
        let armed = !was_armed && log.flush_deadline().is_some();
        drop(log);
        let dups = outcomes
            .iter()
            .filter(|o| matches!(o, BatchOutcome::Duplicate { .. }))
            .count();
        if dups > 0 {
            self.metrics
                .duplicate_batches
                .fetch_add(dups as u64, Relaxed);
            tracing::debug!(
                stream,
                partition,
                producer,
                dups,
                "re-sent batches not appended again"
            );
        }
        if outcomes
            .iter()
            .any(|o| matches!(o, BatchOutcome::Appended { .. }))
        {
            p.tail.send_replace(next);
        }
        if armed {
            self.wake_flusher();
        }
        Ok((outcomes, err))
    }

    fn check_sizes(&self, records: &[NewRecord<'_>]) -> Result<(), StoreError> {
        for r in records {
            if r.payload.len() > self.cfg.max_payload {
                return Err(StoreError::PayloadTooLarge {
                    len: r.payload.len(),
                    max: self.cfg.max_payload,
                });
            }
            if r.key.len() > self.cfg.max_key {
                return Err(StoreError::KeyTooLarge {
                    len: r.key.len(),
                    max: self.cfg.max_key,
                });
            }
        }
        Ok(())
    }

    /// Registers the thread that runs [`flush_due`](Self::flush_due) at
    /// [`next_flush_deadline`](Self::next_flush_deadline): it is unparked whenever an append
    /// arms a new deadline, so it can sleep (`park_timeout`) while nothing is pending.
    pub fn set_flush_waker(&self, driver: std::thread::Thread) {
        *self
            .flush_waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(driver);
    }

    fn wake_flusher(&self) {
        if let Some(t) = self
            .flush_waker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            t.unpark();
        }
    }

    /// Reads up to `max_records` records from `from_offset` on, stopping before the record that
    /// would take the encoded size past `max_bytes` (but always returning at least one record
    /// if one is available). `from_offset == next` returns an empty vector; outside
    /// `[earliest, next]` is [`StoreError::OffsetOutOfRange`]. Never returns a corrupt record:
    /// see the [module documentation](self) for what a read near one returns.
    pub fn read(
        &self,
        stream: &str,
        partition: u32,
        from_offset: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        self.read_with(
            stream,
            partition,
            from_offset,
            max_records,
            max_bytes,
            |fr| {
                out.push(Record {
                    offset: fr.offset,
                    timestamp_ms: fr.timestamp_ms,
                    key: fr.key.to_vec(),
                    payload: fr.payload.to_vec(),
                });
            },
        )?;
        Ok(out)
    }

    /// [`read`](Self::read) without materialising records: each record is handed to `visit`
    /// borrowed from the read buffer (CRC already verified), so a caller can encode it
    /// straight into its own format. Returns the number of records visited (0 at the tail).
    pub(crate) fn read_with(
        &self,
        stream: &str,
        partition: u32,
        from_offset: u64,
        max_records: usize,
        max_bytes: usize,
        visit: impl FnMut(&FrameRef<'_>),
    ) -> Result<usize, StoreError> {
        let s = self.stream(stream)?;
        let p = s.partition(partition)?;
        let plan = {
            let log = p.lock()?;
            if !log.readable_from(from_offset)? {
                return Ok(0);
            }
            log.read_plan(from_offset)
        };
        partition::visit_records(
            &plan,
            from_offset,
            max_records,
            max_bytes,
            &p.id,
            &self.metrics,
            visit,
        )
    }

    /// Where the stored frames of records `>= from` lie, for a reader that sends the file's
    /// bytes as they are (the store link's raw read) instead of records. The range starts on
    /// a frame boundary at or before `from` (`hint`, a `(segment base, byte position)` a
    /// previous raw read ended on, or the sparse index entry), holds at least one whole frame,
    /// about `max_bytes` and at most `max_len` bytes, stays inside one segment and stops
    /// before any corrupt region; it may end inside a frame. **Nothing in it is verified**: the
    /// reader checks every CRC and offset and falls back to [`read`](Self::read) on anything
    /// unexpected. [`RawRead::Unsuitable`] when no such range starts here (a corrupt region,
    /// a frame larger than `max_len`); [`RawRead::Tail`] at `from == next`; the errors of
    /// [`read`](Self::read) otherwise.
    pub fn raw_read(
        &self,
        stream: &str,
        partition: u32,
        from: u64,
        hint: Option<(u64, u64)>,
        max_bytes: usize,
        max_len: usize,
    ) -> Result<RawRead, StoreError> {
        let s = self.stream(stream)?;
        let p = s.partition(partition)?;
        let snap = {
            let log = p.lock()?;
            if !log.readable_from(from)? {
                return Ok(RawRead::Tail);
            }
            log.segment_plan(from)
        };
        Ok(
            match partition::raw_range(&snap, hint, max_bytes, max_len)? {
                Some(r) => RawRead::Range(r),
                None => RawRead::Unsuitable,
            },
        )
    }

    /// `(earliest, next)`: the first stored offset and the offset the next record will get.
    pub fn bounds(&self, stream: &str, partition: u32) -> Result<(u64, u64), StoreError> {
        let s = self.stream(stream)?;
        Ok(s.partition(partition)?.lock()?.bounds())
    }

    /// The first offset whose record has a timestamp `>= ts_ms`, or `next` if there is none.
    pub fn offset_for_timestamp(
        &self,
        stream: &str,
        partition: u32,
        ts_ms: u64,
    ) -> Result<u64, StoreError> {
        let s = self.stream(stream)?;
        let p = s.partition(partition)?;
        let (plan, next) = {
            let log = p.lock()?;
            (log.timestamp_plan(ts_ms), log.bounds().1)
        };
        let Some(snap) = plan else {
            return Ok(next);
        };
        Ok(partition::find_timestamp(&snap, ts_ms)?.unwrap_or(snap.next_offset()))
    }

    /// Fsyncs every `Interval` partition whose deadline is at or before `now`. Call it from a
    /// driver thread or task at [`next_flush_deadline`](Self::next_flush_deadline). Every due
    /// partition is attempted; the first error is returned (a failed one is retried on the
    /// next call).
    pub fn flush_due(&self, now: Instant) -> Result<(), StoreError> {
        let mut first_err = None;
        for s in self.all_streams() {
            if !matches!(s.config.durability, Durability::Interval(_)) {
                continue;
            }
            for p in &s.partitions {
                let Some((file, path)) = p.lock()?.begin_flush(now) else {
                    continue;
                };
                match crate::obs::fsync(&file) {
                    Ok(()) => {
                        self.metrics.fsyncs.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(?path, error = %e, "interval fsync failed");
                        p.lock()?.flush_failed(now);
                        first_err.get_or_insert(StoreError::Io {
                            path: path.to_path_buf(),
                            source: e,
                        });
                    }
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The earliest deadline of pending `Interval` data, `None` if nothing is pending. A
    /// driver that sleeps while this is `None` must wake at least every interval (or after
    /// each append) to see new deadlines.
    pub fn next_flush_deadline(&self) -> Option<Instant> {
        self.all_streams()
            .iter()
            .filter(|s| matches!(s.config.durability, Durability::Interval(_)))
            .flat_map(|s| s.partitions.iter())
            .filter_map(|p| p.lock().ok().and_then(|log| log.flush_deadline()))
            .min()
    }

    /// Fsyncs the active segment of every partition of every stream (for shutdown).
    pub fn sync_all(&self) -> Result<(), StoreError> {
        for s in self.all_streams() {
            for p in &s.partitions {
                let (file, path) = p.lock()?.active_file();
                file.sync_data().map_err(StoreError::io(&*path))?;
                self.metrics.fsyncs.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    /// Deletes whole old segments per each stream's retention, judging age at `now`; returns
    /// the number of segments deleted. Also forgets producers idle past [`IDLE_HORIZON_MS`].
    pub fn enforce_retention(&self, now: SystemTime) -> Result<u64, StoreError> {
        let now_ms = ms_since_epoch(now);
        let mut deleted = 0;
        for s in self.all_streams() {
            for p in &s.partitions {
                p.lock()?.expire_producers(now_ms);
            }
            let c = &s.config;
            if c.retention_bytes.is_none() && c.retention_age.is_none() {
                continue;
            }
            for p in &s.partitions {
                deleted += p.lock()?.enforce_retention(
                    c.retention_bytes,
                    c.retention_age,
                    now_ms,
                    c.durability,
                    &self.metrics,
                )?;
            }
        }
        Ok(deleted)
    }

    /// Watches the partition's `next` offset: the receiver sees each new value after an append
    /// returns (usable from sync code via `has_changed`/`borrow` and from async via
    /// `changed().await`).
    pub fn subscribe_tail(&self, stream: &str, partition: u32) -> Result<TailWatch, StoreError> {
        let s = self.stream(stream)?;
        Ok(s.partition(partition)?.tail.subscribe())
    }

    /// The store's counters.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
}

fn open_stream(
    cfg: &StoreConfig,
    name: &str,
    config: StreamConfig,
    metrics: &StoreMetrics,
    now_ms: u64,
) -> Result<Stream, StoreError> {
    let dir = cfg.dir.join(name);
    let mut partitions = Vec::with_capacity(config.partitions as usize);
    for partition in 0..config.partitions {
        let id = PartitionId {
            stream: name.to_owned(),
            partition,
        };
        let log = PartitionLog::open(
            id.clone(),
            dir.join(partition.to_string()),
            cfg,
            metrics,
            now_ms,
        )?;
        let (tail, _) = watch::channel(log.bounds().1);
        partitions.push(Partition {
            log: Mutex::new(log),
            tail,
            id,
        });
    }
    Ok(Stream {
        name: name.to_owned(),
        config,
        partitions,
    })
}

fn read_meta(path: &Path) -> Result<StreamConfig, StoreError> {
    let file = File::open(path).map_err(StoreError::io(path))?;
    let mut text = String::new();
    file.take(config::MAX_META_LEN + 1)
        .read_to_string(&mut text)
        .map_err(StoreError::io(path))?;
    if text.len() as u64 > config::MAX_META_LEN {
        return Err(StoreError::Metadata {
            path: path.to_owned(),
            reason: "file too large".to_owned(),
        });
    }
    config::decode_meta(&text).map_err(|reason| StoreError::Metadata {
        path: path.to_owned(),
        reason,
    })
}

fn write_meta(dir: &Path, cfg: &StreamConfig) -> Result<(), StoreError> {
    let tmp: PathBuf = dir.join(format!("{META_FILE}.tmp"));
    let path = dir.join(META_FILE);
    let mut f = File::create(&tmp).map_err(StoreError::io(&tmp))?;
    f.write_all(config::encode_meta(cfg).as_bytes())
        .map_err(StoreError::io(&tmp))?;
    f.sync_all().map_err(StoreError::io(&tmp))?;
    fs::rename(&tmp, &path).map_err(StoreError::io(&path))?;
    sync_dir(dir)
}

/// Fuzzing and tests: appends one record encoded as in a segment file (for seed corpora).
#[cfg(any(test, fuzzing, feature = "fuzzing"))]
pub fn fuzz_encode_record(out: &mut Vec<u8>, offset: u64, ts_ms: u64, key: &[u8], payload: &[u8]) {
    codec::encode_frame(out, offset, ts_ms, key, payload);
}

/// Fuzzing and tests: appends one record carrying a producer mark (the first record of an
/// idempotent batch of `count` records) as in a segment file.
#[cfg(any(test, fuzzing, feature = "fuzzing"))]
pub fn fuzz_encode_marked_record(
    out: &mut Vec<u8>,
    offset: u64,
    (producer, seq, count): (u64, u64, u32),
    payload: &[u8],
) {
    let mark = codec::ProducerMark {
        producer,
        seq,
        count,
        written_ms: 1_700_000_000_000,
    };
    codec::encode_marked(out, offset, 1_700_000_000_000, b"k", payload, Some(&mark));
}

/// Fuzzing entry (feature `fuzzing` or `cfg(fuzzing)`): runs the recovery scan over arbitrary
/// segment bytes and checks that what it reports stays within them. The first byte picks the
/// segment's base offset (0, or near `u64::MAX` to probe overflow); the rest is the segment.
#[cfg(any(fuzzing, feature = "fuzzing"))]
pub fn fuzz_scan_segment(data: &[u8]) {
    let Some((&sel, seg)) = data.split_first() else {
        return;
    };
    let base = if sel & 1 == 0 {
        0
    } else {
        u64::MAX - u64::from(sel)
    };
    let scan = codec::scan_segment(seg, base, 64);
    let len = seg.len() as u64;
    assert!(scan.valid_len <= len, "valid_len past the end");
    assert!(scan.next_offset >= base, "next offset below the base");
    assert!(scan.records <= len, "more records than bytes");
    for h in &scan.holes {
        assert!(
            h.pos <= h.end_pos && h.end_pos <= scan.valid_len,
            "hole outside the segment"
        );
        assert!(h.first_offset <= h.next_offset, "hole offsets reversed");
    }
    for (m, at) in &scan.marks {
        assert!(m.count >= 1, "a mark of no record");
        assert!(
            *at >= base && at.saturating_add(u64::from(m.count)) <= scan.next_offset,
            "a marked batch outside the valid records"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    fn recs<'a>(payloads: &[&'a [u8]]) -> Vec<NewRecord<'a>> {
        payloads
            .iter()
            .map(|p| NewRecord {
                timestamp_ms: 1,
                key: b"k",
                payload: p,
            })
            .collect()
    }

    fn payloads(store: &Store) -> Vec<Vec<u8>> {
        let recs = store.read("s", 0, 0, 1000, 1 << 20).unwrap();
        recs.into_iter().map(|r| r.payload).collect()
    }

    #[test]
    fn idempotent_appends_survive_reopen_and_a_cut_last_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        store.create_stream("s", StreamConfig::default()).unwrap();
        let (a, b, c) = (
            recs(&[b"a1", b"a2"]),
            recs(&[b"b1"]),
            recs(&[b"c1", b"c2", b"c3"]),
        );
        let batch = |seq, records| ProducerBatch { seq, records };
        let now = ms_since_epoch(SystemTime::now());
        let (out, err) = store
            .append_idempotent("s", 0, 7, &[batch(1, &a), batch(3, &b)], now + 10)
            .unwrap();
        assert!(err.is_none());
        let appended = |base_offset, count| BatchOutcome::Appended { base_offset, count };
        let dup = |base_offset, count| BatchOutcome::Duplicate { base_offset, count };
        assert_eq!(out, vec![appended(0, 2), appended(2, 1)]);
        // Another producer's plain append in between.
        store.append("s", 0, &recs(&[b"x"])).unwrap();
        // Re-sent 1 and 3 (original offsets), a refused 2 (out of order), then new 4.
        let (out, _) = store
            .append_idempotent(
                "s",
                0,
                7,
                &[batch(1, &a), batch(2, &b), batch(3, &b), batch(4, &c)],
                11,
            )
            .unwrap();
        assert_eq!(
            out,
            vec![
                dup(0, 2),
                BatchOutcome::OutOfOrder { last_seq: 3 },
                dup(2, 1),
                appended(4, 3)
            ]
        );
        assert_eq!(
            payloads(&store),
            [&b"a1"[..], b"a2", b"b1", b"x", b"c1", b"c2", b"c3"]
        );
        drop(store);

        // Reopen: the state comes back from the marks.
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let (out, _) = store
            .append_idempotent("s", 0, 7, &[batch(3, &b), batch(4, &c)], now + 12)
            .unwrap();
        assert_eq!(out, vec![dup(2, 1), dup(4, 3)]);
        assert_eq!(store.metrics().duplicate_batches.load(Relaxed), 2);
        drop(store);

        // A crash in the middle of writing batch 4: its last record is cut. Recovery drops the
        // whole batch, so its re-send is appended (once).
        let seg = dir.path().join("s/0").join(format!("{:020}.log", 0));
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        assert_eq!(store.bounds("s", 0).unwrap(), (0, 4));
        assert_eq!(store.metrics().torn_tails_truncated.load(Relaxed), 1);
        let (out, _) = store
            .append_idempotent("s", 0, 7, &[batch(3, &b), batch(4, &c)], now + 13)
            .unwrap();
        assert_eq!(out, vec![dup(2, 1), appended(4, 3)]);
        assert_eq!(
            payloads(&store),
            [&b"a1"[..], b"a2", b"b1", b"x", b"c1", b"c2", b"c3"]
        );
        assert!(
            store
                .append_idempotent("s", 0, 7, &[batch(5, &[])], now + 14)
                .is_err()
        );
    }

    #[test]
    fn idle_producers_are_not_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        store.create_stream("s", StreamConfig::default()).unwrap();
        let a = recs(&[b"a"]);
        // Written "long ago" (hub clock 1 ms after the epoch).
        let batch = [ProducerBatch {
            seq: 1,
            records: &a,
        }];
        store.append_idempotent("s", 0, 7, &batch, 1).unwrap();
        drop(store);
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let (out, _) = store.append_idempotent("s", 0, 7, &batch, 2).unwrap();
        assert!(matches!(
            out[0],
            BatchOutcome::Appended { base_offset: 1, .. }
        ));
    }

    #[test]
    fn store_is_send_sync() {
        assert_send_sync::<Store>();
        assert_send_sync::<StoreMetrics>();
    }
}
