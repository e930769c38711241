//! Predictive pre-fetch through a real shard with a raw client (seed 000): what the shard
//! pushes before the client consumes stays within the buffer the client advertised in its
//! `Forecast`, a partition without a forecast gets exactly its warm-up batch, and a `Position`
//! reopens the window (contiguous offsets throughout).

mod support;

use std::time::Duration;

use quinn::{Connection, Endpoint, SendStream};
use sibyl_proto::frame::{
    Action, Assignment, Forecast, Mode, NewRecordRef, PartitionForecast, Position, Produce,
    PublishOpen, Record, Start, Subscribe,
};
use sibyl_proto::{Codec, Frame};
use support::*;

/// One group, one shard; stream `t` (2 partitions).
const ONE_SHARD: &str = "[[shards.groups]]\nid = 0\nshards = 1\n\
    [[streams]]\nname = \"t\"\npartitions = 2\ndurability = \"never\"\nmax_payload = 2048\n";

/// Payload size: every record's `Records` body is larger than this.
const PAYLOAD: usize = 1000;
/// The warm-up batch of a newly assigned partition (`PrefetchConfig::default`).
const WARMUP: usize = 32;

/// A partition or publish stream's frames ([`StreamReader`] with this file's helpers).
struct Reader(StreamReader);

impl Reader {
    async fn next_within(&mut self, wait: Duration) -> Option<Frame> {
        self.0.next_within(wait).await
    }

    async fn next(&mut self) -> Frame {
        self.next_within(PATIENCE).await.expect("frame in time")
    }

    /// Records until none arrives for `quiet` (the shard holds back).
    async fn drain(&mut self, quiet: Duration) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(f) = self.next_within(quiet).await {
            match f {
                Frame::Records(b) => out.extend(b.to_records()),
                other => panic!("expected Records, got {other:?}"),
            }
        }
        out
    }
}

async fn publish(conn: &Connection, p: u32, n: u64) {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send_frame(&mut send, Frame::PublishOpen(PublishOpen::new("t"))).await;
    let mut r = Reader(StreamReader::new(recv));
    assert!(matches!(r.next().await, Frame::PublishAccepted(_)));
    let body = vec![b'x'; PAYLOAD];
    for seq in 1..=n.div_ceil(50) {
        let k = 50.min(n - (seq - 1) * 50);
        let recs = (0..k).map(|_| NewRecordRef {
            timestamp: 0,
            key: b"",
            payload: &body,
        });
        send_frame(
            &mut send,
            Frame::Produce(Produce::new(seq, p, recs).unwrap()),
        )
        .await;
        assert!(matches!(r.next().await, Frame::ProduceAck(_)));
    }
}

async fn session(ep: &Endpoint, gw: &Gateway) -> (Connection, Connection) {
    let (hub, t) = ask_hub(
        ep,
        gw.hub,
        hello(
            &gw.dev_key,
            &[("t", Action::Publish), ("t", Action::Subscribe)],
        ),
    )
    .await;
    let t = t.expect("ticket");
    let s = attach(ep, gw.shard_of(0).addr, &t, None).await;
    assert!(matches!(s.first, Some(Frame::Attached(_))), "{:?}", s.first);
    std::mem::forget(s.send);
    (hub, s.conn)
}

/// Subscribes (predictive, from the earliest offset) with `forecast` sent right after
/// `Subscribe` in the same write, so both reach the shard in one read: the shard plans a
/// `Forecast` that arrived with `Subscribe` before its first assignment (sent in two writes
/// under load they can arrive in two reads, and the assignment then carries no priorities);
/// returns the control stream and the first assignment.
async fn subscribe(shard: &Connection, forecast: Forecast) -> (SendStream, Reader, Assignment) {
    let (mut send, recv) = shard.open_bi().await.unwrap();
    let mut both = Vec::new();
    Frame::Subscribe(Subscribe {
        sub_id: 1,
        stream: "t".into(),
        start: Start::Earliest,
        group: None,
        mode: Mode::Predictive,
    })
    .encode(&mut both);
    Frame::Forecast(forecast).encode(&mut both);
    send.write_all(&both).await.unwrap();
    let mut r = Reader(StreamReader::new(recv));
    loop {
        match r.next().await {
            Frame::Grant(_) => continue,
            Frame::Assignment(a) => return (send, r, a),
            other => panic!("expected an Assignment, got {other:?}"),
        }
    }
}

/// Accepts both partition streams; returns readers indexed by partition.
async fn partition_streams(shard: &Connection) -> [Reader; 2] {
    let mut out: [Option<Reader>; 2] = [None, None];
    for _ in 0..2 {
        let recv = tokio::time::timeout(PATIENCE, shard.accept_uni())
            .await
            .expect("partition stream in time")
            .unwrap();
        let mut r = Reader(StreamReader::new(recv));
        match r.next().await {
            Frame::PartitionOpen(o) => out[o.partition as usize] = Some(r),
            other => panic!("expected PartitionOpen, got {other:?}"),
        }
    }
    out.map(|r| r.expect("one stream per partition"))
}

fn contiguous(from: u64, recs: &[Record]) {
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.offset, from + i as u64, "offsets are contiguous");
    }
}

#[test]
fn prefetch_stays_within_the_advertised_buffer_until_the_client_consumes() {
    let gw = Gateway::start(ONE_SHARD, 1);
    runtime().block_on(async {
        let ep = client(&gw.ca());
        let (hub, shard) = session(&ep, &gw).await;
        publish(&hub, 0, 400).await;
        // A fast forecast (depth far above the buffer) and a 16 KiB buffer: the buffer binds.
        let capacity: u64 = 16 * 1024;
        let (mut ctl, _r, a) = subscribe(
            &shard,
            Forecast {
                partitions: vec![PartitionForecast {
                    partition: 0,
                    records_per_s: 100_000,
                    bytes_per_s: 100_000_000,
                }],
                buffer_capacity_bytes: capacity,
            },
        )
        .await;
        assert_eq!(a.partitions.len(), 2);
        assert!(a.partitions[0].priority > a.partitions[1].priority, "{a:?}");
        let [mut p0, _p1] = partition_streams(&shard).await;
        let quiet = Duration::from_millis(500);
        let first = p0.drain(quiet).await;
        assert!(!first.is_empty(), "the shard pre-fetched nothing");
        // Every record's body is > PAYLOAD bytes: at most capacity / PAYLOAD records fit.
        assert!(
            first.len() as u64 <= capacity / PAYLOAD as u64,
            "{} records of > {PAYLOAD} B pushed into a {capacity} B buffer",
            first.len()
        );
        contiguous(0, &first);
        // Consuming (Position) reopens the window, still bounded, still contiguous.
        let mut got = first;
        while got.len() < 400 {
            let next = got.len() as u64;
            send_frame(
                &mut ctl,
                Frame::Position(Position {
                    partition: 0,
                    next_offset: next,
                    epoch: None,
                }),
            )
            .await;
            let more = p0.drain(quiet).await;
            assert!(!more.is_empty(), "nothing after Position {next}");
            assert!(more.len() as u64 <= capacity / PAYLOAD as u64);
            got.extend(more);
        }
        contiguous(0, &got);
        assert_eq!(got.len(), 400);
    });
}

#[test]
fn a_new_partition_without_forecast_gets_its_warmup_batch() {
    let gw = Gateway::start(ONE_SHARD, 1);
    runtime().block_on(async {
        let ep = client(&gw.ca());
        let (hub, shard) = session(&ep, &gw).await;
        publish(&hub, 0, 200).await;
        publish(&hub, 1, 200).await;
        // Partition 0 forecast at 500 records/s (depth: 500/s × ≥ 70 ms lead × headroom 1.5 ≈ 53
        // records on loopback); partition 1 not forecast; a 1 MiB buffer.
        let (mut ctl, _r, _) = subscribe(
            &shard,
            Forecast {
                partitions: vec![PartitionForecast {
                    partition: 0,
                    records_per_s: 500,
                    bytes_per_s: 500 * 1_010,
                }],
                buffer_capacity_bytes: 1 << 20,
            },
        )
        .await;
        let [mut p0, mut p1] = partition_streams(&shard).await;
        let quiet = Duration::from_millis(500);
        let warm = p1.drain(quiet).await;
        assert_eq!(
            warm.len(),
            WARMUP,
            "partition 1: the warm-up batch, then nothing"
        );
        contiguous(0, &warm);
        let hot = p0.drain(quiet).await;
        assert!(hot.len() >= WARMUP, "partition 0 got {}", hot.len());
        assert!(hot.len() < 200, "partition 0 got everything: no window");
        // Consuming the whole warm-up batch while the shard held back reopens the window,
        // doubled (the starvation boost).
        send_frame(
            &mut ctl,
            Frame::Position(Position {
                partition: 1,
                next_offset: WARMUP as u64,
                epoch: None,
            }),
        )
        .await;
        let next = p1.drain(quiet).await;
        assert!(
            !next.is_empty() && next.len() <= 2 * WARMUP,
            "{}",
            next.len()
        );
        contiguous(WARMUP as u64, &next);
    });
}
