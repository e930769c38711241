//! The data plane across real processes: publishing on the hub over raw quinn + proto frames,
//! subscriptions on shards (every start kind, tail, reactive fetch), crash safety of acked
//! records, resume after a shard SIGKILL, bounded memory with a stalled consumer, and
//! consumer groups (hand-over, rate-aware assignment from forecasts).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use sibyl_proto::frame::{
    Action, Assignment, Fetch, Forecast, Mode, NewRecordRef, PartitionForecast, PartitionOpen,
    Position, Produce, ProduceAck, PublishOpen, Record, Start, Subscribe, Ticket,
};
use sibyl_proto::{ErrorCode, Frame};
use support::*;

/// One group, one shard; stream `t` (2 partitions, fsync before ack, 1 KiB payloads).
const ONE_SHARD: &str = "[[shards.groups]]\nid = 0\nshards = 1\n\
    [[streams]]\nname = \"t\"\npartitions = 2\ndurability = \"always\"\nmax_payload = 1024\n";

/// Stream `t` of one group with two shards (for the failover test); partition 1 carries
/// [`big_payload`]s.
const TWO_SHARDS: &str = "[[shards.groups]]\nid = 0\nshards = 2\n\
    [[streams]]\nname = \"t\"\npartitions = 2\ndurability = \"never\"\nmax_payload = 8192\n";

/// Payloads of 2.4–5.9 KB: large enough that shards read them with raw store-link reads.
fn big_payload(i: u64) -> Vec<u8> {
    let len = 2_400 + (i % 37) as usize * 97;
    (0..len)
        .map(|j| (i as usize).wrapping_mul(31).wrapping_add(j) as u8)
        .collect()
}

/// Publishes `n` [`big_payload`] records to partition `p`, `per` per batch, and waits for
/// their acks.
async fn publish_big(
    send: &mut SendStream,
    recv: &mut Reader,
    seq: &mut u64,
    p: u32,
    n: u64,
    per: u64,
) {
    let mut batches = 0;
    for from in (0..n).step_by(per as usize) {
        let pay: Vec<Vec<u8>> = (from..(from + per).min(n)).map(big_payload).collect();
        *seq += 1;
        let recs = pay.iter().map(|b| NewRecordRef {
            timestamp: 0,
            key: b"",
            payload: b,
        });
        send_frame(send, Frame::Produce(Produce::new(*seq, p, recs).unwrap())).await;
        batches += 1;
    }
    for _ in 0..batches {
        match recv.next().await {
            Some(Frame::ProduceAck(a)) => assert_eq!(a.partition, p),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

fn payload(p: u32, i: u64) -> Vec<u8> {
    format!("p{p}-record-{i:08}-{}", "x".repeat((i % 37) as usize)).into_bytes()
}

/// Opens a publish stream on a hub connection: the answer to `PublishOpen`.
async fn publish_open(conn: &Connection, stream: &str) -> (SendStream, RecvStream, Frame) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send_frame(&mut send, Frame::PublishOpen(PublishOpen::new(stream))).await;
    let f = recv_frame(&mut recv).await.expect("answer to PublishOpen");
    (send, recv, f)
}

/// A hub connection with a ticket wanting `t` for publish and subscribe.
async fn hub_conn(ep: &Endpoint, gw: &Gateway, key: &str) -> (Connection, Ticket) {
    let (conn, t) = ask_hub(
        ep,
        gw.hub,
        hello(key, &[("t", Action::Publish), ("t", Action::Subscribe)]),
    )
    .await;
    (conn, t.expect("ticket"))
}

type Reader = StreamReader;

/// Publishes `n` records to partition `p` in batches of `per`, returns the acks.
#[allow(clippy::too_many_arguments)]
async fn publish(
    send: &mut SendStream,
    recv: &mut Reader,
    seq: &mut u64,
    p: u32,
    from: u64,
    n: u64,
    per: u64,
    ts: impl Fn(u64) -> u64,
) -> Vec<ProduceAck> {
    let mut sent = 0;
    let mut batches = 0;
    while sent < n {
        let k = per.min(n - sent);
        let pay: Vec<Vec<u8>> = (from + sent..from + sent + k)
            .map(|i| payload(p, i))
            .collect();
        *seq += 1;
        let recs = pay.iter().enumerate().map(|(j, b)| NewRecordRef {
            timestamp: ts(from + sent + j as u64),
            key: b"",
            payload: b,
        });
        send_frame(send, Frame::Produce(Produce::new(*seq, p, recs).unwrap())).await;
        sent += k;
        batches += 1;
    }
    let mut acks = Vec::new();
    for _ in 0..batches {
        match recv.next().await {
            Some(Frame::ProduceAck(a)) => acks.push(a),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    acks
}

/// A shard session: the attached connection.
async fn attach_shard(ep: &Endpoint, addr: std::net::SocketAddr, t: &Ticket) -> Connection {
    let s = attach(ep, addr, t, None).await;
    assert!(matches!(s.first, Some(Frame::Attached(_))), "{:?}", s.first);
    // Keep the session stream open for the session's lifetime.
    std::mem::forget(s.send);
    s.conn
}

/// Opens a subscription: returns the control stream, the Grant and the first Assignment.
async fn subscribe(
    conn: &Connection,
    sub_id: u32,
    start: Start,
    group: Option<&str>,
    mode: Mode,
) -> (SendStream, Reader, Assignment) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send_frame(
        &mut send,
        Frame::Subscribe(Subscribe {
            sub_id,
            stream: "t".into(),
            start,
            group: group.map(str::to_owned),
            mode,
        }),
    )
    .await;
    let mut r = Reader::new(recv);
    match r.next().await {
        Some(Frame::Grant(g)) => assert!(g.rate_records_per_s > 0 && g.burst > 0),
        other => panic!("expected a Grant, got {other:?}"),
    }
    let a = next_assignment(&mut r).await;
    (send, r, a)
}

async fn next_assignment(r: &mut Reader) -> Assignment {
    loop {
        match r.next().await {
            Some(Frame::Assignment(a)) => return a,
            Some(Frame::Grant(_)) => continue,
            other => panic!("expected an Assignment, got {other:?}"),
        }
    }
}

/// Accepts the next partition stream: its `PartitionOpen` and a reader.
async fn accept_partition(conn: &Connection) -> (PartitionOpen, Reader) {
    let recv = tokio::time::timeout(PATIENCE, conn.accept_uni())
        .await
        .expect("partition stream in time")
        .unwrap();
    let mut r = Reader::new(recv);
    match r.next().await {
        Some(Frame::PartitionOpen(o)) => (o, r),
        other => panic!("expected PartitionOpen, got {other:?}"),
    }
}

/// Reads records until `n` were received; returns them.
async fn read_records(r: &mut Reader, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    while out.len() < n {
        match r.next().await {
            Some(Frame::Records(b)) => out.extend(b.to_records()),
            other => panic!("expected Records, got {other:?}"),
        }
    }
    out
}

fn check_records(p: u32, from: u64, recs: &[Record]) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.offset, from + i as u64, "offsets are contiguous");
        assert_eq!(
            r.payload,
            payload(p, r.offset),
            "payload of offset {}",
            r.offset
        );
    }
}

#[test]
fn publish_acks_in_order_and_refuses_what_it_must() {
    let mut gw = Gateway::start(ONE_SHARD, 1);
    let rt = runtime();
    let ep = rt.block_on(async { client(&gw.ca()) });
    rt.block_on(async {
        let (conn, _) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let (mut send, recv, first) = publish_open(&conn, "t").await;
        match first {
            Frame::PublishAccepted(a) => {
                assert_eq!(a.partitions, 2);
                assert!(a.max_frame >= 1 << 20);
            }
            other => panic!("{other:?}"),
        }
        let mut recv = Reader::new(recv);
        let mut seq = 0;
        for round in 0..3u64 {
            for p in 0..2 {
                let acks =
                    publish(&mut send, &mut recv, &mut seq, p, round * 50, 50, 10, |_| 0).await;
                let offsets: Vec<(u64, u32)> =
                    acks.iter().map(|a| (a.base_offset, a.count)).collect();
                let want: Vec<(u64, u32)> = (0..5).map(|b| (round * 50 + b * 10, 10)).collect();
                assert_eq!(offsets, want);
                assert!(acks.iter().all(|a| a.partition == p));
                assert!(acks.windows(2).all(|w| w[0].seq < w[1].seq));
            }
        }
        // A bad partition and an oversized payload are answered in seq order, the stream
        // stays usable.
        let big = vec![0u8; 2000];
        let ok = b"fine".to_vec();
        let batches = [(seq + 1, 9u32, &ok), (seq + 2, 0, &big), (seq + 3, 1, &ok)];
        for (s, p, b) in batches {
            let r = [NewRecordRef {
                timestamp: 0,
                key: b"",
                payload: b,
            }];
            send_frame(&mut send, Frame::Produce(Produce::new(s, p, r).unwrap())).await;
        }
        match recv.next().await {
            Some(Frame::ProduceError(e)) => {
                assert_eq!((e.seq, e.code), (seq + 1, ErrorCode::NotFound))
            }
            other => panic!("{other:?}"),
        }
        match recv.next().await {
            Some(Frame::ProduceError(e)) => {
                assert_eq!((e.seq, e.code), (seq + 2, ErrorCode::LimitExceeded))
            }
            other => panic!("{other:?}"),
        }
        match recv.next().await {
            Some(Frame::ProduceAck(a)) => {
                assert_eq!((a.seq, a.partition, a.base_offset), (seq + 3, 1, 150))
            }
            other => panic!("{other:?}"),
        }
        // A stream this Hello did not want: FORBIDDEN, whether it exists or not (a client
        // learns nothing of streams it may not use).
        let (_, _, f) = publish_open(&conn, "nope").await;
        assert!(
            matches!(f, Frame::ProduceError(e) if e.code == ErrorCode::Forbidden && e.seq == 0)
        );
        // Wanted and allowed, but no such stream: NOT_FOUND.
        let (conn_nope, t) = ask_hub(
            &ep,
            gw.hub,
            hello(&gw.dev_key, &[("nope", Action::Publish)]),
        )
        .await;
        t.expect("ticket");
        let (_, _, f) = publish_open(&conn_nope, "nope").await;
        assert!(matches!(f, Frame::ProduceError(e) if e.code == ErrorCode::NotFound && e.seq == 0));
        // Forbidden: this Hello did not want `t` for publishing.
        let (conn2, t) =
            ask_hub(&ep, gw.hub, hello(&gw.dev_key, &[("t", Action::Subscribe)])).await;
        t.expect("ticket");
        let (_, _, f) = publish_open(&conn2, "t").await;
        assert!(matches!(f, Frame::ProduceError(e) if e.code == ErrorCode::Forbidden));
        // A key without publish scope cannot even ask for it.
        let key = tokio::task::block_in_place(|| gw.new_api_key("reader", "t:subscribe"));
        // (The hub reloads its keys within a second: wait until it knows this one.)
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let (_, t) = ask_hub(&ep, gw.hub, hello(&key, &[("t", Action::Publish)])).await;
            let code = t.unwrap_err().code;
            if code == ErrorCode::Unauthenticated && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            assert_eq!(code, ErrorCode::Forbidden);
            break;
        }
        // A non-increasing seq is a protocol violation.
        let r = [NewRecordRef {
            timestamp: 0,
            key: b"",
            payload: b"x",
        }];
        send_frame(&mut send, Frame::Produce(Produce::new(1, 0, r).unwrap())).await;
        assert_eq!(close_code(&conn).await, ErrorCode::ProtocolViolation);
    });
    let _ = &mut gw;
}

#[test]
fn subscribe_every_start_kind_tail_and_fetch() {
    let gw = Gateway::start(ONE_SHARD, 1);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let (conn, t) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let (mut send, recv, _) = publish_open(&conn, "t").await;
        let mut recv = Reader::new(recv);
        let mut seq = 0;
        // Partition 0: 100 records with timestamps 1000 + offset.
        publish(&mut send, &mut recv, &mut seq, 0, 0, 100, 30, |i| 1000 + i).await;
        let shard = attach_shard(&ep, gw.shard_of(0).addr, &t).await;

        let starts = [
            (Start::Earliest, 0),
            (Start::Offsets([(0, 42)].into_iter().collect()), 42),
            (Start::Offsets([(0, 1000)].into_iter().collect()), 100),
            (Start::Timestamp(1050), 50),
        ];
        for (i, (start, at)) in starts.into_iter().enumerate() {
            let sub_id = i as u32 + 1;
            let (ctl, _r, a) = subscribe(&shard, sub_id, start, None, Mode::Predictive).await;
            assert_eq!(a.sub_id, sub_id);
            let parts: BTreeMap<u32, u64> = a
                .partitions
                .iter()
                .map(|p| (p.partition, p.start_offset))
                .collect();
            assert_eq!(parts.len(), 2, "a lone subscriber gets every partition");
            assert_eq!(parts[&0], at);
            assert_eq!(parts[&1], 0);
            let mut streams = HashMap::new();
            for _ in 0..2 {
                let (open, r) = accept_partition(&shard).await;
                assert_eq!((open.sub_id, open.epoch), (sub_id, a.epoch));
                streams.insert(open.partition, r);
            }
            if at < 100 {
                let r = streams.get_mut(&0).unwrap();
                let recs = read_records(r, (100 - at) as usize).await;
                check_records(0, at, &recs);
                assert!(recs.iter().all(|r| r.timestamp == 1000 + r.offset));
            }
            drop(ctl);
        }
        // Latest: starts at the end, then tails new publishes on both partitions.
        let (_ctl, _r, a) = subscribe(&shard, 10, Start::Latest, None, Mode::Predictive).await;
        assert!(
            a.partitions
                .iter()
                .all(|p| p.start_offset == if p.partition == 0 { 100 } else { 0 })
        );
        let mut streams = HashMap::new();
        for _ in 0..2 {
            let (open, r) = accept_partition(&shard).await;
            streams.insert(open.partition, r);
        }
        publish(&mut send, &mut recv, &mut seq, 0, 100, 25, 10, |_| 0).await;
        publish(&mut send, &mut recv, &mut seq, 1, 0, 5, 5, |_| 0).await;
        let recs = read_records(streams.get_mut(&0).unwrap(), 25).await;
        check_records(0, 100, &recs);
        let recs = read_records(streams.get_mut(&1).unwrap(), 5).await;
        check_records(1, 0, &recs);

        // Reactive: nothing until Fetch, then exactly what was asked.
        let (mut ctl, _r, _) = subscribe(&shard, 20, Start::Earliest, None, Mode::Reactive).await;
        let mut streams = HashMap::new();
        for _ in 0..2 {
            let (open, r) = accept_partition(&shard).await;
            streams.insert(open.partition, r);
        }
        send_frame(
            &mut ctl,
            Frame::Fetch(Fetch {
                partition: 0,
                max_records: 7,
            }),
        )
        .await;
        let recs = read_records(streams.get_mut(&0).unwrap(), 7).await;
        assert_eq!(recs.len(), 7, "exactly max_records");
        check_records(0, 0, &recs);
        send_frame(
            &mut ctl,
            Frame::Fetch(Fetch {
                partition: 0,
                max_records: 3,
            }),
        )
        .await;
        let recs = read_records(streams.get_mut(&0).unwrap(), 3).await;
        assert_eq!(recs.len(), 3);
        check_records(0, 7, &recs);
        send_frame(
            &mut ctl,
            Frame::Position(Position {
                partition: 0,
                next_offset: 10,
                epoch: None,
            }),
        )
        .await;
    });
}

#[test]
fn acked_records_survive_hub_sigkill() {
    let mut gw = Gateway::start(ONE_SHARD, 1);
    let key = gw.dev_key.clone();
    let rt = runtime();
    let mut acked: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for cycle in 0..3u64 {
        let from = cycle * 100_000;
        let per = 20;
        let got = rt.block_on(async {
            let ep = client(&gw.ca());
            let (conn, _) = hub_conn(&ep, &gw, &key).await;
            let (mut send, recv, _) = publish_open(&conn, "t").await;
            let mut recv = Reader::new(recv);
            let mut seq = 0;
            let acks = publish(&mut send, &mut recv, &mut seq, 0, from, 200, per, |_| 0).await;
            // More batches in flight while the hub dies: they may or may not land.
            for k in 0..20u64 {
                let b = payload(0, from + 50_000 + k);
                let r = [NewRecordRef {
                    timestamp: 0,
                    key: b"",
                    payload: &b,
                }];
                seq += 1;
                send_frame(&mut send, Frame::Produce(Produce::new(seq, 0, r).unwrap())).await;
            }
            acks
        });
        for (k, a) in got.iter().enumerate() {
            for j in 0..u64::from(a.count) {
                acked.insert(a.base_offset + j, payload(0, from + k as u64 * per + j));
            }
        }
        let dir = gw.kill9();
        gw = Gateway::start_in(dir, ONE_SHARD, 1);
        assert!(gw.dev_key.is_empty(), "a restart creates no new key");
        // Read back everything acknowledged, byte for byte.
        rt.block_on(async {
            let ep = client(&gw.ca());
            let (conn, t) = hub_conn(&ep, &gw, &key).await;
            let shard = attach_shard(&ep, gw.shard_of(0).addr, &t).await;
            let (_ctl, _r, _) = subscribe(&shard, 1, Start::Earliest, None, Mode::Predictive).await;
            let mut r = loop {
                let (open, r) = accept_partition(&shard).await;
                if open.partition == 0 {
                    break r;
                }
            };
            let last = *acked.keys().last().unwrap();
            let mut seen = BTreeMap::new();
            while seen.keys().last().is_none_or(|&o| o < last) {
                for rec in read_records(&mut r, 1).await {
                    seen.insert(rec.offset, rec.payload);
                }
            }
            for (off, want) in &acked {
                assert_eq!(seen.get(off), Some(want), "acked offset {off}");
            }
            conn.close(0u32.into(), b"");
        });
    }
}

#[test]
fn resume_on_another_shard_after_sigkill_has_no_gap_or_duplicate() {
    let gw = Gateway::start(TWO_SHARDS, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let (conn, t) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let (mut send, recv, _) = publish_open(&conn, "t").await;
        let mut recv = Reader::new(recv);
        let mut seq = 0;
        publish(&mut send, &mut recv, &mut seq, 0, 0, 3000, 100, |_| 0).await;
        // Partition 1: large records, which shards read raw (segment bytes over the link).
        publish_big(&mut send, &mut recv, &mut seq, 1, 600, 20).await;
        let first = gw.ready[0];
        let other = gw.ready[1];
        let shard = attach_shard(&ep, first.addr, &t).await;
        let (_ctl, _r, _) = subscribe(&shard, 1, Start::Earliest, None, Mode::Predictive).await;
        let (mut r, mut r1) = (None, None);
        while r.is_none() || r1.is_none() {
            let (open, rd) = accept_partition(&shard).await;
            if open.partition == 0 {
                r = Some(rd);
            } else {
                r1 = Some(rd);
            }
        }
        let (mut r, mut r1) = (r.unwrap(), r1.unwrap());
        let mut got = read_records(&mut r, 500).await;
        let mut got1 = read_records(&mut r1, 150).await;
        // The shard dies mid-stream.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(first.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let next = got.last().unwrap().offset + 1;
        let next1 = got1.last().unwrap().offset + 1;
        let shard2 = attach_shard(&ep, other.addr, &t).await;
        let start = Start::Offsets([(0, next), (1, next1)].into_iter().collect());
        let (_ctl2, _r2, a) = subscribe(&shard2, 1, start, None, Mode::Predictive).await;
        let start_of = |p: u32| {
            a.partitions
                .iter()
                .find(|x| x.partition == p)
                .unwrap()
                .start_offset
        };
        assert_eq!((start_of(0), start_of(1)), (next, next1));
        let (mut r2, mut r21) = (None, None);
        while r2.is_none() || r21.is_none() {
            let (open, rd) = accept_partition(&shard2).await;
            if open.partition == 0 {
                r2 = Some(rd);
            } else {
                r21 = Some(rd);
            }
        }
        got.extend(read_records(&mut r2.unwrap(), (3000 - next) as usize).await);
        got1.extend(read_records(&mut r21.unwrap(), (600 - next1) as usize).await);
        assert_eq!(got.len(), 3000);
        check_records(0, 0, &got);
        assert_eq!(got1.len(), 600);
        for (i, r) in got1.iter().enumerate() {
            assert_eq!(r.offset, i as u64, "offsets are contiguous");
            assert!(
                r.payload == big_payload(r.offset),
                "payload of offset {}",
                r.offset
            );
        }
    });
}

#[test]
fn a_stalled_consumer_keeps_shard_memory_bounded() {
    let gw = Gateway::start(ONE_SHARD.replace("always", "never").as_str(), 1);
    let shard_pid = gw.shard_of(0).pid;
    let rss = |pid: i32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let (conn, t) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let shard = attach_shard(&ep, gw.shard_of(0).addr, &t).await;
        // Subscribed but never reading the partition streams.
        let (_ctl, _r, _) = subscribe(&shard, 1, Start::Earliest, None, Mode::Predictive).await;
        let before = rss(shard_pid);
        let (mut send, recv, _) = publish_open(&conn, "t").await;
        let mut recv = Reader::new(recv);
        let mut seq = 0u64;
        // ~128 MiB of 1000-byte records.
        let body = vec![7u8; 1000];
        let mut outstanding = 0;
        for _ in 0..128 {
            let recs = (0..1000).map(|_| NewRecordRef {
                timestamp: 0,
                key: b"",
                payload: &body,
            });
            seq += 1;
            send_frame(
                &mut send,
                Frame::Produce(Produce::new(seq, (seq % 2) as u32, recs).unwrap()),
            )
            .await;
            outstanding += 1;
            if outstanding == 16 {
                for _ in 0..outstanding {
                    assert!(matches!(recv.next().await, Some(Frame::ProduceAck(_))));
                }
                outstanding = 0;
            }
        }
        for _ in 0..outstanding {
            assert!(matches!(recv.next().await, Some(Frame::ProduceAck(_))));
        }
        let after = rss(shard_pid);
        assert!(
            after < before + (64 << 20),
            "shard RSS grew from {before} to {after} with a stalled consumer"
        );
        drop(shard);
    });
}

#[test]
fn consumer_group_members_split_and_hand_over() {
    let gw = Gateway::start(
        ONE_SHARD
            .replace("partitions = 2", "partitions = 4")
            .as_str(),
        1,
    );
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let (_conn, t) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let a_conn = attach_shard(&ep, gw.shard_of(0).addr, &t).await;
        let (_, t2) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let b_conn = attach_shard(&ep, gw.shard_of(0).addr, &t2).await;
        let parts =
            |a: &Assignment| -> Vec<u32> { a.partitions.iter().map(|p| p.partition).collect() };

        let (mut a_ctl, mut a_r, a1) =
            subscribe(&a_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        assert_eq!(parts(&a1), vec![0, 1, 2, 3]);
        let (b_ctl, mut b_r, b1) =
            subscribe(&b_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        // B joins: A gives two partitions up first; B gets them only after A's positions.
        assert!(parts(&b1).is_empty(), "{b1:?}");
        let a2 = next_assignment(&mut a_r).await;
        assert!(a2.epoch > a1.epoch);
        assert_eq!(parts(&a2).len(), 2);
        let revoked: Vec<u32> = (0..4).filter(|p| !parts(&a2).contains(p)).collect();
        for (i, p) in revoked.iter().enumerate() {
            send_frame(
                &mut a_ctl,
                Frame::Position(Position {
                    partition: *p,
                    next_offset: 0,
                    epoch: None,
                }),
            )
            .await;
            let b = next_assignment(&mut b_r).await;
            assert_eq!(parts(&b), revoked[..=i].to_vec());
            // Never owned twice.
            assert!(parts(&b).iter().all(|p| !parts(&a2).contains(p)));
        }
        // A leaves: B owns everything.
        a_ctl.finish().unwrap();
        let b = next_assignment(&mut b_r).await;
        assert_eq!(parts(&b), vec![0, 1, 2, 3]);
        drop(b_ctl);
    });
}

#[test]
fn consumer_group_spreads_forecast_load_not_partition_count() {
    let gw = Gateway::start(
        ONE_SHARD
            .replace("partitions = 2", "partitions = 4")
            .as_str(),
        1,
    );
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let (_conn, t) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let a_conn = attach_shard(&ep, gw.shard_of(0).addr, &t).await;
        let (_, t2) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let b_conn = attach_shard(&ep, gw.shard_of(0).addr, &t2).await;
        let parts = |a: &Assignment| -> Vec<u32> {
            let mut v: Vec<u32> = a.partitions.iter().map(|p| p.partition).collect();
            v.sort_unstable();
            v
        };
        let position = |partition| {
            Frame::Position(Position {
                partition,
                next_offset: 0,
                epoch: None,
            })
        };

        let (mut a_ctl, mut a_r, a1) =
            subscribe(&a_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        assert_eq!(parts(&a1), vec![0, 1, 2, 3]);
        let (mut b_ctl, mut b_r, b1) =
            subscribe(&b_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        assert!(parts(&b1).is_empty(), "{b1:?}");
        // Without forecasts, loads are equal: two partitions move to B after A's positions.
        let a2 = next_assignment(&mut a_r).await;
        let to_b: Vec<u32> = (0..4).filter(|p| !parts(&a2).contains(p)).collect();
        assert_eq!(to_b.len(), 2);
        for p in &to_b {
            send_frame(&mut a_ctl, position(*p)).await;
            next_assignment(&mut b_r).await;
        }
        // B predicts its partitions hot (100 and 50 records/s), A's cold (1 each): B holds
        // nearly all the load, so its 50/s partition moves to A and B keeps only the hottest
        // (by count 3 against 1; a count-balanced split would stay 2 and 2).
        let (hot, warm) = (to_b[0], to_b[1]);
        let rate = |p: u32| match p {
            p if p == hot => 100,
            p if p == warm => 50,
            _ => 1,
        };
        let forecast = Forecast {
            partitions: (0..4)
                .map(|p| PartitionForecast {
                    partition: p,
                    records_per_s: rate(p),
                    bytes_per_s: rate(p) * 1000,
                })
                .collect(),
            buffer_capacity_bytes: 1 << 20,
        };
        send_frame(&mut b_ctl, Frame::Forecast(forecast)).await;
        let b3 = tokio::time::timeout(PATIENCE, next_assignment(&mut b_r))
            .await
            .expect("the forecast moves a partition");
        assert_eq!(parts(&b3), vec![hot], "{b3:?}");
        // Handed over only after B's position: A gets it then, never while B has it.
        send_frame(&mut b_ctl, position(warm)).await;
        let a3 = next_assignment(&mut a_r).await;
        assert!(a3.epoch > a2.epoch);
        let mut expected: Vec<u32> = parts(&a2);
        expected.push(warm);
        expected.sort_unstable();
        assert_eq!(parts(&a3), expected);
        drop((a_ctl, b_ctl));
    });
}

/// One group of two shards; stream `t` of 4 partitions; hand-overs wait for the previous
/// owner's final position (a deadline far beyond any test step).
const GROUP_ON_TWO_SHARDS: &str = "[[shards.groups]]\nid = 0\nshards = 2\n\
    [subscribe]\nhandover_timeout = \"120s\"\n\
    [[streams]]\nname = \"t\"\npartitions = 4\ndurability = \"never\"\nmax_payload = 1024\n";

fn sorted_parts(a: &Assignment) -> Vec<u32> {
    let mut v: Vec<u32> = a.partitions.iter().map(|p| p.partition).collect();
    v.sort_unstable();
    v
}

fn start_of(a: &Assignment, p: u32) -> u64 {
    a.partitions
        .iter()
        .find(|x| x.partition == p)
        .map(|x| x.start_offset)
        .unwrap_or_else(|| panic!("partition {p} not in {a:?}"))
}

/// Accepts partition streams until it has the one of `a.epoch` for every partition of `a`
/// (streams of older epochs are finished by the shard and dropped here).
async fn streams_of(conn: &Connection, a: &Assignment) -> HashMap<u32, Reader> {
    let mut out = HashMap::new();
    while out.len() < a.partitions.len() {
        let (open, r) = accept_partition(conn).await;
        assert!(open.epoch <= a.epoch, "{open:?} after {a:?}");
        if open.epoch == a.epoch {
            out.insert(open.partition, r);
        }
    }
    out
}

/// Members on different shards split the partitions with no partition owned twice; a SIGKILLed
/// shard's partitions continue on the survivor without gap; a member on the restarted shard
/// (same shard-local member id as the survivor's) joins and leaves cleanly.
#[test]
fn consumer_group_members_on_different_shards_never_share_a_partition() {
    let mut gw = Gateway::start(GROUP_ON_TWO_SHARDS, 2);
    let (sa, sb) = (gw.ready[0], gw.ready[1]);
    assert_ne!(sa.pid, sb.pid);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let (conn, t) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let (mut send, recv, _) = publish_open(&conn, "t").await;
        let mut recv = Reader::new(recv);
        let mut seq = 0;
        for p in 0..4 {
            publish(&mut send, &mut recv, &mut seq, p, 0, 100, 50, |_| 0).await;
        }
        // A on the first shard, B on the second.
        let a_conn = attach_shard(&ep, sa.addr, &t).await;
        let (_, t2) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let b_conn = attach_shard(&ep, sb.addr, &t2).await;
        let position = |partition, next_offset| {
            Frame::Position(Position {
                partition,
                next_offset,
                epoch: None,
            })
        };

        // A alone owns everything and consumes it all.
        let (mut a_ctl, mut a_r, a1) =
            subscribe(&a_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        assert_eq!(sorted_parts(&a1), vec![0, 1, 2, 3]);
        let mut a_streams = streams_of(&a_conn, &a1).await;
        for p in 0..4 {
            let recs = read_records(a_streams.get_mut(&p).unwrap(), 100).await;
            check_records(p, 0, &recs);
            send_frame(&mut a_ctl, position(p, 100)).await;
        }

        // B joins on the other shard: the hub takes two partitions from A; B gets each
        // once A's final position for it is known, from that position.
        let (mut b_ctl, mut b_r, b1) =
            subscribe(&b_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        let a2 = next_assignment(&mut a_r).await;
        assert!(a2.epoch > a1.epoch);
        let kept = sorted_parts(&a2);
        assert_eq!(kept.len(), 2, "{a2:?}");
        let moved: Vec<u32> = (0..4).filter(|p| !kept.contains(p)).collect();
        // (B's first Assignment is empty unless the hub's later push already replaced it.)
        assert!(
            sorted_parts(&b1).iter().all(|p| moved.contains(p)),
            "B got a partition A still owns: {b1:?} vs {a2:?}"
        );
        for p in &moved {
            send_frame(&mut a_ctl, position(*p, 100)).await;
        }
        let mut b2 = b1;
        while sorted_parts(&b2) != moved {
            b2 = next_assignment(&mut b_r).await;
            assert!(
                sorted_parts(&b2).iter().all(|p| moved.contains(p)),
                "B got a partition A still owns: {b2:?} vs {a2:?}"
            );
        }
        for p in &moved {
            assert_eq!(start_of(&b2, *p), 100, "no gap, no duplicate on hand-over");
        }
        let mut union: Vec<u32> = kept.iter().chain(&moved).copied().collect();
        union.sort_unstable();
        assert_eq!(union, vec![0, 1, 2, 3], "every partition exactly once");

        // Both consume new records of their own partitions.
        for p in 0..4 {
            publish(&mut send, &mut recv, &mut seq, p, 100, 50, 50, |_| 0).await;
        }
        let mut a_streams = streams_of(&a_conn, &a2).await;
        for p in &kept {
            assert_eq!(start_of(&a2, *p), 100);
            let recs = read_records(a_streams.get_mut(p).unwrap(), 20).await;
            check_records(*p, 100, &recs[..20]);
            send_frame(&mut a_ctl, position(*p, 120)).await;
        }
        let mut b_streams = streams_of(&b_conn, &b2).await;
        for p in &moved {
            let recs = read_records(b_streams.get_mut(p).unwrap(), 50).await;
            check_records(*p, 100, &recs);
            send_frame(&mut b_ctl, position(*p, 150)).await;
        }

        // A's shard dies: the hub hands A's partitions to B, from the last position it
        // knows (120, or 100 if A's last report was still in flight): no gap.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(sa.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let b3 = next_assignment(&mut b_r).await;
        assert_eq!(sorted_parts(&b3), vec![0, 1, 2, 3], "{b3:?}");
        let mut b_streams = streams_of(&b_conn, &b3).await;
        for p in &kept {
            let from = start_of(&b3, *p);
            assert!(from == 100 || from == 120, "{b3:?}");
            let recs = read_records(b_streams.get_mut(p).unwrap(), (150 - from) as usize).await;
            check_records(*p, from, &recs);
            assert_eq!(recs.last().unwrap().offset, 149);
        }
        for p in 0..4 {
            send_frame(&mut b_ctl, position(p, 150)).await;
        }

        // The hub restarts the killed shard. A member there (that shard's member id 1 again,
        // like B's, on a new store link) joins: B hands two partitions over at its final
        // positions. Then it leaves, and B gets them back from its last positions.
        let again = tokio::task::block_in_place(|| {
            gw.until(|l| {
                parse_ready(l).filter(|r| r.group == 0 && r.pid != sa.pid && r.pid != sb.pid)
            })
        });
        let (_, t3) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let c_conn = attach_shard(&ep, again.addr, &t3).await;
        let (mut c_ctl, mut c_r, c1) =
            subscribe(&c_conn, 1, Start::Earliest, Some("g"), Mode::Predictive).await;
        let b4 = next_assignment(&mut b_r).await;
        let b_kept = sorted_parts(&b4);
        assert_eq!(b_kept.len(), 2, "{b4:?}");
        let to_c: Vec<u32> = (0..4).filter(|p| !b_kept.contains(p)).collect();
        for p in &to_c {
            send_frame(&mut b_ctl, position(*p, 150)).await;
        }
        let mut c2 = c1;
        while sorted_parts(&c2) != to_c {
            c2 = next_assignment(&mut c_r).await;
            assert!(
                sorted_parts(&c2).iter().all(|p| to_c.contains(p)),
                "C got a partition B still owns: {c2:?} vs {b4:?}"
            );
        }
        for p in &to_c {
            assert_eq!(start_of(&c2, *p), 150, "{c2:?}");
        }
        for p in 0..4 {
            publish(&mut send, &mut recv, &mut seq, p, 150, 10, 10, |_| 0).await;
        }
        let mut c_streams = streams_of(&c_conn, &c2).await;
        for p in &to_c {
            let recs = read_records(c_streams.get_mut(p).unwrap(), 10).await;
            check_records(*p, 150, &recs);
            send_frame(&mut c_ctl, position(*p, 160)).await;
        }
        c_ctl.finish().unwrap();
        let b5 = next_assignment(&mut b_r).await;
        assert_eq!(sorted_parts(&b5), vec![0, 1, 2, 3], "{b5:?}");
        for p in &to_c {
            assert_eq!(
                start_of(&b5, *p),
                160,
                "continues at the leaver's last position"
            );
        }

        // A member whose connection just closes (its subscription task ends with it) leaves
        // the group too: B gets its partitions back from B's own final positions.
        let (_, t4) = hub_conn(&ep, &gw, &gw.dev_key).await;
        let d_conn = attach_shard(&ep, again.addr, &t4).await;
        let (_d_ctl, mut d_r, d1) =
            subscribe(&d_conn, 2, Start::Earliest, Some("g"), Mode::Predictive).await;
        let b6 = next_assignment(&mut b_r).await;
        let to_d: Vec<u32> = (0..4).filter(|p| !sorted_parts(&b6).contains(p)).collect();
        assert_eq!(to_d.len(), 2, "{b6:?}");
        for p in &to_d {
            send_frame(&mut b_ctl, position(*p, start_of(&b5, *p))).await;
        }
        let mut d2 = d1;
        while sorted_parts(&d2) != to_d {
            d2 = next_assignment(&mut d_r).await;
        }
        d_conn.close(0u32.into(), b"gone");
        let b7 = next_assignment(&mut b_r).await;
        assert_eq!(sorted_parts(&b7), vec![0, 1, 2, 3], "{b7:?}");
        for p in &to_d {
            assert_eq!(start_of(&b7, *p), start_of(&b5, *p), "{b7:?}");
        }
        drop((a_ctl, b_ctl, a_conn, c_conn));
    });
}
