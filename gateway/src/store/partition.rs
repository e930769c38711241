//! One partition's segment files: recovery, appends, rolling, retention, and the byte-range
//! reads. The thin I/O layer over [`codec`](super::codec), [`index`](super::index) and
//! [`policy`](super::policy).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::codec::{self, Decode, FrameRef, Hole, ProducerMark};
use super::config::{Durability, StoreConfig};
use super::error::StoreError;
use super::index::SparseIndex;
use super::policy::{self, FlushClock, RetentionPlan, SegmentInfo};
use super::producers::{BatchOutcome, IDLE_HORIZON_MS, ProducerTable, SeqCheck};
use super::{NewRecord, StoreMetrics};

const SEGMENT_SUFFIX: &str = ".log";

fn segment_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}{SEGMENT_SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Fsyncs a directory so that created, renamed or deleted entries are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir))
}

struct Segment {
    base_offset: u64,
    next_offset: u64,
    path: Arc<Path>,
    file: Arc<File>,
    size: u64,
    index: SparseIndex,
    holes: Arc<[Hole]>,
}

impl Segment {
    fn create(dir: &Path, base_offset: u64, index_interval: u32) -> Result<Self, StoreError> {
        let path = segment_path(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(StoreError::io(&path))?;
        Ok(Self {
            base_offset,
            next_offset: base_offset,
            path: path.into(),
            file: Arc::new(file),
            size: 0,
            index: SparseIndex::new(index_interval),
            holes: Arc::from(Vec::new()),
        })
    }

    fn info(&self) -> SegmentInfo {
        SegmentInfo {
            size: self.size,
            max_ts: self.index.max_ts(),
        }
    }

    fn snapshot(&self, start_pos: u64) -> SegmentSnapshot {
        SegmentSnapshot {
            path: self.path.clone(),
            file: self.file.clone(),
            base_offset: self.base_offset,
            next_offset: self.next_offset,
            end: self.size,
            start_pos,
            holes: self.holes.clone(),
        }
    }
}

/// Where the partition is, for error messages and metrics.
#[derive(Debug, Clone)]
pub(crate) struct PartitionId {
    pub(crate) stream: String,
    pub(crate) partition: u32,
}

/// The mutable state of one partition, behind its mutex.
pub(crate) struct PartitionLog {
    id: PartitionId,
    dir: PathBuf,
    index_interval: u32,
    /// Oldest first; never empty; the last one is the active segment.
    segments: Vec<Segment>,
    flush: FlushClock,
    buf: Vec<u8>,
    poisoned: bool,
    /// Dedup state of the idempotent producers, consistent with the producer marks written.
    producers: ProducerTable,
}

/// One idempotent batch to append: `records[start..end]` of the call, for `producer`/`seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MarkedBatch {
    pub(crate) seq: u64,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

impl PartitionLog {
    /// Opens (creating if needed) the partition in `dir`, recovering every segment: verifies
    /// every CRC, truncates a torn tail, reports corrupt regions, rebuilds the indexes and
    /// the producers' dedup state (forgetting producers idle at `now_ms`).
    pub(crate) fn open(
        id: PartitionId,
        dir: PathBuf,
        cfg: &StoreConfig,
        metrics: &StoreMetrics,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let entry = entry.map_err(StoreError::io(&dir))?;
            match entry.file_name().to_str().and_then(parse_segment_name) {
                Some(base) => bases.push(base),
                None => {
                    tracing::warn!(path = ?entry.path(), "ignoring unexpected file in partition directory")
                }
            }
        }
        bases.sort_unstable();
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len().max(1));
        let mut producers = ProducerTable::default();
        for base in bases {
            let (seg, marks) = recover_segment(&id, &dir, base, cfg.index_interval_bytes, metrics)?;
            for (m, at) in marks {
                producers.record(m.producer, m.seq, at, m.count, m.written_ms);
            }
            if let Some(prev) = segments.last() {
                if seg.base_offset < prev.next_offset {
                    tracing::error!(path = ?seg.path, prev_next = prev.next_offset, "segment overlaps the previous one");
                    return Err(StoreError::Corrupt {
                        path: seg.path.to_path_buf(),
                        offset: seg.base_offset,
                        resume_at: None,
                    });
                }
                if seg.base_offset > prev.next_offset {
                    let lost = seg.base_offset - prev.next_offset;
                    tracing::error!(
                        stream = %id.stream, partition = id.partition, path = ?seg.path,
                        first = prev.next_offset, next = seg.base_offset,
                        "offsets missing between segments; they will never be served"
                    );
                    metrics.corrupt_records.fetch_add(lost, Relaxed);
                }
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            segments.push(Segment::create(&dir, 0, cfg.index_interval_bytes)?);
            sync_dir(&dir)?;
        }
        Ok(Self {
            id,
            dir,
            index_interval: cfg.index_interval_bytes,
            segments,
            flush: FlushClock::default(),
            buf: Vec::new(),
            poisoned: false,
            producers: {
                producers.expire(now_ms, IDLE_HORIZON_MS);
                producers
            },
        })
    }

    /// Forgets producers idle past the horizon at `now_ms`; returns how many.
    pub(crate) fn expire_producers(&mut self, now_ms: u64) -> usize {
        self.producers.expire(now_ms, IDLE_HORIZON_MS)
    }

    /// Appends the batches of `producer` that its dedup state does not hold, in one write
    /// (one fsync under `Always`), each first record carrying its producer mark; answers
    /// every batch. `batches` cover `records` in order, with increasing seqs. On a write
    /// error nothing was appended and nothing recorded (those batches are `Failed`); the
    /// duplicates found stay answered, so the error comes back beside the answers.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append_idempotent(
        &mut self,
        producer: u64,
        batches: &[MarkedBatch],
        records: &[NewRecord<'_>],
        cfg: &StoreConfig,
        durability: Durability,
        metrics: &StoreMetrics,
        now_ms: u64,
    ) -> (Vec<BatchOutcome>, Option<StoreError>) {
        let mut out = Vec::with_capacity(batches.len());
        let mut recs = Vec::new();
        let mut marks = Vec::new();
        for b in batches {
            out.push(match self.producers.check(producer, b.seq) {
                SeqCheck::Append => {
                    marks.push((
                        recs.len(),
                        ProducerMark {
                            producer,
                            seq: b.seq,
                            // The store bounds a call to u32::MAX records.
                            count: u32::try_from(b.end - b.start).unwrap_or(u32::MAX),
                            written_ms: now_ms,
                        },
                    ));
                    recs.extend_from_slice(&records[b.start..b.end]);
                    // Filled in below once written.
                    BatchOutcome::Failed
                }
                SeqCheck::Duplicate { base_offset, count } => {
                    BatchOutcome::Duplicate { base_offset, count }
                }
                SeqCheck::OutOfOrder { last_seq } => BatchOutcome::OutOfOrder { last_seq },
            });
        }
        if recs.is_empty() {
            return (out, None);
        }
        let base = match self.append_marked(&recs, &marks, cfg, durability, metrics) {
            Ok((base, _)) => base,
            Err(e) => return (out, Some(e)),
        };
        let mut m = marks.iter();
        for o in &mut out {
            if *o != BatchOutcome::Failed {
                continue;
            }
            let Some((at, mark)) = m.next() else { break };
            let base_offset = base + *at as u64;
            self.producers
                .record(producer, mark.seq, base_offset, mark.count, now_ms);
            *o = BatchOutcome::Appended {
                base_offset,
                count: mark.count,
            };
        }
        (out, None)
    }

    fn active(&self) -> &Segment {
        // Invariant: `segments` is never empty (open creates one, retention rolls before
        // deleting the active one).
        self.segments
            .last()
            .expect("partition has an active segment")
    }

    /// `(earliest, next)` offsets.
    pub(crate) fn bounds(&self) -> (u64, u64) {
        (self.segments[0].base_offset, self.active().next_offset)
    }

    /// Starts a new active segment at the current `next` offset.
    fn roll(&mut self, durability: Durability, metrics: &StoreMetrics) -> Result<(), StoreError> {
        let active = self.active();
        if matches!(durability, Durability::Interval(_)) && active.size > 0 {
            crate::obs::fsync(&active.file).map_err(StoreError::io(&*active.path))?;
            metrics.fsyncs.fetch_add(1, Relaxed);
        }
        let seg = Segment::create(&self.dir, active.next_offset, self.index_interval)?;
        if durability != Durability::Never {
            sync_dir(&self.dir)?;
        }
        self.segments.push(seg);
        metrics.segments_rolled.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Appends a non-empty, size-checked batch with one write (and, under `Always`, one
    /// fsync). Returns `(base_offset, next_offset)`.
    pub(crate) fn append(
        &mut self,
        records: &[NewRecord<'_>],
        cfg: &StoreConfig,
        durability: Durability,
        metrics: &StoreMetrics,
    ) -> Result<(u64, u64), StoreError> {
        self.append_marked(records, &[], cfg, durability, metrics)
    }

    /// [`append`](Self::append) with producer marks on the records at the given indexes
    /// (increasing).
    fn append_marked(
        &mut self,
        records: &[NewRecord<'_>],
        marks: &[(usize, ProducerMark)],
        cfg: &StoreConfig,
        durability: Durability,
        metrics: &StoreMetrics,
    ) -> Result<(u64, u64), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                stream: self.id.stream.clone(),
                partition: self.id.partition,
            });
        }
        let batch_bytes: u64 = records
            .iter()
            .map(|r| codec::frame_len(r.key.len(), r.payload.len()) as u64)
            .sum::<u64>()
            + (marks.len() * codec::MARK_LEN) as u64;
        let active = self.active();
        if policy::should_roll(
            active.size,
            active.index.first_ts(),
            batch_bytes,
            records[0].timestamp_ms,
            cfg.segment_bytes,
            cfg.segment_age,
        ) {
            self.roll(durability, metrics)?;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let base = self.active().next_offset;
        let mut lens = Vec::with_capacity(records.len());
        let mut next_mark = marks.iter().peekable();
        for (i, r) in records.iter().enumerate() {
            let mark = next_mark.next_if(|(at, _)| *at == i).map(|(_, m)| m);
            let start = buf.len();
            codec::encode_marked(
                &mut buf,
                base + i as u64,
                r.timestamp_ms,
                r.key,
                r.payload,
                mark,
            );
            lens.push((buf.len() - start) as u64);
        }
        let result = self.write_batch(&buf, records, &lens, durability, metrics);
        // Keep the buffer for the next batch unless a huge batch made it huge.
        if buf.capacity() <= 4 << 20 {
            self.buf = buf;
        }
        result?;
        Ok((base, self.active().next_offset))
    }

    fn write_batch(
        &mut self,
        buf: &[u8],
        records: &[NewRecord<'_>],
        lens: &[u64],
        durability: Durability,
        metrics: &StoreMetrics,
    ) -> Result<(), StoreError> {
        let (file, size, path) = {
            let a = self.active();
            (a.file.clone(), a.size, a.path.clone())
        };
        if let Err(e) = file.write_all_at(buf, size) {
            // Leave no partial frame behind: recovery could otherwise take it for a record.
            if file.set_len(size).is_err() {
                self.poisoned = true;
            }
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            });
        }
        if durability == Durability::Always {
            if let Err(e) = crate::obs::fsync(&file) {
                // After a failed fsync the page cache state is unknown: refuse further writes.
                self.poisoned = true;
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source: e,
                });
            }
            metrics.fsyncs.fetch_add(1, Relaxed);
        }
        // Invariant: `segments` is never empty.
        let seg = self
            .segments
            .last_mut()
            .expect("partition has an active segment");
        let mut pos = seg.size;
        for (i, (r, &len)) in records.iter().zip(lens).enumerate() {
            seg.index
                .on_append(seg.next_offset + i as u64, pos, len, r.timestamp_ms);
            pos += len;
        }
        seg.size = pos;
        seg.next_offset += records.len() as u64;
        if let Durability::Interval(every) = durability {
            self.flush.on_write(Instant::now(), every);
        }
        metrics
            .records_appended
            .fetch_add(records.len() as u64, Relaxed);
        metrics.bytes_appended.fetch_add(buf.len() as u64, Relaxed);
        Ok(())
    }

    /// When pending data must be fsynced (`Interval` streams only).
    pub(crate) fn flush_deadline(&self) -> Option<Instant> {
        self.flush.deadline()
    }

    /// If a flush is due at `now`, disarms the clock and returns the file to fsync (outside
    /// the lock).
    pub(crate) fn begin_flush(&mut self, now: Instant) -> Option<(Arc<File>, Arc<Path>)> {
        if !self.flush.due(now) {
            return None;
        }
        self.flush.on_flush_started();
        let a = self.active();
        Some((a.file.clone(), a.path.clone()))
    }

    /// The fsync started by [`begin_flush`](Self::begin_flush) failed: retry soon.
    pub(crate) fn flush_failed(&mut self, now: Instant) {
        self.flush.on_flush_failed(now);
    }

    /// The active segment's file, to fsync it.
    pub(crate) fn active_file(&self) -> (Arc<File>, Arc<Path>) {
        (self.active().file.clone(), self.active().path.clone())
    }

    /// Applies the retention policy; returns the number of segments deleted.
    pub(crate) fn enforce_retention(
        &mut self,
        retention_bytes: Option<u64>,
        retention_age: Option<std::time::Duration>,
        now_ms: u64,
        durability: Durability,
        metrics: &StoreMetrics,
    ) -> Result<u64, StoreError> {
        let infos: Vec<SegmentInfo> = self.segments.iter().map(Segment::info).collect();
        let RetentionPlan {
            delete,
            roll_active,
        } = policy::plan_retention(&infos, retention_bytes, retention_age, now_ms);
        if delete == 0 {
            return Ok(0);
        }
        if roll_active {
            self.roll(durability, metrics)?;
        }
        for seg in self.segments.drain(..delete) {
            // Readers holding the file keep reading it; the name goes now.
            fs::remove_file(&seg.path).map_err(StoreError::io(&*seg.path))?;
            tracing::debug!(path = ?seg.path, "retention deleted segment");
            metrics.segments_deleted.fetch_add(1, Relaxed);
        }
        if durability != Durability::Never {
            sync_dir(&self.dir)?;
        }
        Ok(delete as u64)
    }

    /// Whether a read may start at `from`: [`StoreError::OffsetOutOfRange`] outside
    /// `[earliest, next]`, `false` at `next` (nothing to read yet), `true` below it.
    pub(crate) fn readable_from(&self, from: u64) -> Result<bool, StoreError> {
        let (earliest, next) = self.bounds();
        if from < earliest || from > next {
            return Err(StoreError::OffsetOutOfRange {
                stream: self.id.stream.clone(),
                partition: self.id.partition,
                requested: from,
                earliest,
                next,
            });
        }
        Ok(from < next)
    }

    /// Snapshots what a read from `from` needs, so the bytes are read outside the lock.
    /// The caller has checked `earliest <= from < next`.
    pub(crate) fn read_plan(&self, from: u64) -> Vec<SegmentSnapshot> {
        let i = self
            .segments
            .partition_point(|s| s.base_offset <= from)
            .saturating_sub(1);
        let seg = &self.segments[i];
        let start = seg.index.lookup_offset(from).map_or(0, |e| e.pos);
        let mut plan = Vec::with_capacity(self.segments.len() - i);
        plan.push(seg.snapshot(start));
        plan.extend(self.segments[i + 1..].iter().map(|s| s.snapshot(0)));
        plan
    }

    /// Snapshot of the segment holding `from`, starting at the sparse index entry at or before
    /// it (the first element of [`read_plan`](Self::read_plan), without the later segments).
    /// The caller has checked `earliest <= from < next`.
    pub(crate) fn segment_plan(&self, from: u64) -> SegmentSnapshot {
        let i = self
            .segments
            .partition_point(|s| s.base_offset <= from)
            .saturating_sub(1);
        let seg = &self.segments[i];
        seg.snapshot(seg.index.lookup_offset(from).map_or(0, |e| e.pos))
    }

    /// Snapshot of the segment holding the first record with timestamp `>= ts`, if any
    /// segment has one.
    pub(crate) fn timestamp_plan(&self, ts: u64) -> Option<SegmentSnapshot> {
        let seg = self
            .segments
            .iter()
            .find(|s| s.index.max_ts().is_some_and(|m| m >= ts))?;
        let start = seg.index.lookup_timestamp(ts).map_or(0, |e| e.pos);
        Some(seg.snapshot(start))
    }
}

/// Recovers one segment; returns it and its producer marks (with their records' offsets).
fn recover_segment(
    id: &PartitionId,
    dir: &Path,
    base: u64,
    index_interval: u32,
    metrics: &StoreMetrics,
) -> Result<(Segment, Vec<(ProducerMark, u64)>), StoreError> {
    let path = segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(StoreError::io(&path))?;
    let bytes = fs::read(&path).map_err(StoreError::io(&path))?;
    let scan = codec::scan_segment(&bytes, base, index_interval);
    for h in &scan.holes {
        let lost = h.next_offset - h.first_offset;
        tracing::error!(
            stream = %id.stream, partition = id.partition, path = ?path,
            first_offset = h.first_offset, next_offset = h.next_offset, bytes = h.end_pos - h.pos,
            "corrupt record(s) in the middle of a segment; they will never be served"
        );
        metrics.corrupt_records.fetch_add(lost.max(1), Relaxed);
    }
    let torn = scan.torn_bytes(bytes.len() as u64);
    if torn > 0 {
        tracing::warn!(
            stream = %id.stream, partition = id.partition, path = ?path, bytes = torn,
            next_offset = scan.next_offset, "truncating torn tail"
        );
        file.set_len(scan.valid_len)
            .map_err(StoreError::io(&path))?;
        file.sync_all().map_err(StoreError::io(&path))?;
        metrics.torn_tails_truncated.fetch_add(1, Relaxed);
    }
    metrics.records_recovered.fetch_add(scan.records, Relaxed);
    let seg = Segment {
        base_offset: base,
        next_offset: scan.next_offset,
        path: path.into(),
        file: Arc::new(file),
        size: scan.valid_len,
        index: scan.index,
        holes: scan.holes.into(),
    };
    Ok((seg, scan.marks))
}

/// What a reader needs of one segment, taken under the partition lock.
pub(crate) struct SegmentSnapshot {
    path: Arc<Path>,
    file: Arc<File>,
    base_offset: u64,
    next_offset: u64,
    /// Bytes of complete records at snapshot time.
    end: u64,
    start_pos: u64,
    holes: Arc<[Hole]>,
}

enum Event<'a> {
    Frame(FrameRef<'a>),
    Hole(Hole),
    /// Bytes that recovery accepted no longer decode (damaged since the store was opened).
    Corrupt,
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// Largest read buffer a thread keeps between reads (larger ones are freed after use).
const KEEP_READ_BUF: usize = 2 << 20;

thread_local! {
    /// The read buffer of this thread's last read, reused so that a read neither allocates
    /// nor zeroes its buffer again (the store's reads run on a few blocking threads).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Walks the frames of `snap` from its start position, reading `chunk` bytes per `pread`.
fn for_each_frame(
    snap: &SegmentSnapshot,
    chunk_size: usize,
    f: impl FnMut(Event<'_>) -> Flow,
) -> Result<(), StoreError> {
    let mut buf = READ_BUF.with(std::cell::RefCell::take);
    let r = walk_frames(snap, chunk_size, &mut buf, f);
    if buf.capacity() <= KEEP_READ_BUF {
        READ_BUF.with(|b| *b.borrow_mut() = buf);
    }
    r
}

/// [`for_each_frame`] with `buf` as the read buffer (its old contents are ignored; it is only
/// zero-filled where it grows).
fn walk_frames(
    snap: &SegmentSnapshot,
    chunk_size: usize,
    buf: &mut Vec<u8>,
    mut f: impl FnMut(Event<'_>) -> Flow,
) -> Result<(), StoreError> {
    let mut cur = snap.start_pos;
    // `buf[..valid]` holds the file bytes from `chunk_pos` on.
    let mut valid = 0usize;
    let mut chunk_pos = cur;
    let mut hole_i = snap.holes.partition_point(|h| h.pos < cur);
    while cur < snap.end {
        if let Some(h) = snap.holes.get(hole_i).filter(|h| h.pos == cur) {
            hole_i += 1;
            if f(Event::Hole(*h)) == Flow::Stop {
                return Ok(());
            }
            cur = h.end_pos;
            continue;
        }
        let rel = usize::try_from(cur - chunk_pos)
            .unwrap_or(usize::MAX)
            .min(valid);
        let avail = &buf[rel..valid];
        match codec::decode_frame(avail) {
            Decode::Frame(fr) => {
                cur += fr.len as u64;
                if f(Event::Frame(fr)) == Flow::Stop {
                    return Ok(());
                }
            }
            Decode::Incomplete { needed } => {
                let left = snap.end - cur;
                let needed = needed.unwrap_or(codec::HEADER_LEN) as u64;
                if needed > left || avail.len() as u64 >= left {
                    f(Event::Corrupt);
                    return Ok(());
                }
                // Bounded by the segment's end and by MAX_BODY_LEN (decode checked the length).
                let want = needed.max(chunk_size as u64).min(left) as usize;
                if buf.len() < want {
                    buf.resize(want, 0);
                }
                snap.file
                    .read_exact_at(&mut buf[..want], cur)
                    .map_err(StoreError::io(&*snap.path))?;
                valid = want;
                chunk_pos = cur;
            }
            Decode::Invalid(_) => {
                f(Event::Corrupt);
                return Ok(());
            }
        }
    }
    Ok(())
}

fn chunk_size(max_bytes: usize) -> usize {
    max_bytes.saturating_add(8 << 10).clamp(64 << 10, 8 << 20)
}

/// Reads records `>= from` following a [`PartitionLog::read_plan`] (outside the lock),
/// handing each to `visit` as it is read (borrowed from the read buffer: no copy, no
/// allocation per record). Returns the number of records visited; errors only when none was.
pub(crate) fn visit_records(
    plan: &[SegmentSnapshot],
    from: u64,
    max_records: usize,
    max_bytes: usize,
    id: &PartitionId,
    metrics: &StoreMetrics,
    mut visit: impl FnMut(&FrameRef<'_>),
) -> Result<usize, StoreError> {
    let mut n = 0usize;
    if max_records == 0 {
        return Ok(n);
    }
    let mut bytes = 0usize;
    let mut err: Option<StoreError> = None;
    let mut done = false;
    let chunk = chunk_size(max_bytes);
    let mut prev_next: Option<u64> = None;
    for snap in plan {
        if let Some(prev_next) = prev_next
            && snap.base_offset > prev_next
            && snap.base_offset > from
        {
            // Offsets lost between segments (reported at recovery).
            if n == 0 {
                return Err(StoreError::Corrupt {
                    path: snap.path.to_path_buf(),
                    offset: from.max(prev_next),
                    resume_at: Some(snap.base_offset),
                });
            }
            return Ok(n);
        }
        prev_next = Some(snap.next_offset);
        let mut expected = from.max(snap.base_offset);
        for_each_frame(snap, chunk, |ev| match ev {
            Event::Frame(fr) => {
                expected = fr.offset + 1;
                if fr.offset < from {
                    return Flow::Continue;
                }
                if n > 0 && bytes.saturating_add(fr.len) > max_bytes {
                    done = true;
                    return Flow::Stop;
                }
                bytes += fr.len;
                visit(&fr);
                n += 1;
                if n >= max_records {
                    done = true;
                    return Flow::Stop;
                }
                Flow::Continue
            }
            Event::Hole(h) => {
                expected = h.next_offset;
                if h.next_offset <= from {
                    Flow::Continue
                } else {
                    done = true;
                    if n == 0 {
                        err = Some(StoreError::Corrupt {
                            path: snap.path.to_path_buf(),
                            offset: from.max(h.first_offset),
                            resume_at: Some(h.next_offset),
                        });
                    }
                    Flow::Stop
                }
            }
            Event::Corrupt => {
                done = true;
                tracing::error!(
                    stream = %id.stream, partition = id.partition, path = ?snap.path, offset = expected,
                    "record damaged since the store was opened; not served"
                );
                metrics.corrupt_records.fetch_add(1, Relaxed);
                if n == 0 {
                    err = Some(StoreError::Corrupt {
                        path: snap.path.to_path_buf(),
                        offset: expected,
                        resume_at: None,
                    });
                }
                Flow::Stop
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        if done {
            break;
        }
    }
    metrics.records_read.fetch_add(n as u64, Relaxed);
    Ok(n)
}

/// A byte range of one segment file that starts on a frame boundary and holds at least one
/// whole frame ([`Store::raw_read`](super::Store::raw_read)).
#[derive(Debug, Clone)]
pub struct RawRange {
    /// The segment file.
    pub file: Arc<File>,
    /// The segment's first offset (names it).
    pub segment_base: u64,
    /// Where the range starts in the file.
    pub pos: u64,
    /// Length of the range in bytes.
    pub len: usize,
}

/// Where a raw read of `snap` from `from` can start and how far it can go: a range of at
/// most `max_bytes` (but at least the first frame) that stops before the segment's end and
/// before any hole, of at most `max_len` bytes. `hint` (a segment base and a byte position a
/// previous raw read ended on) replaces the index position when it names this segment and
/// lies past that position. `None` when no such range exists here (a hole at the start, a
/// first frame that does not decode or is larger than `max_len`): the caller then reads the
/// records the verifying way.
pub(crate) fn raw_range(
    snap: &SegmentSnapshot,
    hint: Option<(u64, u64)>,
    max_bytes: usize,
    max_len: usize,
) -> Result<Option<RawRange>, StoreError> {
    let start = match hint {
        Some((base, pos)) if base == snap.base_offset && pos >= snap.start_pos => pos,
        _ => snap.start_pos,
    };
    let limit = match snap.holes.iter().find(|h| h.end_pos > start) {
        Some(h) if h.pos <= start => return Ok(None),
        Some(h) => h.pos.min(snap.end),
        None => snap.end,
    };
    if start >= limit {
        return Ok(None);
    }
    let mut head = [0u8; codec::HEADER_LEN];
    if limit - start < head.len() as u64 {
        return Ok(None);
    }
    snap.file
        .read_exact_at(&mut head, start)
        .map_err(StoreError::io(&*snap.path))?;
    let Some(first) = codec::frame_len_from_header(&head) else {
        return Ok(None);
    };
    let avail = usize::try_from(limit - start).unwrap_or(usize::MAX);
    if first > avail || first > max_len {
        return Ok(None);
    }
    Ok(Some(RawRange {
        file: snap.file.clone(),
        segment_base: snap.base_offset,
        pos: start,
        len: max_bytes.max(first).min(avail).min(max_len),
    }))
}

/// First offset `>= ` with timestamp `>= ts` in `snap`, scanning from its start position.
pub(crate) fn find_timestamp(snap: &SegmentSnapshot, ts: u64) -> Result<Option<u64>, StoreError> {
    let mut found = None;
    for_each_frame(snap, chunk_size(0), |ev| match ev {
        Event::Frame(fr) if fr.timestamp_ms >= ts => {
            found = Some(fr.offset);
            Flow::Stop
        }
        Event::Frame(_) | Event::Hole(_) => Flow::Continue,
        Event::Corrupt => Flow::Stop,
    })?;
    Ok(found)
}

impl SegmentSnapshot {
    /// One past the last offset of the segment at snapshot time.
    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset
    }
}
