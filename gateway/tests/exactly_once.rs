//! Idempotent publishing against the real `sibyl-gateway` binary over raw quinn + proto
//! frames: a batch re-sent after a lost ack is acknowledged with its original offsets (also
//! after a hub SIGKILL), refused seqs and foreign producer ids are answered with their codes,
//! and the log holds every batch once.

mod support;

use quinn::{Connection, SendStream};
use sibyl_gateway::store::Store;
use sibyl_proto::frame::{
    Action, NewRecordRef, PRODUCER_TOKEN_LEN, Produce, ProduceAck, ProduceError, PublishAccepted,
    PublishOpen,
};
use sibyl_proto::{ErrorCode, Frame};
use support::*;

/// One group, one shard; stream `t` (2 partitions, fsync before ack).
const CONFIG: &str = "[[shards.groups]]\nid = 0\nshards = 1\n\
    [[streams]]\nname = \"t\"\npartitions = 2\ndurability = \"always\"\nmax_payload = 1024\n";

type Producer = (u64, [u8; PRODUCER_TOKEN_LEN]);

type Reader = StreamReader;

async fn hub_conn(ep: &quinn::Endpoint, gw: &Gateway, key: &str, client: &str) -> Connection {
    let mut h = hello(key, &[("t", Action::Publish)]);
    h.client_id = client.into();
    let (conn, t) = ask_hub(ep, gw.hub, h).await;
    t.expect("ticket");
    conn
}

/// Opens a publish stream for `producer` (`None`: a new one); returns the stream and the
/// hub's first answer.
async fn open(conn: &Connection, producer: Option<Producer>) -> (SendStream, Reader, Frame) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send_frame(
        &mut send,
        Frame::PublishOpen(PublishOpen::idempotent("t", producer)),
    )
    .await;
    let mut r = Reader::new(recv);
    let first = r.next().await.expect("answer to PublishOpen");
    (send, r, first)
}

fn accepted(f: Frame) -> PublishAccepted {
    match f {
        Frame::PublishAccepted(a) => a,
        other => panic!("expected PublishAccepted, got {other:?}"),
    }
}

fn payload(seq: u64, i: usize) -> Vec<u8> {
    format!("batch-{seq}-record-{i}").into_bytes()
}

async fn produce(send: &mut SendStream, seq: u64, partition: u32, n: usize) {
    let pay: Vec<Vec<u8>> = (0..n).map(|i| payload(seq, i)).collect();
    let recs = pay.iter().map(|p| NewRecordRef {
        timestamp: 0,
        key: b"",
        payload: p,
    });
    let p = Produce::new(seq, partition, recs).unwrap();
    send_frame(send, Frame::Produce(p)).await;
}

async fn ack(r: &mut Reader) -> ProduceAck {
    match r.next().await {
        Some(Frame::ProduceAck(a)) => a,
        other => panic!("expected ProduceAck, got {other:?}"),
    }
}

async fn refusal(r: &mut Reader) -> ProduceError {
    match r.next().await {
        Some(Frame::ProduceError(e)) => e,
        other => panic!("expected ProduceError, got {other:?}"),
    }
}

#[test]
fn resend_after_lost_ack_gets_original_offsets_also_after_sigkill() {
    let gw = Gateway::start(CONFIG, 1);
    let key = gw.dev_key.clone();
    let rt = runtime();
    let (producer, first_acks) = rt.block_on(async {
        let ep = client(&gw.ca());
        let conn = hub_conn(&ep, &gw, &key, "app-1").await;
        let (mut send, mut r, first) = open(&conn, None).await;
        let a = accepted(first);
        let producer = (a.producer_id.unwrap(), a.producer_token.unwrap());
        assert!(producer.0 > 0);
        assert!(a.max_in_flight.unwrap() >= 1);
        produce(&mut send, 1, 0, 2).await;
        produce(&mut send, 2, 1, 1).await;
        produce(&mut send, 3, 0, 1).await;
        let acks = vec![ack(&mut r).await, ack(&mut r).await, ack(&mut r).await];
        assert_eq!(
            acks.iter()
                .map(|a| (a.seq, a.partition, a.base_offset, a.count))
                .collect::<Vec<_>>(),
            vec![(1, 0, 0, 2), (2, 1, 0, 1), (3, 0, 2, 1)]
        );
        // Seq 4 goes to a partition that does not exist: refused, its seq consumed.
        produce(&mut send, 4, 9, 1).await;
        assert_eq!(refusal(&mut r).await.code, ErrorCode::NotFound);
        produce(&mut send, 5, 0, 1).await;
        assert_eq!(ack(&mut r).await.base_offset, 3);
        // The acks "were lost": the connection dies without a clean close.
        conn.close(0u32.into(), b"");

        // A new connection continues the producer and re-sends 2 and 3: original offsets.
        let conn = hub_conn(&ep, &gw, &key, "app-1").await;
        let (mut send, mut r, first) = open(&conn, Some(producer)).await;
        assert_eq!(accepted(first).producer_id, Some(producer.0));
        produce(&mut send, 2, 1, 1).await;
        produce(&mut send, 3, 0, 1).await;
        let (a2, a3) = (ack(&mut r).await, ack(&mut r).await);
        assert_eq!((a2.partition, a2.base_offset), (1, 0));
        assert_eq!((a3.partition, a3.base_offset), (0, 2));
        // Seq 4 was refused (NOT_FOUND), and re-sent to a real partition it is out of order.
        produce(&mut send, 4, 0, 1).await;
        let e = refusal(&mut r).await;
        assert_eq!((e.seq, e.code), (4, ErrorCode::OutOfOrderSequence));
        produce(&mut send, 6, 1, 2).await;
        let a6 = ack(&mut r).await;
        assert_eq!((a6.partition, a6.base_offset, a6.count), (1, 1, 2));

        // Someone else with this producer id: another client id, a wrong token, a guess.
        let other = hub_conn(&ep, &gw, &key, "app-2").await;
        let (_s, _r, f) = open(&other, Some(producer)).await;
        assert!(
            matches!(&f, Frame::ProduceError(e) if e.code == ErrorCode::UnknownProducer),
            "{f:?}"
        );
        let (_s, _r, f) = open(&conn, Some((producer.0, [0; PRODUCER_TOKEN_LEN]))).await;
        assert!(matches!(&f, Frame::ProduceError(e) if e.code == ErrorCode::UnknownProducer));
        let (_s, _r, f) = open(&conn, Some((producer.0 + 1, producer.1))).await;
        assert!(matches!(&f, Frame::ProduceError(e) if e.code == ErrorCode::UnknownProducer));
        conn.close(0u32.into(), b"");
        (producer, acks)
    });

    // SIGKILL the whole gateway and restart it on the same data dir: the dedup state comes
    // back from the log, the producer id and token stay valid.
    let dir = gw.kill9();
    let gw = Gateway::start_in(dir, CONFIG, 1);
    rt.block_on(async {
        let ep = client(&gw.ca());
        let conn = hub_conn(&ep, &gw, &key, "app-1").await;
        let (mut send, mut r, first) = open(&conn, Some(producer)).await;
        assert_eq!(accepted(first).producer_id, Some(producer.0));
        produce(&mut send, 1, 0, 2).await;
        produce(&mut send, 6, 1, 2).await;
        produce(&mut send, 7, 0, 1).await;
        let a1 = ack(&mut r).await;
        assert_eq!(a1, first_acks[0]);
        assert_eq!(ack(&mut r).await.base_offset, 1);
        assert_eq!(ack(&mut r).await.base_offset, 4);
        // A new producer gets a new id, never one handed out before the restart.
        let (_s, _r, f) = open(&conn, None).await;
        assert!(accepted(f).producer_id.unwrap() > producer.0);
        conn.close(0u32.into(), b"");
    });

    // The log holds every batch exactly once.
    let dir = gw.kill9();
    let store = Store::open(sibyl_gateway::store::StoreConfig::new(
        dir.path().join("data").join("store"),
    ))
    .unwrap();
    let read = |p| -> Vec<Vec<u8>> {
        store
            .read("t", p, 0, 100, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|r| r.payload)
            .collect()
    };
    let want = |b: &[(u64, usize)]| -> Vec<Vec<u8>> {
        b.iter()
            .flat_map(|&(seq, n)| (0..n).map(move |i| payload(seq, i)))
            .collect()
    };
    assert_eq!(read(0), want(&[(1, 2), (3, 1), (5, 1), (7, 1)]));
    assert_eq!(read(1), want(&[(2, 1), (6, 2)]));
}

/// Cycles of the SIGKILL test: `SIBYL_EO_CYCLES` (default 5; run 20+ for the long form).
fn kill_cycles() -> usize {
    std::env::var("SIBYL_EO_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Stream `t` for the SIGKILL test: two partitions, no fsync (a SIGKILL loses nothing the
/// page cache has, so every ack is durable here and the appends are fast).
const KILL_CONFIG: &str = "[[shards.groups]]\nid = 0\nshards = 1\n\
    [[streams]]\nname = \"t\"\npartitions = 2\ndurability = \"never\"\nmax_payload = 1024\n";

/// Record `i`'s payload: unique, of varying length.
fn kill_payload(i: u64) -> Vec<u8> {
    let mut p = format!("record-{i:010}-").into_bytes();
    p.extend((0..(i % 97)).map(|j| (i + j) as u8));
    p
}

/// The whole gateway (hub and shards) is SIGKILLed again and again while an SDK publisher
/// publishes, and restarted on the same data dir and port each time. Afterwards the log holds
/// every acknowledged record exactly once, byte for byte, at the offset it was acknowledged
/// with, and nothing else: no duplicate, no record the publisher was told failed.
#[test]
fn sigkill_the_whole_gateway_while_publishing_every_ack_exactly_once() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use sibyl_sdk::{Client, PublishError, PublisherConfig, RecordAck, Trust};

    let cycles = kill_cycles();
    let mut gw = Gateway::start(KILL_CONFIG, 1);
    let listen = gw.hub.to_string();
    let key = gw.dev_key.clone();
    let rt = runtime();
    type Outcomes = BTreeMap<u64, Result<RecordAck, PublishError>>;
    let outcomes: Arc<Mutex<Outcomes>> = Arc::default();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = rt.block_on(async {
        Client::builder()
            .hub(gw.hub)
            .trust(Trust::CaFile(gw.ca()))
            .api_key(&key)
            .want_publish("t")
            // A killed hub sends no close: notice it within seconds.
            .idle_timeout(Duration::from_secs(2))
            .unwrap()
            .keep_alive_interval(Some(Duration::from_millis(300)))
            .unwrap()
            .connect_timeout(Some(PATIENCE))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    });
    let cfg = PublisherConfig::default()
        .max_batch_records(16)
        .unwrap()
        .reconnect_timeout(PATIENCE * 2)
        .unwrap();
    let publisher = Arc::new(
        rt.block_on(client.publisher_with("t", cfg))
            .expect("publisher"),
    );
    let producing = {
        let (publisher, outcomes, acked, stop) = (
            publisher.clone(),
            outcomes.clone(),
            acked.clone(),
            stop.clone(),
        );
        rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let fut = publisher.send_to((i % 2) as u32, Vec::new(), kill_payload(i));
                let fut = match fut.admitted().await {
                    Ok(f) => f,
                    Err(e) => {
                        outcomes.lock().unwrap().insert(i, Err(e));
                        break;
                    }
                };
                let (outcomes, acked) = (outcomes.clone(), acked.clone());
                tokio::spawn(async move {
                    let r = fut.await;
                    if r.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    outcomes.lock().unwrap().insert(i, r);
                });
                i += 1;
                if i.is_multiple_of(64) {
                    // Let the acks' tasks run between bursts.
                    tokio::task::yield_now().await;
                }
            }
            i
        })
    };
    // Wait for progress (more acks), bounded; never a timing assertion.
    let progress = |from: u64| {
        let deadline = std::time::Instant::now() + PATIENCE * 2;
        while acked.load(Ordering::Relaxed) < from + 500 {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress after {from} acks"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for cycle in 0..cycles {
        progress(acked.load(Ordering::Relaxed));
        let dir = gw.kill9_all();
        eprintln!(
            "cycle {cycle}: killed with {} acks",
            acked.load(Ordering::Relaxed)
        );
        gw = Gateway::start_listening(dir, KILL_CONFIG, 1, &listen);
    }
    progress(acked.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let sent = rt.block_on(producing).unwrap();
    rt.block_on(async { tokio::time::timeout(PATIENCE * 2, publisher.flush()).await })
        .expect("flush in time")
        .expect("flush");
    // Every record's task has run once flush returned and the runtime got to them.
    let deadline = std::time::Instant::now() + PATIENCE;
    while (outcomes.lock().unwrap().len() as u64) < sent {
        assert!(std::time::Instant::now() < deadline, "outcomes missing");
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = publisher.metrics();
    eprintln!(
        "{cycles} cycles: {sent} records sent, {} acked, {} failed; {} batches sent, {} re-sent, {} reconnects",
        m.records_acked, m.records_failed, m.batches_sent, m.batches_resent, m.reconnects
    );
    drop(publisher);
    rt.block_on(client.close());
    let dir = gw.kill9_all();

    let store = Store::open(sibyl_gateway::store::StoreConfig::new(
        dir.path().join("data").join("store"),
    ))
    .unwrap();
    let mut log: BTreeMap<(u32, u64), Vec<u8>> = BTreeMap::new();
    for p in 0..2 {
        let (_, next) = store.bounds("t", p).unwrap();
        let mut from = 0;
        while from < next {
            let recs = store.read("t", p, from, 10_000, 8 << 20).unwrap();
            from = recs.last().unwrap().offset + 1;
            log.extend(recs.into_iter().map(|r| ((p, r.offset), r.payload)));
        }
    }
    let outcomes = outcomes.lock().unwrap();
    let mut in_log: BTreeMap<&[u8], (u32, u64)> = BTreeMap::new();
    for (at, payload) in &log {
        assert!(
            in_log.insert(payload, *at).is_none(),
            "payload at {at:?} is in the log twice"
        );
    }
    let mut ok = 0;
    for (i, r) in outcomes.iter() {
        let want = kill_payload(*i);
        match r {
            Ok(a) => {
                ok += 1;
                assert_eq!(
                    log.get(&(a.partition, a.offset)),
                    Some(&want),
                    "record {i} acked at {a:?}"
                );
            }
            Err(e) => assert!(
                !in_log.contains_key(want.as_slice()),
                "record {i} failed ({e}) but is in the log"
            ),
        }
    }
    assert_eq!(
        ok,
        log.len(),
        "the log holds exactly the acknowledged records"
    );
    assert!(ok > 0);
}
