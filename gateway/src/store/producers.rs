//! The dedup state of one partition: for each idempotent producer, its last appended batches
//! (`seq`, offsets). No I/O and no clock: times come in as `now_ms`.
//!
//! ```text
//! Produce{producer, seq} ──check──▶ Append                  seq > last appended seq
//!                                   Duplicate{base, count}  seq is one of the last WINDOW batches
//!                                   OutOfOrder{last}        seq ≤ last, not among them
//! written batch ──record(producer, seq, base, count, now)──▶ table
//! recovery: every producer mark of the log, in order ──record──▶ table, then expire(now)
//! ```
//!
//! The table is exactly what the log says: it is only changed under the partition lock right
//! after the batch (whose first record carries the mark) was written, and rebuilt from the
//! marks on open. Seqs may have gaps (a batch the hub refused consumes its seq); what matters
//! is that a publisher numbers its batches in increasing order and re-sends a batch with
//! its original seq.

use std::collections::{HashMap, VecDeque};

/// Batches remembered per producer and partition: a re-send older than the last `WINDOW`
/// appended batches of its producer on that partition is answered `OutOfOrder`, so a
/// publisher keeps at most this many batches unacknowledged (`PublishAccepted.max_in_flight`).
pub const WINDOW: usize = 64;
/// Producers tracked per partition; beyond it the one idle longest is forgotten.
pub const MAX_PRODUCERS: usize = 4096;
/// A producer that appended nothing to a partition for this long is forgotten there (at the
/// next retention pass, or when the store is opened): 7 days, in ms. A re-send after that is
/// appended again, as Kafka does after `producer.id.expiration.ms`.
pub const IDLE_HORIZON_MS: u64 = 7 * 24 * 3600 * 1000;

/// Where a batch was appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Appended {
    seq: u64,
    base_offset: u64,
    count: u32,
}

#[derive(Debug, Default)]
struct Producer {
    /// The last appended batches, oldest first, seqs increasing; at most [`WINDOW`].
    batches: VecDeque<Appended>,
    last_ms: u64,
}

/// What to do with a batch `(producer, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqCheck {
    /// Not appended yet: append it.
    Append,
    /// Already appended at `base_offset ..+ count`: acknowledge that, write nothing.
    Duplicate {
        /// Offset of the batch's first record.
        base_offset: u64,
        /// Its records.
        count: u32,
    },
    /// Below the last appended seq and not one of the remembered batches: never appended
    /// (refused earlier) or too old to tell. Not appended.
    OutOfOrder {
        /// The producer's last appended seq on this partition.
        last_seq: u64,
    },
}

/// How [`Store::append_idempotent`](super::Store::append_idempotent) answered one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchOutcome {
    /// Appended now at `base_offset ..+ count`.
    Appended {
        /// Offset of the batch's first record.
        base_offset: u64,
        /// Its records.
        count: u32,
    },
    /// Appended before at `base_offset ..+ count` (its original offsets); not written again.
    Duplicate {
        /// Offset of the batch's first record.
        base_offset: u64,
        /// Its records.
        count: u32,
    },
    /// Below the producer's last appended seq on this partition and not one of its last
    /// [`WINDOW`] batches: never appended (refused earlier) or too old to tell. Not appended.
    OutOfOrder {
        /// The producer's last appended seq on this partition.
        last_seq: u64,
    },
    /// The write failed (the error is returned beside the outcomes); not appended.
    Failed,
}

/// The dedup state of one partition.
#[derive(Debug, Default)]
pub(crate) struct ProducerTable {
    producers: HashMap<u64, Producer>,
}

impl ProducerTable {
    /// What to do with batch `seq` of `producer`. O(log WINDOW).
    pub(crate) fn check(&self, producer: u64, seq: u64) -> SeqCheck {
        let Some(p) = self.producers.get(&producer) else {
            return SeqCheck::Append;
        };
        let Some(last) = p.batches.back() else {
            return SeqCheck::Append;
        };
        if seq > last.seq {
            return SeqCheck::Append;
        }
        match p.batches.binary_search_by_key(&seq, |a| a.seq) {
            Ok(i) => SeqCheck::Duplicate {
                base_offset: p.batches[i].base_offset,
                count: p.batches[i].count,
            },
            Err(_) => SeqCheck::OutOfOrder { last_seq: last.seq },
        }
    }

    /// Records that batch `seq` of `producer` was written at `base_offset ..+ count` at
    /// `now_ms`. A seq not above the last one is ignored (the log never holds one: `check`
    /// runs first under the same lock).
    pub(crate) fn record(
        &mut self,
        producer: u64,
        seq: u64,
        base_offset: u64,
        count: u32,
        now_ms: u64,
    ) {
        if !self.producers.contains_key(&producer) && self.producers.len() >= MAX_PRODUCERS {
            self.evict_idlest();
        }
        let p = self.producers.entry(producer).or_default();
        if p.batches.back().is_some_and(|a| a.seq >= seq) {
            return;
        }
        if p.batches.len() == WINDOW {
            p.batches.pop_front();
        }
        p.batches.push_back(Appended {
            seq,
            base_offset,
            count,
        });
        p.last_ms = p.last_ms.max(now_ms);
    }

    /// Forgets producers idle for more than `horizon_ms` at `now_ms`; returns how many.
    pub(crate) fn expire(&mut self, now_ms: u64, horizon_ms: u64) -> usize {
        let before = self.producers.len();
        self.producers
            .retain(|_, p| now_ms.saturating_sub(p.last_ms) <= horizon_ms);
        before - self.producers.len()
    }

    /// Producers tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.producers.len()
    }

    /// O(MAX_PRODUCERS), only when a new producer arrives at a full table.
    fn evict_idlest(&mut self) {
        if let Some((&id, _)) = self.producers.iter().min_by_key(|(_, p)| p.last_ms) {
            tracing::warn!(
                producer = id,
                "forgetting the idlest producer of a partition: {MAX_PRODUCERS} tracked"
            );
            self.producers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_duplicate_out_of_order() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(7, 1), SeqCheck::Append);
        t.record(7, 1, 100, 3, 10);
        t.record(7, 4, 110, 2, 11); // seqs 2, 3 went to other partitions or were refused
        assert_eq!(
            t.check(7, 1),
            SeqCheck::Duplicate {
                base_offset: 100,
                count: 3
            }
        );
        assert_eq!(
            t.check(7, 4),
            SeqCheck::Duplicate {
                base_offset: 110,
                count: 2
            }
        );
        assert_eq!(t.check(7, 3), SeqCheck::OutOfOrder { last_seq: 4 });
        assert_eq!(t.check(7, 5), SeqCheck::Append);
        // Another producer is independent.
        assert_eq!(t.check(8, 1), SeqCheck::Append);
        // A stale record (seq not above the last) changes nothing.
        t.record(7, 2, 999, 1, 12);
        assert_eq!(t.check(7, 2), SeqCheck::OutOfOrder { last_seq: 4 });
    }

    #[test]
    fn window_bounds_what_is_remembered() {
        let mut t = ProducerTable::default();
        for seq in 1..=(WINDOW as u64 + 5) {
            t.record(1, seq, seq * 10, 1, seq);
        }
        assert_eq!(t.check(1, 5), SeqCheck::OutOfOrder { last_seq: 69 });
        assert_eq!(
            t.check(1, 6),
            SeqCheck::Duplicate {
                base_offset: 60,
                count: 1
            }
        );
    }

    #[test]
    fn idle_producers_expire_and_the_table_is_bounded() {
        let mut t = ProducerTable::default();
        t.record(1, 1, 0, 1, 1_000);
        t.record(2, 1, 1, 1, 5_000);
        assert_eq!(t.expire(5_500, 1_000), 1);
        assert_eq!(t.check(1, 1), SeqCheck::Append);
        assert!(matches!(t.check(2, 1), SeqCheck::Duplicate { .. }));
        for id in 10..(10 + MAX_PRODUCERS as u64) {
            t.record(id, 1, id, 1, 6_000 + id);
        }
        assert_eq!(t.len(), MAX_PRODUCERS);
        // Producer 2 (idlest) made room.
        assert_eq!(t.check(2, 1), SeqCheck::Append);
    }
}
