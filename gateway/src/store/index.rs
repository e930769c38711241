//! The sparse in-memory offset/time index of one segment. No I/O.
//!
//! The index is never written to disk: recovery verifies every CRC of every segment anyway, and
//! rebuilds the index during that scan ([`super::codec::scan_segment`]). One entry is added at
//! the first record that starts at least `interval` bytes after the previous entry.

/// One index entry: the record with `offset` starts at byte `pos` of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) offset: u64,
    pub(crate) pos: u64,
    /// Largest timestamp of the records before `pos` in this segment.
    pub(crate) max_ts_before: u64,
}

/// Sparse offset index of one segment, with the timestamps needed by time lookups.
#[derive(Debug, Clone)]
pub(crate) struct SparseIndex {
    interval: u64,
    entries: Vec<IndexEntry>,
    since_last: u64,
    first_ts: Option<u64>,
    max_ts: Option<u64>,
}

impl SparseIndex {
    /// An empty index with one entry every `interval` bytes (0 is treated as 1).
    pub(crate) fn new(interval: u32) -> Self {
        Self {
            interval: u64::from(interval.max(1)),
            entries: Vec::new(),
            since_last: 0,
            first_ts: None,
            max_ts: None,
        }
    }

    /// Records that a frame of `len` bytes with `offset` and `timestamp_ms` starts at `pos`.
    /// Frames arrive in file order.
    pub(crate) fn on_append(&mut self, offset: u64, pos: u64, len: u64, timestamp_ms: u64) {
        if let Some(max_ts) = self.max_ts
            && self.since_last >= self.interval
        {
            self.entries.push(IndexEntry {
                offset,
                pos,
                max_ts_before: max_ts,
            });
            self.since_last = 0;
        }
        self.since_last += len;
        self.first_ts.get_or_insert(timestamp_ms);
        self.max_ts = Some(self.max_ts.map_or(timestamp_ms, |m| m.max(timestamp_ms)));
    }

    /// The last entry at or before `offset`; `None` means "scan from the segment start".
    pub(crate) fn lookup_offset(&self, offset: u64) -> Option<IndexEntry> {
        let n = self.entries.partition_point(|e| e.offset <= offset);
        n.checked_sub(1).map(|i| self.entries[i])
    }

    /// The last entry before which every record has a timestamp `< ts`; scanning from it finds
    /// the first record with timestamp `>= ts`. `None` means "scan from the segment start".
    pub(crate) fn lookup_timestamp(&self, ts: u64) -> Option<IndexEntry> {
        let n = self.entries.partition_point(|e| e.max_ts_before < ts);
        n.checked_sub(1).map(|i| self.entries[i])
    }

    /// Timestamp of the segment's first record.
    pub(crate) fn first_ts(&self) -> Option<u64> {
        self.first_ts
    }

    /// Largest timestamp in the segment.
    pub(crate) fn max_ts(&self) -> Option<u64> {
        self.max_ts
    }

    /// Number of entries (for tests and sizing).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_every_interval() {
        let mut idx = SparseIndex::new(100);
        for i in 0..10 {
            idx.on_append(i, i * 40, 40, 1000 + i);
        }
        // Entries at offsets 3 (120 bytes after 0), 6, 9.
        assert_eq!(idx.len(), 3);
        assert_eq!(idx.lookup_offset(0), None);
        assert_eq!(idx.lookup_offset(2), None);
        assert_eq!(
            idx.lookup_offset(3).map(|e| (e.offset, e.pos)),
            Some((3, 120))
        );
        assert_eq!(idx.lookup_offset(8).map(|e| e.offset), Some(6));
        assert_eq!(idx.lookup_offset(100).map(|e| e.offset), Some(9));
        assert_eq!((idx.first_ts(), idx.max_ts()), (Some(1000), Some(1009)));
    }

    #[test]
    fn timestamp_lookup_handles_unordered_timestamps() {
        let mut idx = SparseIndex::new(1);
        let ts = [10, 50, 20, 30, 60, 40];
        for (i, t) in ts.iter().enumerate() {
            idx.on_append(i as u64, i as u64 * 10, 10, *t);
        }
        // Entries at offsets 1..=5, max_ts_before = 10, 50, 50, 50, 60.
        // First record with ts >= 45 is offset 1 (ts 50): start at offset 1.
        assert_eq!(idx.lookup_timestamp(45).map(|e| e.offset), Some(1));
        // First with ts >= 5 is offset 0: scan from the start.
        assert_eq!(idx.lookup_timestamp(5), None);
        // First with ts >= 55 is offset 4 (ts 60): every record before offset 4 is < 55.
        assert_eq!(idx.lookup_timestamp(55).map(|e| e.offset), Some(4));
        // Nothing >= 61: the last entry, scan finds nothing.
        assert_eq!(idx.lookup_timestamp(61).map(|e| e.offset), Some(5));
    }
}
