//! The I/O-free publish machine: per-partition batching with a linger, `seq` numbering, the
//! idempotent producer (PROTOCOL.md §5.2), ack matching and re-sending after a lost stream.
//! The SDK's publisher is a driver around it: it moves records in, `Produce` frames out and
//! answers back, and owns the window and the records' futures.
//!
//! ```text
//!  push(partition, size, item, now) ─▶ open batch per partition ──full / linger (poll_timeout,
//!                                                                 handle_timeout) / seal_all──▶
//!  sealed, in seq order ──poll_transmit (≤ max_in_flight unanswered)──▶ driver writes Produce
//!  handle_ack / handle_error ─▶ the oldest batch's items back to the driver
//!  handle_stream_lost ─▶ every written batch is unwritten again: re-sent with its seq
//!  open_frame / handle_accepted ─▶ the producer id, kept for the machine's life
//! ```
//!
//! Call order: `open_frame` → `handle_accepted` once per publish stream; then any of `push`,
//! `seal_all`, `handle_timeout`, `poll_transmit`, `handle_ack`, `handle_error`;
//! `handle_stream_lost` when the stream fails, then `open_frame` again. `now` only moves
//! forward. Seqs start at 1 and are never renumbered, so a batch re-sent after a lost ack
//! is recognised by an idempotent hub.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::frame::{PRODUCER_TOKEN_LEN, ProduceAck, ProduceError, PublishAccepted, PublishOpen};

/// A producer id and its token, as the hub issued them.
pub type ProducerId = (u64, [u8; PRODUCER_TOKEN_LEN]);

/// Bytes of a `Produce` body before its records (seq, partition, count).
pub const PRODUCE_HEADER: usize = 16;

/// Tunables of a [`PublishMachine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishConfig {
    /// How long a partition's batch waits for more records before it is sealed.
    pub linger: Duration,
    /// Largest `Produce` body (header included); a batch is sealed before it would exceed it.
    pub max_body: usize,
    /// Most records in one batch (≥ 1).
    pub max_records: usize,
    /// Ask for a producer id (exactly-once); `false`: at-least-once streams.
    pub idempotent: bool,
}

/// The hub answered something that does not fit what is in flight: close the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishViolation {
    /// An answer for another batch than the oldest one in flight.
    #[error("{what} for seq {seq} does not match the oldest batch in flight")]
    Unmatched {
        /// `ProduceAck` or `ProduceError`.
        what: &'static str,
        /// The answer's seq.
        seq: u64,
    },
    /// `PublishAccepted` on a re-opened stream names another producer than the one presented.
    #[error("PublishAccepted for another producer id")]
    ProducerChanged,
}

/// A batch being filled.
#[derive(Debug)]
struct Open<T> {
    items: Vec<T>,
    bytes: usize,
    since: Instant,
}

/// A sealed batch, in seq order.
#[derive(Debug)]
struct Sealed<T> {
    seq: u64,
    partition: u32,
    items: Vec<T>,
    written: bool,
}

/// A batch to write now: the driver encodes `Produce{seq, partition, items}`.
#[derive(Debug)]
pub struct Transmit<'a, T> {
    /// The batch's seq.
    pub seq: u64,
    /// Its partition.
    pub partition: u32,
    /// Its records, in order.
    pub items: &'a [T],
}

/// The publish machine of one publisher. `T` is whatever the driver keeps per record (its
/// bytes and the handle to resolve it).
#[derive(Debug)]
pub struct PublishMachine<T> {
    cfg: PublishConfig,
    open: BTreeMap<u32, Open<T>>,
    sealed: VecDeque<Sealed<T>>,
    /// How many batches at the front of `sealed` are written (the written ones are a prefix).
    written: usize,
    next_seq: u64,
    producer: Option<ProducerId>,
    max_in_flight: usize,
    resent: u64,
}

impl<T> PublishMachine<T> {
    /// A machine with nothing in it; the first batch gets seq 1.
    pub fn new(cfg: PublishConfig) -> Self {
        Self {
            cfg,
            open: BTreeMap::new(),
            sealed: VecDeque::new(),
            written: 0,
            next_seq: 1,
            producer: None,
            max_in_flight: usize::MAX,
            resent: 0,
        }
    }

    /// The `PublishOpen` for a (re-)opened stream on `stream`: with the producer id once the
    /// hub issued one, asking for one on the first idempotent stream.
    pub fn open_frame(&self, stream: &str) -> PublishOpen {
        if self.cfg.idempotent {
            PublishOpen::idempotent(stream, self.producer)
        } else {
            PublishOpen::new(stream)
        }
    }

    /// The hub accepted a stream: keep its producer id (a re-opened stream must continue the
    /// same one) and its `max_in_flight`.
    pub fn handle_accepted(&mut self, a: &PublishAccepted) -> Result<(), PublishViolation> {
        let issued = a.producer_id.zip(a.producer_token);
        if self.producer.is_some() && issued != self.producer {
            return Err(PublishViolation::ProducerChanged);
        }
        self.producer = issued;
        self.max_in_flight = match (issued, a.max_in_flight) {
            (Some(_), Some(n)) => (n as usize).max(1),
            _ => usize::MAX,
        };
        Ok(())
    }

    /// The producer id, once the hub issued one.
    pub fn producer(&self) -> Option<ProducerId> {
        self.producer
    }

    /// Adds a record of encoded `size` (in a `Produce` body) to `partition`'s batch, sealing
    /// the batch first if the record would not fit and after if it is full.
    pub fn push(&mut self, partition: u32, size: usize, item: T, now: Instant) {
        let (max_body, max_records) = (self.cfg.max_body, self.cfg.max_records.max(1));
        let full = |b: &Open<T>| {
            PRODUCE_HEADER + b.bytes + size > max_body || b.items.len() >= max_records
        };
        if self.open.get(&partition).is_some_and(full) {
            self.seal(partition);
        }
        let b = self.open.entry(partition).or_insert_with(|| Open {
            items: Vec::new(),
            bytes: 0,
            since: now,
        });
        b.bytes += size;
        b.items.push(item);
        if PRODUCE_HEADER + b.bytes >= max_body || b.items.len() >= max_records {
            self.seal(partition);
        }
    }

    fn seal(&mut self, partition: u32) {
        if let Some(b) = self.open.remove(&partition) {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.sealed.push_back(Sealed {
                seq,
                partition,
                items: b.items,
                written: false,
            });
        }
    }

    /// Seals every open batch (flush, close, linger zero).
    pub fn seal_all(&mut self) {
        while let Some((&p, _)) = self.open.first_key_value() {
            self.seal(p);
        }
    }

    /// When the oldest open batch's linger ends.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.open.values().map(|b| b.since + self.cfg.linger).min()
    }

    /// Seals the batches whose linger ended at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, b)| b.since + self.cfg.linger <= now)
            .map(|(&p, _)| p)
            .collect();
        for p in due {
            self.seal(p);
        }
    }

    /// The next sealed batch to write, if `max_in_flight` leaves room; it counts as written
    /// (if the write fails, call [`handle_stream_lost`](Self::handle_stream_lost)).
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_, T>> {
        if self.written >= self.max_in_flight {
            return None;
        }
        let s = self.sealed.get_mut(self.written)?;
        s.written = true;
        self.written += 1;
        Some(Transmit {
            seq: s.seq,
            partition: s.partition,
            items: &s.items,
        })
    }

    /// The oldest batch was acknowledged: its items (record `i` is at `ack.base_offset + i`).
    pub fn handle_ack(&mut self, ack: &ProduceAck) -> Result<Vec<T>, PublishViolation> {
        let ok = self.sealed.front().is_some_and(|s| {
            s.written
                && s.seq == ack.seq
                && s.partition == ack.partition
                && s.items.len() == ack.count as usize
        });
        if !ok {
            return Err(PublishViolation::Unmatched {
                what: "ProduceAck",
                seq: ack.seq,
            });
        }
        Ok(self.pop_front())
    }

    /// The oldest batch was refused: its items, to fail with `e.code`.
    pub fn handle_error(&mut self, e: &ProduceError) -> Result<Vec<T>, PublishViolation> {
        let ok = self
            .sealed
            .front()
            .is_some_and(|s| s.written && s.seq == e.seq);
        if !ok {
            return Err(PublishViolation::Unmatched {
                what: "ProduceError",
                seq: e.seq,
            });
        }
        Ok(self.pop_front())
    }

    fn pop_front(&mut self) -> Vec<T> {
        self.written = self.written.saturating_sub(1);
        self.sealed.pop_front().map(|s| s.items).unwrap_or_default()
    }

    /// The stream failed: every written, unanswered batch is written again on the next stream,
    /// with its seq. Returns how many batches that is.
    pub fn handle_stream_lost(&mut self) -> u64 {
        let n = self.written as u64;
        for s in self.sealed.iter_mut().take(self.written) {
            s.written = false;
        }
        self.written = 0;
        self.resent += n;
        n
    }

    /// Nothing open, sealed or in flight.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty() && self.sealed.is_empty()
    }

    /// Batches re-sent after lost streams so far.
    pub fn resent(&self) -> u64 {
        self.resent
    }

    /// Takes every record out (in flight first, in seq order, then the open batches), to fail
    /// them: the publisher cannot go on.
    pub fn drain(&mut self) -> Vec<T> {
        self.seal_all();
        self.written = 0;
        self.sealed.drain(..).flat_map(|s| s.items).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PublishConfig {
        PublishConfig {
            linger: Duration::from_millis(5),
            max_body: PRODUCE_HEADER + 100,
            max_records: 3,
            idempotent: true,
        }
    }

    fn accepted(producer: Option<ProducerId>, max_in_flight: Option<u32>) -> PublishAccepted {
        PublishAccepted {
            partitions: 2,
            max_frame: 1 << 20,
            producer_id: producer.map(|p| p.0),
            producer_token: producer.map(|p| p.1),
            max_in_flight,
        }
    }

    fn ack(seq: u64, partition: u32, base_offset: u64, count: u32) -> ProduceAck {
        ProduceAck {
            seq,
            partition,
            base_offset,
            count,
        }
    }

    /// Drains what may be written: `(seq, partition, items)`.
    fn transmit(m: &mut PublishMachine<u32>) -> Vec<(u64, u32, Vec<u32>)> {
        let mut out = Vec::new();
        while let Some(t) = m.poll_transmit() {
            out.push((t.seq, t.partition, t.items.to_vec()));
        }
        out
    }

    #[test]
    fn batches_per_partition_by_size_count_and_linger() {
        let t0 = Instant::now();
        let mut m = PublishMachine::new(cfg());
        m.handle_accepted(&accepted(None, None)).unwrap();
        m.push(0, 10, 1, t0);
        m.push(1, 10, 2, t0 + Duration::from_millis(1));
        m.push(0, 10, 3, t0 + Duration::from_millis(2));
        assert!(transmit(&mut m).is_empty(), "lingering");
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_millis(5)));
        m.handle_timeout(t0 + Duration::from_millis(5));
        assert_eq!(transmit(&mut m), vec![(1, 0, vec![1, 3])]);
        m.handle_timeout(t0 + Duration::from_millis(6));
        assert_eq!(transmit(&mut m), vec![(2, 1, vec![2])]);
        // Three records fill a batch; a record over the byte limit starts the next one.
        for i in 10..13 {
            m.push(0, 10, i, t0);
        }
        m.push(1, 60, 20, t0);
        m.push(1, 60, 21, t0);
        m.push(1, 40, 22, t0);
        assert_eq!(
            transmit(&mut m),
            vec![
                (3, 0, vec![10, 11, 12]),
                (4, 1, vec![20]),
                (5, 1, vec![21, 22])
            ]
        );
        assert!(m.poll_timeout().is_none());
    }

    #[test]
    fn acks_match_the_oldest_batch_and_errors_fail_it() {
        let t0 = Instant::now();
        let mut m = PublishMachine::new(cfg());
        m.handle_accepted(&accepted(None, None)).unwrap();
        m.push(0, 10, 1, t0);
        m.push(1, 10, 2, t0);
        m.seal_all();
        assert_eq!(transmit(&mut m).len(), 2);
        assert!(matches!(
            m.handle_ack(&ack(2, 1, 0, 1)),
            Err(PublishViolation::Unmatched { seq: 2, .. })
        ));
        assert_eq!(m.handle_ack(&ack(1, 0, 7, 1)).unwrap(), vec![1]);
        let e = ProduceError {
            seq: 2,
            code: crate::ErrorCode::NotFound,
            reason: String::new(),
        };
        assert_eq!(m.handle_error(&e).unwrap(), vec![2]);
        assert!(m.is_idle());
    }

    #[test]
    fn a_lost_stream_resends_with_the_same_seqs_and_producer() {
        let t0 = Instant::now();
        let producer = (42, [9; PRODUCER_TOKEN_LEN]);
        let mut m = PublishMachine::new(cfg());
        assert_eq!(m.open_frame("s").producer_id, Some(0));
        m.handle_accepted(&accepted(Some(producer), Some(2)))
            .unwrap();
        for i in 0..4 {
            m.push(i % 2, 10, i, t0);
            m.seal_all();
        }
        // max_in_flight 2: two written, two waiting.
        assert_eq!(transmit(&mut m), vec![(1, 0, vec![0]), (2, 1, vec![1])]);
        assert_eq!(m.handle_ack(&ack(1, 0, 0, 1)).unwrap(), vec![0]);
        assert_eq!(transmit(&mut m), vec![(3, 0, vec![2])]);
        // The stream dies with 2 and 3 unanswered.
        assert_eq!(m.handle_stream_lost(), 2);
        let open = m.open_frame("s");
        assert_eq!(
            (open.producer_id, open.producer_token),
            (Some(42), Some([9; PRODUCER_TOKEN_LEN]))
        );
        m.handle_accepted(&accepted(Some(producer), Some(2)))
            .unwrap();
        assert_eq!(
            transmit(&mut m),
            vec![(2, 1, vec![1]), (3, 0, vec![2])],
            "original seqs"
        );
        // A hub that answers for another producer is a violation.
        assert_eq!(
            m.handle_accepted(&accepted(Some((43, [9; PRODUCER_TOKEN_LEN])), Some(2))),
            Err(PublishViolation::ProducerChanged)
        );
        assert_eq!(m.resent(), 2);
        assert_eq!(m.drain(), vec![1, 2, 3]);
        assert!(m.is_idle());
    }

    #[test]
    fn at_least_once_streams_have_no_producer_and_no_in_flight_bound() {
        let t0 = Instant::now();
        let mut m = PublishMachine::new(PublishConfig {
            idempotent: false,
            ..cfg()
        });
        assert_eq!(m.open_frame("s").producer_id, None);
        m.handle_accepted(&accepted(None, Some(1))).unwrap();
        for i in 0..5 {
            m.push(0, 10, i, t0);
            m.seal_all();
        }
        assert_eq!(transmit(&mut m).len(), 5);
    }
}
