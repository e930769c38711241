//! [`RecordBatch`]: a shared, immutable run of records of one partition.

use std::sync::Arc;

use sibyl_proto::codec::varint_len;
use sibyl_proto::frame::data::{RecordIter, RecordRef, Records};

/// Records `[base_offset, next_offset)` of one partition, possibly empty (a read at the
/// tail).
///
/// The records are held as a client-facing `Records` frame body behind an [`Arc`]: cloning
/// a batch is cheap, and [`records`](Self::records) can be sent to clients as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordBatch {
    partition: u32,
    base: u64,
    next: u64,
    records: Option<Arc<Records>>,
}

/// Encoded size of one record inside a batch body, relative to `base`.
pub(crate) fn record_len(r: &RecordRef<'_>, base: u64) -> usize {
    varint_len(r.offset.wrapping_sub(base))
        + 8
        + varint_len(r.key.len() as u64)
        + r.key.len()
        + varint_len(r.payload.len() as u64)
        + r.payload.len()
}

impl RecordBatch {
    /// An empty batch: nothing at `at` yet.
    pub fn empty(partition: u32, at: u64) -> Self {
        Self {
            partition,
            base: at,
            next: at,
            records: None,
        }
    }

    /// Wraps a decoded batch (walks it once to find its end).
    pub fn from_records(records: Records) -> Self {
        let next = records
            .iter()
            .last()
            .map_or(records.base_offset(), |r| r.offset.saturating_add(1));
        Self {
            partition: records.partition(),
            base: records.base_offset(),
            next,
            records: Some(Arc::new(records)),
        }
    }

    /// Partition number.
    pub fn partition(&self) -> u32 {
        self.partition
    }
    /// Offset of the first record (the requested offset when empty).
    pub fn base_offset(&self) -> u64 {
        self.base
    }
    /// Offset after the last record: where the next read continues.
    pub fn next_offset(&self) -> u64 {
        self.next
    }
    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.as_ref().map_or(0, |r| r.count() as usize)
    }
    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_none()
    }
    /// Encoded `Records` body length (0 when empty): what the cache accounts.
    pub fn body_len(&self) -> usize {
        self.records.as_ref().map_or(0, |r| r.body_len())
    }
    /// The batch as a client-facing `Records` body, `None` when empty.
    pub fn records(&self) -> Option<&Records> {
        self.records.as_deref()
    }
    /// The shared batch, `None` when empty.
    pub fn shared(&self) -> Option<Arc<Records>> {
        self.records.clone()
    }
    /// Borrowing iterator over the records.
    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> + '_ {
        self.records.iter().flat_map(|r| r.iter())
    }

    /// The records from `from` on, at most `max_records` of them, stopping before the record
    /// that would take their encoded size past `max_bytes` (at least one record is returned).
    /// `None` when `from` is not in `[base_offset, next_offset)`. Returns a clone of `self`
    /// (no copy) when the whole batch fits; otherwise encodes a new batch.
    pub fn slice(&self, from: u64, max_records: usize, max_bytes: usize) -> Option<Self> {
        if from < self.base || from >= self.next || max_records == 0 {
            return None;
        }
        let recs = self.records.as_ref()?;
        if from == self.base
            && recs.count() as usize <= max_records
            && recs.body_len() - 16 <= max_bytes
        {
            return Some(self.clone());
        }
        collect(
            self.partition,
            [self].into_iter(),
            from,
            max_records,
            max_bytes,
        )
    }
}

/// Encodes the records of consecutive `batches` from `from` on under the limits (see
/// [`RecordBatch::slice`]) into a new batch; `None` if no record is at or after `from`.
pub(crate) fn collect<'a>(
    partition: u32,
    batches: impl Iterator<Item = &'a RecordBatch>,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Option<RecordBatch> {
    let mut bytes = 0usize;
    let mut n = 0usize;
    let mut base = None;
    let iter = batches
        .flat_map(|b| b.records.iter().flat_map(|r| r.iter()))
        .skip_while(|r| r.offset < from)
        .take_while(|r| {
            let b = *base.get_or_insert(r.offset);
            let len = record_len(r, b);
            let fits = n < max_records && (n == 0 || bytes + len <= max_bytes);
            if fits {
                n += 1;
                bytes += len;
            }
            fits
        });
    let records = Records::new(partition, iter).ok()?;
    Some(RecordBatch::from_records(records))
}

impl<'a> IntoIterator for &'a RecordBatch {
    type Item = RecordRef<'a>;
    type IntoIter = std::iter::Flatten<std::option::IntoIter<RecordIter<'a>>>;
    fn into_iter(self) -> Self::IntoIter {
        self.records
            .as_ref()
            .map(|r| r.iter())
            .into_iter()
            .flatten()
    }
}
