//! The fakes' data plane (PROTOCOL.md §5.2, §6.2, §6.3, just enough to test the SDK): an
//! in-memory log, a hub publish handler with an ack gate (to ack slowly), and a shard that
//! serves subscriptions from the log, can crash mid-stream and can replay old records.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sibyl_proto::frame::{
    AssignedPartition, Assignment, Grant, PartitionOpen, Position, ProduceAck, ProduceError,
    PublishAccepted, PublishOpen, Record, Records, Start, SubError, Subscribe,
};
use sibyl_proto::{ErrorCode, Frame, FrameDecoder};
use tokio::sync::{Notify, Semaphore};

use super::{read_frame, unix_now, write_frame};

/// Streams of partitions of records `(timestamp, key, payload)`; offset = index.
#[derive(Clone, Default)]
pub struct FakeLog(Arc<LogInner>);

#[derive(Default)]
pub struct LogInner {
    streams: Mutex<HashMap<String, Vec<Vec<Record>>>>,
    appended: Notify,
}

impl FakeLog {
    pub fn create(&self, stream: &str, partitions: u32) {
        self.0
            .streams
            .lock()
            .unwrap()
            .insert(stream.into(), vec![Vec::new(); partitions as usize]);
    }

    pub fn partitions(&self, stream: &str) -> Option<u32> {
        Some(self.0.streams.lock().unwrap().get(stream)?.len() as u32)
    }

    /// Appends; returns the base offset (None: no such partition).
    pub fn append(
        &self,
        stream: &str,
        partition: u32,
        recs: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Option<u64> {
        let mut s = self.0.streams.lock().unwrap();
        let p = s.get_mut(stream)?.get_mut(partition as usize)?;
        let base = p.len() as u64;
        for (key, payload) in recs {
            let offset = p.len() as u64;
            p.push(Record {
                offset,
                timestamp: unix_now() * 1000,
                key,
                payload,
            });
        }
        drop(s);
        self.0.appended.notify_waiters();
        Some(base)
    }

    pub fn len(&self, stream: &str, partition: u32) -> u64 {
        let s = self.0.streams.lock().unwrap();
        s.get(stream)
            .and_then(|p| p.get(partition as usize))
            .map_or(0, |p| p.len() as u64)
    }

    /// All records of a partition.
    pub fn records(&self, stream: &str, partition: u32) -> Vec<Record> {
        let s = self.0.streams.lock().unwrap();
        s[stream][partition as usize].clone()
    }

    fn read(&self, stream: &str, partition: u32, from: u64, max: usize) -> Vec<Record> {
        let s = self.0.streams.lock().unwrap();
        let p = &s[stream][partition as usize];
        p.iter().skip(from as usize).take(max).cloned().collect()
    }
}

/// What the fake hub does on publish streams, and what it saw.
#[derive(Clone)]
pub struct PublishSide {
    /// One permit per `ProduceAck` (default: unlimited). Take them away to ack slowly.
    pub ack_gate: Arc<Semaphore>,
    /// `(seq, partition, count)` of every `Produce` received, in order.
    pub produces: Arc<Mutex<Vec<(u64, u32, u32)>>>,
    /// Records received (appended or waiting for the gate).
    pub records_received: Arc<AtomicU64>,
    /// Reset the publish stream (instead of acking) after this many `Produce` frames in
    /// total, once, having appended the batch: the ack is lost, the SDK re-sends.
    pub reset_after: Arc<Mutex<Option<u64>>>,
    /// Idempotent publishing: `Some(max_in_flight)` issues producer id [`FAKE_PRODUCER`] and
    /// answers a re-sent seq with its original offsets (default `None`: a hub without it).
    pub idempotent: Arc<Mutex<Option<u32>>>,
    /// Every `PublishOpen` received.
    pub opens: Arc<Mutex<Vec<PublishOpen>>>,
    /// Idempotent batches appended: seq → (partition, base_offset, count).
    appended: Arc<Mutex<HashMap<u64, Appended>>>,
}

/// Where an idempotent batch went: `(partition, base_offset, count)`.
type Appended = (u32, u64, u32);

/// The producer id and token the fake hub issues.
pub const FAKE_PRODUCER: (u64, [u8; 16]) = (7, [7; 16]);

impl Default for PublishSide {
    fn default() -> Self {
        Self {
            ack_gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            produces: Arc::default(),
            records_received: Arc::default(),
            reset_after: Arc::default(),
            idempotent: Arc::default(),
            opens: Arc::default(),
            appended: Arc::default(),
        }
    }
}

impl PublishSide {
    /// Stops acking until [`release`](Self::release).
    pub fn hold_acks(&self) {
        self.ack_gate.forget_permits(Semaphore::MAX_PERMITS);
    }

    pub fn release(&self, n: usize) {
        self.ack_gate.add_permits(n);
    }
}

/// Serves the publish streams of one hub connection.
pub async fn serve_publish(conn: quinn::Connection, log: FakeLog, side: PublishSide) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let (log, side) = (log.clone(), side.clone());
        tokio::spawn(async move {
            let mut dec = FrameDecoder::default();
            let Some(Frame::PublishOpen(open)) = read_frame(&mut recv, &mut dec).await else {
                return;
            };
            side.opens.lock().unwrap().push(open.clone());
            let max_in_flight = *side.idempotent.lock().unwrap();
            let producer = match (max_in_flight, open.producer_id) {
                (Some(_), Some(0)) => Some(FAKE_PRODUCER),
                (Some(_), Some(id)) => {
                    assert_eq!(
                        (id, open.producer_token),
                        (FAKE_PRODUCER.0, Some(FAKE_PRODUCER.1))
                    );
                    Some(FAKE_PRODUCER)
                }
                _ => None,
            };
            let Some(partitions) = log.partitions(&open.stream) else {
                let e = ProduceError {
                    seq: 0,
                    code: ErrorCode::NotFound,
                    reason: "no such stream".into(),
                };
                write_frame(&mut send, e).await;
                let _ = send.finish();
                return;
            };
            write_frame(
                &mut send,
                PublishAccepted {
                    partitions,
                    max_frame: 1_572_880,
                    producer_id: producer.map(|p| p.0),
                    producer_token: producer.map(|p| p.1),
                    max_in_flight: producer.and(max_in_flight),
                },
            )
            .await;
            let mut last_seq = 0;
            while let Some(Frame::Produce(p)) = read_frame(&mut recv, &mut dec).await {
                assert!(p.seq() > last_seq, "seq must increase");
                last_seq = p.seq();
                let n = {
                    let mut v = side.produces.lock().unwrap();
                    v.push((p.seq(), p.partition(), p.count()));
                    v.len() as u64
                };
                side.records_received
                    .fetch_add(u64::from(p.count()), Ordering::Relaxed);
                let Ok(permit) = side.ack_gate.acquire().await else {
                    return;
                };
                permit.forget();
                let dup =
                    producer.and_then(|_| side.appended.lock().unwrap().get(&p.seq()).copied());
                if let Some((partition, base_offset, count)) = dup {
                    let ack = ProduceAck {
                        seq: p.seq(),
                        partition,
                        base_offset,
                        count,
                    };
                    write_frame(&mut send, ack).await;
                    continue;
                }
                let recs = p
                    .iter()
                    .map(|r| (r.key.to_vec(), r.payload.to_vec()))
                    .collect();
                let appended = log.append(&open.stream, p.partition(), recs);
                if let (Some(_), Some(base)) = (producer, appended) {
                    side.appended
                        .lock()
                        .unwrap()
                        .insert(p.seq(), (p.partition(), base, p.count()));
                }
                let Some(base) = appended else {
                    let e = ProduceError {
                        seq: p.seq(),
                        code: ErrorCode::NotFound,
                        reason: "no such partition".into(),
                    };
                    write_frame(&mut send, e).await;
                    continue;
                };
                let reset = {
                    let mut r = side.reset_after.lock().unwrap();
                    if r.is_some_and(|k| n >= k) {
                        *r = None;
                        true
                    } else {
                        false
                    }
                };
                if reset {
                    let _ = send.reset(ErrorCode::Internal.to_u32().into());
                    let _ = recv.stop(ErrorCode::Internal.to_u32().into());
                    return;
                }
                let ack = ProduceAck {
                    seq: p.seq(),
                    partition: p.partition(),
                    base_offset: base,
                    count: p.count(),
                };
                write_frame(&mut send, ack).await;
            }
        });
    }
}

/// How a fake shard serves subscriptions, and what it saw.
#[derive(Clone, Default)]
pub struct ShardData {
    /// `Subscribe` frames received, in order.
    pub subscribes: Arc<Mutex<Vec<Subscribe>>>,
    /// `Position` frames received.
    pub positions: Arc<Mutex<Vec<Position>>>,
    /// Records sent on partition streams.
    pub records_sent: Arc<AtomicU64>,
    /// On `Subscribe` with `Offsets`, start this many records before each requested offset
    /// (deliberate replays the SDK must drop).
    pub replay: Arc<AtomicU64>,
}

/// Serves the control streams of one attached session (returns when the connection ends).
pub async fn serve_subscriptions(conn: quinn::Connection, log: FakeLog, d: ShardData) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let (conn, log, d) = (conn.clone(), log.clone(), d.clone());
        tokio::spawn(async move {
            let mut dec = FrameDecoder::default();
            let Some(Frame::Subscribe(sub)) = read_frame(&mut recv, &mut dec).await else {
                return;
            };
            d.subscribes.lock().unwrap().push(sub.clone());
            let Some(n) = log.partitions(&sub.stream) else {
                let e = SubError {
                    code: ErrorCode::NotFound,
                    reason: "no such stream".into(),
                };
                write_frame(&mut send, e).await;
                let _ = send.finish();
                return;
            };
            let grant = Grant {
                rate_records_per_s: 1_000_000,
                burst: 1_000_000,
                lease_expires_ms: unix_now() * 1000 + 60_000,
            };
            write_frame(&mut send, grant).await;
            let replay = d.replay.load(Ordering::Relaxed);
            let starts: Vec<u64> = (0..n)
                .map(|p| {
                    let end = log.len(&sub.stream, p);
                    match &sub.start {
                        Start::Earliest => 0,
                        Start::Latest => end,
                        Start::Offsets(m) => {
                            m.get(&p).map_or(0, |&o| o.min(end).saturating_sub(replay))
                        }
                        Start::Timestamp(_) => 0,
                    }
                })
                .collect();
            let a = Assignment {
                sub_id: sub.sub_id,
                epoch: 1,
                partitions: (0..n)
                    .map(|p| AssignedPartition {
                        partition: p,
                        start_offset: starts[p as usize],
                        priority: 0,
                    })
                    .collect(),
            };
            write_frame(&mut send, a).await;
            let mut pushers = Vec::new();
            for p in 0..n {
                let (conn, log, d, stream) =
                    (conn.clone(), log.clone(), d.clone(), sub.stream.clone());
                let start = starts[p as usize];
                pushers.push(tokio::spawn(push_partition(
                    conn, log, d, stream, sub.sub_id, p, start,
                )));
            }
            while let Some(f) = read_frame(&mut recv, &mut dec).await {
                if let Frame::Position(pos) = f {
                    d.positions.lock().unwrap().push(pos);
                }
            }
            // The client finished the control stream: end the partition streams.
            for h in pushers {
                h.abort();
            }
        });
    }
}

async fn push_partition(
    conn: quinn::Connection,
    log: FakeLog,
    d: ShardData,
    stream: String,
    sub_id: u32,
    partition: u32,
    mut next: u64,
) {
    let Ok(mut send) = conn.open_uni().await else {
        return;
    };
    let open = PartitionOpen {
        sub_id,
        partition,
        epoch: 1,
    };
    write_frame(&mut send, open).await;
    loop {
        let notified = log.0.appended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = log.read(&stream, partition, next, 10);
        let Some(last) = batch.last() else {
            notified.await;
            continue;
        };
        next = last.offset + 1;
        let n = batch.len() as u64;
        let Ok(records) = Records::from_records(partition, &batch) else {
            return;
        };
        let mut buf = Vec::new();
        sibyl_proto::Codec::encode(&Frame::Records(records), &mut buf);
        if send.write_all(&buf).await.is_err() {
            return;
        }
        d.records_sent.fetch_add(n, Ordering::Relaxed);
    }
}
