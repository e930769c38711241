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
//! **Idempotent streams** (`PublishOpen.producer_id`): the stream gets a producer id
//! ([`ProducerIds`]: allocated durably, the token binds it to the API key, client id and
//! stream), and its runs go through [`Store::append_idempotent`], which skips batches already
//! appended and answers them with their original offsets (exactly once across reconnects and
//! hub restarts; PROTOCOL.md §5.2).
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
use sibyl_proto::frame::{
    PRODUCER_TOKEN_LEN, Produce, ProduceAck, ProduceError, PublishAccepted, PublishOpen,
};
use sibyl_proto::{Codec, DecodeLimits, ErrorCode, Frame, FrameDecoder};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::producers::{ProducerIdError, ProducerIds, ProducerOwner};
use crate::quic::{self, StreamError};
use crate::store::{BatchOutcome, NewRecord, PRODUCER_WINDOW, ProducerBatch, Store, StoreError};

/// Jobs queued between the reader and the worker of one publish stream.
const JOB_QUEUE: usize = 64;
/// Most records one group commit appends.
const GROUP_RECORDS: usize = 64 * 1024;
/// Most bytes (keys + payloads) one group commit appends.
const GROUP_BYTES: usize = 8 << 20;

/// What the hub needs to serve publish streams: the store, per-stream limits and the
/// producer ids.
#[derive(Debug)]
pub struct PublishService {
    store: Arc<Store>,
    max_payload: HashMap<String, u32>,
    default_max_payload: u32,
    limits: DecodeLimits,
    producers: ProducerIds,
}

/// Who may publish on a hub connection: what its `Hello` asked and was granted.
#[derive(Debug, Clone)]
pub struct PublishRights {
    /// Streams in `Hello.wants` with action `publish` (the API key allowed them then).
    pub streams: Vec<String>,
    /// The owner of the producer ids this connection asks for or presents.
    pub owner: ProducerOwner,
}

impl PublishService {
    /// Publishing into `store`; `max_payload` holds per-stream payload limits (streams not
    /// listed get the store's limit); `limits` are the hub's frame limits (`Produce` bodies
    /// are bounded by `limits.max_batch_body()`, announced as `PublishAccepted.max_frame`).
    /// Opens the producer-id file in the store directory.
    pub fn new(
        store: Arc<Store>,
        max_payload: HashMap<String, u32>,
        limits: DecodeLimits,
    ) -> Result<Self, ProducerIdError> {
        let default_max_payload = u32::try_from(store.config().max_payload).unwrap_or(u32::MAX);
        let producers = ProducerIds::open(&store.config().dir)?;
        Ok(Self {
            store,
            max_payload,
            default_max_payload,
            limits,
            producers,
        })
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
/// `rights` say which streams this connection may publish to and who owns its producer ids.
/// Frame errors close `conn` with their code.
pub async fn serve_publish(
    svc: Arc<PublishService>,
    rights: Arc<PublishRights>,
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
    // FORBIDDEN before NOT_FOUND: a client learns nothing about streams it may not use.
    let opened = match svc.partitions(&open.stream) {
        _ if !rights.streams.contains(&open.stream) => Err(refuse(
            ErrorCode::Forbidden,
            format!(
                "stream {:?} was not in Hello.wants with action publish",
                open.stream
            ),
        )),
        None => Err(refuse(
            ErrorCode::NotFound,
            format!("no stream {:?}", open.stream),
        )),
        Some(p) => producer_for(&svc, &rights.owner, &open)
            .map(|producer| (p, producer))
            .map_err(|(code, reason)| refuse(code, reason)),
    };
    let (partitions, producer) = match opened {
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
        producer_id: producer.map(|p| p.0),
        producer_token: producer.map(|p| p.1),
        // The window is a small constant.
        max_in_flight: producer.map(|_| PRODUCER_WINDOW as u32),
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
    let producer_id = producer.map(|p| p.0);
    let worker = tokio::task::spawn_blocking(move || {
        append_worker(&store, &stream, producer_id, job_rx, ans_tx)
    });
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

/// The producer of an idempotent stream: none (at-least-once), a new one (`producer_id` 0),
/// or the one presented if its token is the one issued for this owner and stream.
#[allow(clippy::type_complexity)]
fn producer_for(
    svc: &PublishService,
    owner: &ProducerOwner,
    open: &PublishOpen,
) -> Result<Option<(u64, [u8; PRODUCER_TOKEN_LEN])>, (ErrorCode, String)> {
    match (open.producer_id, open.producer_token) {
        (None, _) => Ok(None),
        (Some(0), _) => match svc.producers.allocate(owner, &open.stream) {
            Ok(p) => Ok(Some(p)),
            Err(e) => {
                warn!(error = %e, "cannot allocate a producer id");
                Err((ErrorCode::Internal, "cannot allocate a producer id".into()))
            }
        },
        (Some(id), Some(token)) if svc.producers.verify(id, &token, owner, &open.stream) => {
            Ok(Some((id, token)))
        }
        (Some(id), _) => Err((
            ErrorCode::UnknownProducer,
            format!(
                "producer {id} was not issued by this hub to this API key, client id and stream"
            ),
        )),
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
    producer: Option<u64>,
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
                let answers_of_run = match producer {
                    Some(id) => append_run_idempotent(store, stream, partition, id, &run),
                    None => append_run(store, stream, partition, &run),
                };
                for a in answers_of_run {
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

/// The records of `p`, the hub stamping those without a timestamp with `now`.
fn stamped(p: &Produce, now: u64) -> Vec<NewRecord<'_>> {
    p.iter()
        .map(|r| NewRecord {
            timestamp_ms: if r.timestamp == 0 { now } else { r.timestamp },
            key: r.key,
            payload: r.payload,
        })
        .collect()
}

/// [`append_run`] for an idempotent producer: one store call that appends the batches not
/// appended yet and answers the others with their original offsets.
fn append_run_idempotent(
    store: &Store,
    stream: &str,
    partition: u32,
    producer: u64,
    run: &[Produce],
) -> Vec<Answer> {
    let now = now_ms();
    let records: Vec<Vec<NewRecord<'_>>> = run.iter().map(|p| stamped(p, now)).collect();
    let batches: Vec<ProducerBatch<'_, '_>> = run
        .iter()
        .zip(&records)
        .map(|(p, r)| ProducerBatch {
            seq: p.seq(),
            records: r,
        })
        .collect();
    let err = |p: &Produce, code, reason: String| {
        Answer::Err(ProduceError {
            seq: p.seq(),
            code,
            reason,
        })
    };
    let (outcomes, write_err) =
        match store.append_idempotent(stream, partition, producer, &batches, now) {
            Ok(r) => r,
            Err(e) => {
                warn!(stream, partition, producer, error = %e, "append failed");
                let code = store_error_code(&e);
                return run.iter().map(|p| err(p, code, e.to_string())).collect();
            }
        };
    if let Some(e) = &write_err {
        warn!(stream, partition, producer, error = %e, "append failed");
    }
    for (recs, o) in records.iter().zip(&outcomes) {
        if matches!(o, BatchOutcome::Appended { .. }) {
            crate::obs::published(stream, recs);
        }
    }
    run.iter()
        .zip(outcomes)
        .map(|(p, o)| match o {
            BatchOutcome::Appended { base_offset, count }
            | BatchOutcome::Duplicate { base_offset, count } => Answer::Ack(ProduceAck {
                seq: p.seq(),
                partition,
                base_offset,
                count,
            }),
            BatchOutcome::OutOfOrder { last_seq } => err(
                p,
                ErrorCode::OutOfOrderSequence,
                format!(
                    "seq {} is at or below producer {producer}'s last appended seq {last_seq} \
                     on partition {partition} and not one of its last {PRODUCER_WINDOW} batches",
                    p.seq()
                ),
            ),
            _ => match &write_err {
                Some(e) => err(p, store_error_code(e), e.to_string()),
                None => err(p, ErrorCode::Internal, "not appended".into()),
            },
        })
        .collect()
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
