//! Publish streams on the hub: `PublishOpen` → `PublishAccepted`, then `Produce` batches
//! appended to the embedded store and answered in `seq` order (PROTOCOL.md §5.2).
//!
//! ```text
//! QUIC recv ──reader (async)── checks: seq ↑, partition, payload limit ──▶ jobs (bounded 64)
//!                                                                           │
//!   blocking worker (one per publish stream): drains the queue; consecutive batches of one
//!   partition become ONE Store::append (one write, one fsync under `always`: group commit)
//!                                                                           │
//! QUIC send ◀──writer (async)── ProduceAck | ProduceError, in seq order ◀── answers
//! ```
//!
//! The reader never waits for a batch's fsync before reading the next one: the queue
//! pipelines, and whatever queued up during an fsync is committed by the next one. The bounded
//! queue (and QUIC flow control behind it) is the back-pressure. Acks are sent once
//! [`Store::append`] returned, i.e. once the stream's durability policy is met (`always`:
//! fsynced; `interval`: written, fsynced within the interval; `never`: written).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use quinn::{Connection, RecvStream, SendStream};
use sibyl_proto::frame::{Produce, ProduceAck, ProduceError, PublishAccepted, PublishOpen};
use sibyl_proto::{Codec, DecodeLimits, ErrorCode, Frame, FrameDecoder};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::quic::{self, StreamError};
use crate::store::{NewRecord, Store, StoreError};

/// Jobs queued between the reader and the worker of one publish stream.
const JOB_QUEUE: usize = 64;
/// Most records one group commit appends.
const GROUP_RECORDS: usize = 64 * 1024;
/// Most bytes (keys + payloads) one group commit appends.
const GROUP_BYTES: usize = 8 << 20;

/// What the hub needs to serve publish streams: the store and per-stream limits.
#[derive(Debug)]
pub struct PublishService {
    store: Arc<Store>,
    max_payload: HashMap<String, u32>,
    default_max_payload: u32,
    limits: DecodeLimits,
}

impl PublishService {
    /// Publishing into `store`; `max_payload` holds per-stream payload limits (streams not
    /// listed get the store's limit); `limits` are the hub's frame limits (`Produce` bodies
    /// are bounded by `limits.max_batch_body()`, announced as `PublishAccepted.max_frame`).
    pub fn new(store: Arc<Store>, max_payload: HashMap<String, u32>, limits: DecodeLimits) -> Self {
        let default_max_payload = u32::try_from(store.config().max_payload).unwrap_or(u32::MAX);
        Self {
            store,
            max_payload,
            default_max_payload,
            limits,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Partitions of `stream`, `None` if it does not exist.
    fn partitions(&self, stream: &str) -> Option<u32> {
        self.store
            .streams()
            .into_iter()
            .find(|(n, _)| n == stream)
            .map(|(_, c)| c.partitions)
    }

    fn max_payload(&self, stream: &str) -> u32 {
        self.max_payload
            .get(stream)
            .copied()
            .unwrap_or(self.default_max_payload)
            .min(self.default_max_payload)
    }
}

/// How a publish job ended: the frame to send back.
#[derive(Debug)]
enum Answer {
    Ack(ProduceAck),
    Err(ProduceError),
}

#[derive(Debug)]
enum Job {
    Append(Produce),
    Fail(ProduceError),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The code a failed append is reported with.
pub fn store_error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::PayloadTooLarge { .. } | StoreError::KeyTooLarge { .. } => {
            ErrorCode::LimitExceeded
        }
        StoreError::NoSuchStream { .. } | StoreError::NoSuchPartition { .. } => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    }
}

/// Serves one publish stream whose first frame `open` was already read (with `dec`).
/// `may_publish(stream)` says whether this connection's `Hello` wanted `stream` with action
/// `publish` (its API key allowed it then). Frame errors close `conn` with their code.
pub async fn serve_publish(
    svc: Arc<PublishService>,
    may_publish: impl Fn(&str) -> bool,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    mut dec: FrameDecoder,
    open: PublishOpen,
) {
    let refuse = |code, reason: String| ProduceError {
        seq: 0,
        code,
        reason,
    };
    let opened = match svc.partitions(&open.stream) {
        None => Err(refuse(
            ErrorCode::NotFound,
            format!("no stream {:?}", open.stream),
        )),
        Some(_) if !may_publish(&open.stream) => Err(refuse(
            ErrorCode::Forbidden,
            format!(
                "stream {:?} was not in Hello.wants with action publish",
                open.stream
            ),
        )),
        Some(p) => Ok(p),
    };
    let partitions = match opened {
        Ok(p) => p,
        Err(e) => {
            debug!(stream = %open.stream, code = %e.code, "publish refused");
            if quic::write_frame(&mut send, &Frame::ProduceError(e))
                .await
                .is_ok()
            {
                let _ = send.finish();
            }
            return;
        }
    };
    let accepted = PublishAccepted {
        partitions,
        max_frame: svc.limits.max_batch_body(),
    };
    if quic::write_frame(&mut send, &Frame::PublishAccepted(accepted))
        .await
        .is_err()
    {
        return;
    }
    let max_payload = svc.max_payload(&open.stream) as usize;
    let (job_tx, job_rx) = mpsc::channel::<Job>(JOB_QUEUE);
    let (ans_tx, ans_rx) = mpsc::channel::<Answer>(JOB_QUEUE * 4);
    let store = svc.store.clone();
    let stream = open.stream.clone();
    let worker =
        tokio::task::spawn_blocking(move || append_worker(&store, &stream, job_rx, ans_tx));
    let writer = tokio::spawn(write_answers(send, ans_rx));
    let mut last_seq = 0u64;
    let result = loop {
        let f = match quic::read_frame(&mut recv, &mut dec).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let p = match f {
            Frame::Produce(p) => p,
            other => break Err(StreamError::Unexpected(other.frame_type())),
        };
        if p.seq() <= last_seq {
            break Err(StreamError::Unexpected(sibyl_proto::FrameType::Produce));
        }
        last_seq = p.seq();
        let job = check(&p, partitions, max_payload).map_or(Job::Append(p), Job::Fail);
        if job_tx.send(job).await.is_err() {
            break Ok(());
        }
    };
    drop(job_tx);
    match result {
        Ok(()) => {
            let _ = worker.await;
            let _ = writer.await;
        }
        Err(e) => {
            writer.abort();
            if let Some(code) = e.close_code() {
                debug!(code = %code, "closing hub connection: {e}");
                quic::close(&conn, code, &e.to_string());
            }
        }
    }
}

/// Checks a batch before it is queued: the partition exists and every payload is within the
/// stream's limit.
fn check(p: &Produce, partitions: u32, max_payload: usize) -> Option<ProduceError> {
    let err = |code, reason| {
        Some(ProduceError {
            seq: p.seq(),
            code,
            reason,
        })
    };
    if p.partition() >= partitions {
        return err(
            ErrorCode::NotFound,
            format!(
                "partition {} does not exist (the stream has {partitions})",
                p.partition()
            ),
        );
    }
    if let Some(r) = p.iter().find(|r| r.payload.len() > max_payload) {
        return err(
            ErrorCode::LimitExceeded,
            format!(
                "a payload of {} bytes exceeds the stream's max_payload {max_payload}",
                r.payload.len()
            ),
        );
    }
    None
}

/// The blocking worker: appends queued batches in order, grouping consecutive batches of
/// one partition into one append.
fn append_worker(
    store: &Store,
    stream: &str,
    mut jobs: mpsc::Receiver<Job>,
    answers: mpsc::Sender<Answer>,
) {
    let mut run: Vec<Produce> = Vec::new();
    let mut pending: Option<Job> = None;
    loop {
        let job = match pending.take() {
            Some(j) => j,
            None => match jobs.blocking_recv() {
                Some(j) => j,
                None => return,
            },
        };
        match job {
            Job::Fail(e) => {
                if answers.blocking_send(Answer::Err(e)).is_err() {
                    return;
                }
            }
            Job::Append(p) => {
                let partition = p.partition();
                let (mut records, mut bytes) = (p.count() as usize, p.body_len());
                run.push(p);
                // Group commit: whatever queued up behind it for the same partition.
                while records < GROUP_RECORDS && bytes < GROUP_BYTES {
                    match jobs.try_recv() {
                        Ok(Job::Append(q)) if q.partition() == partition => {
                            records += q.count() as usize;
                            bytes += q.body_len();
                            run.push(q);
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                for a in append_run(store, stream, partition, &run) {
                    if answers.blocking_send(a).is_err() {
                        return;
                    }
                }
                run.clear();
            }
        }
    }
}

/// Appends `run` (batches of one partition, in seq order) with one store append.
fn append_run(store: &Store, stream: &str, partition: u32, run: &[Produce]) -> Vec<Answer> {
    let now = now_ms();
    let total: usize = run.iter().map(|p| p.count() as usize).sum();
    let mut recs = Vec::with_capacity(total);
    for p in run {
        recs.extend(p.iter().map(|r| NewRecord {
            timestamp_ms: if r.timestamp == 0 { now } else { r.timestamp },
            key: r.key,
            payload: r.payload,
        }));
    }
    match store.append(stream, partition, &recs) {
        Ok(res) => {
            crate::obs::published(stream, &recs);
            let mut base = res.base_offset;
            run.iter()
                .map(|p| {
                    let ack = ProduceAck {
                        seq: p.seq(),
                        partition,
                        base_offset: base,
                        count: p.count(),
                    };
                    base += u64::from(p.count());
                    Answer::Ack(ack)
                })
                .collect()
        }
        Err(e) => {
            warn!(stream, partition, error = %e, "append failed");
            let code = store_error_code(&e);
            run.iter()
                .map(|p| {
                    Answer::Err(ProduceError {
                        seq: p.seq(),
                        code,
                        reason: e.to_string(),
                    })
                })
                .collect()
        }
    }
}

/// Writes answers as they come, coalescing whatever is queued into one write; finishes the
/// stream when the worker is done.
async fn write_answers(mut send: SendStream, mut answers: mpsc::Receiver<Answer>) {
    let mut buf = Vec::with_capacity(4096);
    while let Some(a) = answers.recv().await {
        buf.clear();
        encode_answer(a, &mut buf);
        while buf.len() < 64 * 1024 {
            match answers.try_recv() {
                Ok(a) => encode_answer(a, &mut buf),
                Err(_) => break,
            }
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}

fn encode_answer(a: Answer, buf: &mut Vec<u8>) {
    let f = match a {
        Answer::Ack(a) => Frame::ProduceAck(a),
        Answer::Err(e) => Frame::ProduceError(e),
    };
    f.encode(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreConfig, StreamConfig};
    use sibyl_proto::frame::NewRecordRef;

    fn produce(seq: u64, partition: u32, payloads: &[&[u8]]) -> Produce {
        Produce::new(
            seq,
            partition,
            payloads.iter().map(|p| NewRecordRef {
                timestamp: 0,
                key: b"",
                payload: p,
            }),
        )
        .unwrap()
    }

    #[test]
    fn checks_partition_and_payload() {
        let p = produce(3, 4, &[b"x"]);
        assert_eq!(check(&p, 4, 10).unwrap().code, ErrorCode::NotFound);
        let p = produce(3, 0, &[b"ok", b"too long"]);
        let e = check(&p, 4, 4).unwrap();
        assert_eq!((e.seq, e.code), (3, ErrorCode::LimitExceeded));
        assert!(check(&p, 4, 8).is_none());
    }

    #[test]
    fn a_run_is_one_append_with_consecutive_acks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let cfg = StreamConfig {
            partitions: 2,
            ..StreamConfig::default()
        };
        store.create_stream("s", cfg).unwrap();
        let run = vec![produce(1, 1, &[b"a", b"b"]), produce(2, 1, &[b"c"])];
        let acks = append_run(&store, "s", 1, &run);
        let acks: Vec<_> = acks
            .into_iter()
            .map(|a| match a {
                Answer::Ack(a) => (a.seq, a.base_offset, a.count),
                Answer::Err(e) => panic!("{e:?}"),
            })
            .collect();
        assert_eq!(acks, vec![(1, 0, 2), (2, 2, 1)]);
        let recs = store.read("s", 1, 0, 10, 1 << 20).unwrap();
        let payloads: Vec<&[u8]> = recs.iter().map(|r| r.payload.as_slice()).collect();
        assert_eq!(payloads, vec![&b"a"[..], b"b", b"c"]);
        assert!(recs.iter().all(|r| r.timestamp_ms > 0), "hub stamps 0");
        // A store error answers every batch of the run.
        let bad = append_run(&store, "nope", 0, &run);
        assert!(
            bad.iter()
                .all(|a| matches!(a, Answer::Err(e) if e.code == ErrorCode::NotFound))
        );
    }
}
