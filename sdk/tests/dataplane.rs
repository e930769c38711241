//! The SDK's data plane against the in-test fakes (see `support/data.rs`): publish batching,
//! acks in order, backpressure, re-send after a lost ack; subscriptions in order, resumed
//! without gap or duplicate after a shard crash (with deliberate replays) and after `GoAway`.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use sibyl_sdk::{
    Client, ErrorCode, PublishError, PublisherConfig, Start, SubscribeError, Subscription, Trust,
};
use support::data::FAKE_PRODUCER;
use support::*;

const STREAM: &str = "orders";

struct Env {
    pki: Pki,
    hub: FakeHub,
    shards: Vec<FakeShard>,
}

/// A hub with `STREAM` of `partitions` partitions and `n_shards` shards serving its log.
fn env(partitions: u32, n_shards: usize, data: ShardData) -> Env {
    let (pki, keys) = (pki(), Keys::default());
    let log = FakeLog::default();
    log.create(STREAM, partitions);
    let shards: Vec<FakeShard> = (0..n_shards)
        .map(|_| FakeShard::start_with(&pki, &keys, ShardMode::Accept, log.clone(), data.clone()))
        .collect();
    let hub = FakeHub::start_with_log(
        &pki,
        &keys,
        shards.iter().map(FakeShard::endpoint).collect(),
        vec![HubReply::Ticket { ttl_s: 3600 }],
        log,
    );
    Env { pki, hub, shards }
}

async fn client(e: &Env) -> Client {
    let b = Client::builder()
        .hub(e.hub.addr)
        .trust(Trust::CaFile(e.pki.ca_pem.clone()))
        .api_key("sk_test")
        .want_publish(STREAM)
        .want_subscribe(STREAM);
    tokio::time::timeout(HANG_GUARD, b.connect())
        .await
        .expect("connect before the hang guard")
        .expect("connect")
}

async fn guard<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .expect("finished before the hang guard")
}

/// Polls `cond` (cheaply) until true, bounded by the hang guard. Not a timing assertion.
async fn until(mut cond: impl FnMut() -> bool) {
    guard(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

fn payload(p: u32, i: u64) -> Vec<u8> {
    format!("p{p}-r{i}-{:200}", "").into_bytes()
}

/// Takes `n` records and checks per-partition order, contiguity from `first` and content.
async fn take_checked(
    sub: &mut Subscription,
    n: usize,
    first: &BTreeMap<u32, u64>,
) -> BTreeMap<u32, Vec<u64>> {
    let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for _ in 0..n {
        let r = guard(sub.next())
            .await
            .expect("stream open")
            .expect("record");
        assert_eq!(&*r.stream, STREAM);
        let offs = seen.entry(r.partition).or_default();
        let expect = offs.last().map_or(first[&r.partition], |o| o + 1);
        assert_eq!(
            r.offset, expect,
            "partition {} in order, no gap, no duplicate",
            r.partition
        );
        assert_eq!(&r.payload[..], &payload(r.partition, r.offset)[..]);
        offs.push(r.offset);
    }
    seen
}

fn fill(log: &FakeLog, partitions: u32, per_partition: u64) {
    for p in 0..partitions {
        let base = log.len(STREAM, p);
        let recs = (base..base + per_partition)
            .map(|i| (Vec::new(), payload(p, i)))
            .collect();
        log.append(STREAM, p, recs);
    }
}

#[tokio::test]
async fn publish_batches_and_acks_every_record_in_order() {
    let e = env(2, 1, ShardData::default());
    let c = client(&e).await;
    let cfg = PublisherConfig::default()
        .linger(Duration::from_millis(20))
        .unwrap();
    let p = guard(c.publisher_with(STREAM, cfg)).await.unwrap();
    assert_eq!(p.partitions(), 2);
    // 200 sends in flight at once: they share batches.
    let futs: Vec<_> = (0..200u64)
        .map(|i| {
            p.send_to(
                (i % 2) as u32,
                format!("k{i}"),
                payload((i % 2) as u32, i / 2),
            )
        })
        .collect();
    let acks = guard(futures::future::try_join_all(futs)).await.unwrap();
    for (i, a) in acks.iter().enumerate() {
        assert_eq!(a.partition, (i % 2) as u32);
        assert_eq!(
            a.offset,
            i as u64 / 2,
            "acks give consecutive offsets in send order"
        );
    }
    let produces = e.hub.publish.produces.lock().unwrap().clone();
    assert!(
        produces.len() < 200,
        "records were batched: {} frames",
        produces.len()
    );
    assert!(
        produces.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "seq 1, 2, 3…"
    );
    assert_eq!(produces.iter().map(|x| x.2).sum::<u32>(), 200);
    let log = e.hub.log.records(STREAM, 1);
    assert_eq!(log.len(), 100);
    assert_eq!(log[7].payload, payload(1, 7));
    let m = p.metrics();
    assert_eq!((m.records_acked, m.inflight_bytes), (200, 0));
    // Key hash: the same key always lands on the same partition.
    let a = guard(p.send("user-42", "x")).await.unwrap();
    let b = guard(p.send("user-42", "y")).await.unwrap();
    assert_eq!(a.partition, b.partition);
    assert_eq!(b.offset, a.offset + 1);
    // Caller misuse is refused locally.
    assert!(matches!(
        guard(p.send_to(9, "", "z")).await,
        Err(PublishError::BadPartition {
            partition: 9,
            partitions: 2
        })
    ));
    guard(p.close()).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn a_full_window_makes_send_wait_until_acks_free_it() {
    let e = env(1, 1, ShardData::default());
    let c = client(&e).await;
    e.hub.publish.hold_acks();
    let cfg = PublisherConfig::default()
        .max_inflight_bytes(4096)
        .unwrap()
        .linger(Duration::ZERO)
        .unwrap();
    let p = guard(c.publisher_with(STREAM, cfg)).await.unwrap();
    // Each record is 8 (timestamp) + 1 (key_len) + 2 (payload_len) + 100 = 111 bytes: 36 fit
    // in 4096.
    let body = vec![7u8; 100];
    let mut futs: Vec<_> = (0..100).map(|_| p.send_to(0, "", body.clone())).collect();
    let admitted = futs.iter().filter(|f| f.is_admitted()).count();
    assert_eq!(admitted, 4096 / 111);
    // The hub receives what was admitted, and nothing more while it holds the acks.
    until(|| e.hub.publish.records_received.load(Ordering::Relaxed) == admitted as u64).await;
    let waiting = tokio::spawn(async move {
        let mut acks = Vec::new();
        for f in futs.drain(..) {
            acks.push(f.await);
        }
        acks
    });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        e.hub.publish.records_received.load(Ordering::Relaxed),
        admitted as u64,
        "no send beyond the window while acks are held"
    );
    assert!(p.metrics().inflight_bytes <= 4096);
    e.hub.publish.release(usize::MAX >> 4);
    let acks = guard(waiting).await.unwrap();
    let offsets: Vec<u64> = acks.into_iter().map(|a| a.unwrap().offset).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    guard(p.close()).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn admitted_returns_before_the_ack_and_keeps_call_order() {
    let e = env(1, 1, ShardData::default());
    let c = client(&e).await;
    e.hub.publish.hold_acks();
    let cfg = PublisherConfig::default()
        .max_inflight_bytes(4096)
        .unwrap()
        .linger(Duration::ZERO)
        .unwrap();
    let p = guard(c.publisher_with(STREAM, cfg)).await.unwrap();
    let body = vec![7u8; 100];
    // 36 records of 111 bytes fit in the window: each admission returns with acks held.
    let fit = 4096 / 111;
    let mut acks = Vec::new();
    for i in 0..fit {
        let f = guard(p.send_to(0, "", body.clone()).admitted())
            .await
            .unwrap();
        assert!(f.is_admitted(), "record {i}");
        acks.push(f);
    }
    // The next one waits for room: admission is the backpressure.
    let p = std::sync::Arc::new(p);
    let next = tokio::spawn({
        let (p, body) = (p.clone(), body.clone());
        async move { p.send_to(0, "", body).admitted().await }
    });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!next.is_finished(), "admitted beyond the window");
    e.hub.publish.release(usize::MAX >> 4);
    let last = guard(next).await.unwrap().unwrap();
    acks.push(last);
    let mut offsets = Vec::new();
    for a in acks {
        offsets.push(guard(a).await.unwrap().offset);
    }
    assert_eq!(offsets, (0..=fit as u64).collect::<Vec<_>>());
    // Errors known at the call come out of `admitted` too.
    let err = guard(p.send_to(9, "", body).admitted()).await.unwrap_err();
    assert!(matches!(err, PublishError::BadPartition { .. }), "{err:?}");
    c.close().await;
}

#[tokio::test]
async fn a_lost_ack_is_resent_with_its_original_seq_and_appended_once() {
    let e = env(1, 1, ShardData::default());
    *e.hub.publish.idempotent.lock().unwrap() = Some(64);
    let c = client(&e).await;
    *e.hub.publish.reset_after.lock().unwrap() = Some(2);
    let p = guard(c.publisher(STREAM)).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..5u64 {
        acks.push(guard(p.send_to(0, "", payload(0, i))).await.unwrap());
    }
    assert_eq!(p.metrics().reconnects, 1);
    // Batch 2 was appended and its ack lost: re-sent with seq 2 under the same producer id,
    // the hub acknowledged the original offsets. Nothing is in the log twice.
    let seqs: Vec<u64> = e
        .hub
        .publish
        .produces
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(seqs, vec![1, 2, 2, 3, 4, 5]);
    let opens = e.hub.publish.opens.lock().unwrap().clone();
    assert_eq!(opens.len(), 2);
    assert_eq!(
        (opens[0].producer_id, opens[0].producer_token),
        (Some(0), None)
    );
    assert_eq!(
        (opens[1].producer_id, opens[1].producer_token),
        (Some(FAKE_PRODUCER.0), Some(FAKE_PRODUCER.1))
    );
    let log = e.hub.log.records(STREAM, 0);
    let payloads: Vec<Vec<u8>> = log.into_iter().map(|r| r.payload).collect();
    assert_eq!(payloads, (0..5).map(|i| payload(0, i)).collect::<Vec<_>>());
    let offsets: Vec<u64> = acks.iter().map(|a| a.offset).collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    guard(p.close()).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn at_most_max_in_flight_batches_are_unacknowledged() {
    let e = env(1, 1, ShardData::default());
    *e.hub.publish.idempotent.lock().unwrap() = Some(2);
    e.hub.publish.hold_acks();
    let c = client(&e).await;
    let cfg = PublisherConfig::default()
        .linger(Duration::ZERO)
        .unwrap()
        .max_batch_records(1)
        .unwrap();
    let p = guard(c.publisher_with(STREAM, cfg)).await.unwrap();
    let mut futs = Vec::new();
    for i in 0..6u64 {
        futs.push(
            guard(p.send_to(0, "", payload(0, i)).admitted())
                .await
                .unwrap(),
        );
    }
    until(|| p.metrics().records_admitted == 6).await;
    // One more command through the task: it wrote what it could after sealing the six.
    futs.push(
        guard(p.send_to(0, "", payload(0, 6)).admitted())
            .await
            .unwrap(),
    );
    until(|| p.metrics().records_admitted == 7).await;
    assert_eq!(
        p.metrics().batches_sent,
        2,
        "two batches unacknowledged at most"
    );
    e.hub.publish.release(usize::MAX >> 4);
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(guard(f).await.unwrap().offset, i as u64);
    }
    assert_eq!(p.metrics().batches_sent, 7);
    guard(p.close()).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn a_lost_ack_is_resent_on_a_new_stream_at_least_once() {
    let e = env(1, 1, ShardData::default());
    let c = client(&e).await;
    *e.hub.publish.reset_after.lock().unwrap() = Some(2);
    let p = guard(c.publisher(STREAM)).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..5u64 {
        acks.push(guard(p.send_to(0, "", payload(0, i))).await.unwrap());
    }
    let m = p.metrics();
    assert_eq!(m.reconnects, 1);
    assert!(m.batches_resent >= 1);
    // The stream's connection was given up: the publisher re-opened on a fresh one.
    assert_eq!(e.hub.hellos().len(), 2);
    // The second batch was appended but its ack lost: re-sent, it is in the log twice.
    let log = e.hub.log.records(STREAM, 0);
    assert_eq!(log.len(), 6);
    assert_eq!(log[1].payload, log[2].payload);
    assert_eq!(
        acks[1].offset, 2,
        "the future resolves with the acknowledged copy"
    );
    assert_eq!(acks[4].offset, 5);
    guard(p.close()).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn publishing_to_an_unknown_stream_is_rejected() {
    let e = env(1, 1, ShardData::default());
    let c = client(&e).await;
    let err = guard(c.publisher("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(!err.retryable());
    c.close().await;
}

#[tokio::test]
async fn subscribe_receives_published_records_in_order_and_then_the_tail() {
    let e = env(2, 1, ShardData::default());
    let c = client(&e).await;
    fill(&e.hub.log, 2, 30);
    let mut sub = guard(c.subscribe(STREAM).start(Start::Earliest).open())
        .await
        .unwrap();
    assert_eq!(sub.assigned_partitions(), vec![0, 1]);
    assert!(sub.grant().is_some());
    let from0 = BTreeMap::from([(0, 0), (1, 0)]);
    let seen = take_checked(&mut sub, 60, &from0).await;
    assert_eq!(seen[&0].len(), 30);
    // Records published now arrive through the tail.
    let p = guard(c.publisher(STREAM)).await.unwrap();
    for i in 30..40u64 {
        drop(p.send_to(1, "", payload(1, i)));
    }
    guard(p.flush()).await.unwrap();
    let tail = take_checked(&mut sub, 10, &BTreeMap::from([(1, 30)])).await;
    assert_eq!(tail[&1], (30..40).collect::<Vec<_>>());
    assert_eq!(sub.metrics().records_delivered, 70);
    // Positions reach the shard.
    let d = &e.shards[0].data;
    until(|| {
        d.positions
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.partition == 1 && p.next_offset == 40)
    })
    .await;
    sub.close().await;
    c.close().await;
}

#[tokio::test]
async fn a_shard_crash_mid_stream_resumes_with_offsets_without_gap_or_duplicate() {
    let data = ShardData::default();
    data.replay.store(5, Ordering::Relaxed);
    let e = env(2, 2, data.clone());
    let c = client(&e).await;
    // ~1000 records of ~220 bytes per partition: far more than the 64 KiB buffer, so the
    // shard is mid-stream when it dies.
    fill(&e.hub.log, 2, 1000);
    let cfg = sibyl_sdk::SubscriptionConfig::default()
        .buffer_bytes(64 * 1024)
        .unwrap();
    let mut sub = guard(
        c.subscribe(STREAM)
            .start(Start::Earliest)
            .config(cfg)
            .open(),
    )
    .await
    .unwrap();
    let mut first = BTreeMap::from([(0, 0), (1, 0)]);
    let seen = take_checked(&mut sub, 300, &first).await;
    let mut states = c.watch_state();
    let attached = c.shard_endpoint().unwrap();
    // The shard crashes (closes the connection with INTERNAL) with records still to send.
    e.shards
        .iter()
        .find(|s| s.endpoint() == attached)
        .unwrap()
        .close_sessions(ErrorCode::Internal);
    wait_state(&mut states, |s| {
        matches!(s, sibyl_sdk::ConnectionState::Attached { endpoint, .. } if *endpoint != attached)
    })
    .await;
    for (p, offs) in &seen {
        first.insert(*p, offs.last().unwrap() + 1);
    }
    let rest = take_checked(&mut sub, 1700, &first).await;
    let total: usize = seen.values().chain(rest.values()).map(Vec::len).sum();
    assert_eq!(total, 2000);
    for p in 0..2 {
        let last = rest.get(&p).and_then(|v| v.last()).or(seen[&p].last());
        assert_eq!(last, Some(&999), "partition {p} complete");
    }
    let m = sub.metrics();
    assert_eq!(m.reconnects, 1);
    assert!(m.duplicates_dropped >= 5, "the replays were dropped: {m:?}");
    let subs = data.subscribes.lock().unwrap().clone();
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0].start, Start::Earliest);
    let Start::Offsets(resume) = &subs[1].start else {
        panic!("re-subscribed with {:?}", subs[1].start);
    };
    assert_eq!(resume.len(), 2, "every partition seen is in the resume map");
    assert!(
        resume.values().sum::<u64>() >= 300,
        "resumed after what the app consumed"
    );
    assert_eq!(subs[0].sub_id, subs[1].sub_id);
    // Nothing else is pending: the next record is a new one.
    fill(&e.hub.log, 1, 1);
    let more = take_checked(&mut sub, 1, &BTreeMap::from([(0, 1000)])).await;
    assert_eq!(more[&0], [1000]);
    sub.close().await;
    c.close().await;
}

#[tokio::test]
async fn go_away_moves_the_subscription_to_another_shard_seamlessly() {
    let data = ShardData::default();
    data.replay.store(3, Ordering::Relaxed);
    let e = env(1, 2, data.clone());
    let c = client(&e).await;
    fill(&e.hub.log, 1, 50);
    let mut sub = guard(c.subscribe(STREAM).start(Start::Earliest).open())
        .await
        .unwrap();
    let first = take_checked(&mut sub, 20, &BTreeMap::from([(0, 0)])).await;
    assert_eq!(first[&0].last(), Some(&19));
    let before = c.shard_endpoint().unwrap();
    let mut states = c.watch_state();
    let draining = e.shards.iter().find(|s| s.endpoint() == before).unwrap();
    guard(draining.go_away()).await;
    wait_state(&mut states, |s| {
        matches!(s, sibyl_sdk::ConnectionState::Attached { endpoint, .. } if *endpoint != before)
    })
    .await;
    // The draining connection is closed once the new session is attached: these come from
    // the new shard.
    fill(&e.hub.log, 1, 50);
    let rest = take_checked(&mut sub, 80, &BTreeMap::from([(0, 20)])).await;
    assert_eq!(rest[&0].last(), Some(&99));
    assert_eq!(sub.metrics().reconnects, 1);
    let subs = data.subscribes.lock().unwrap().clone();
    assert!(matches!(&subs[1].start, Start::Offsets(m) if m[&0] >= 20));
    sub.close().await;
    c.close().await;
}

#[tokio::test]
async fn an_unknown_stream_fails_open_with_a_typed_error() {
    let e = env(1, 1, ShardData::default());
    let c = client(&e).await;
    let err = guard(c.subscribe("nope").open()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SubscribeError::Rejected {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.retryable());
    c.close().await;
}

#[tokio::test]
async fn subscription_is_a_stream_usable_with_combinators() {
    let e = env(1, 1, ShardData::default());
    let c = client(&e).await;
    fill(&e.hub.log, 1, 5);
    let sub = guard(c.subscribe(STREAM).start(Start::Earliest).open())
        .await
        .unwrap();
    let got: Vec<u64> = guard(sub.take(5).map_ok(|r| r.offset).try_collect())
        .await
        .unwrap();
    assert_eq!(got, [0, 1, 2, 3, 4]);
    c.close().await;
}
