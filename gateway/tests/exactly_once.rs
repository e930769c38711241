//! Idempotent publishing against the real `sibyl-gateway` binary over raw quinn + proto
//! frames: a batch re-sent after a lost ack is acknowledged with its original offsets (also
//! after a hub SIGKILL), refused seqs and foreign producer ids are answered with their codes,
//! and the log holds every batch once.

mod support;

use quinn::{Connection, RecvStream, SendStream};
use sibyl_gateway::store::Store;
use sibyl_proto::frame::{
    Action, NewRecordRef, PRODUCER_TOKEN_LEN, Produce, ProduceAck, ProduceError, PublishAccepted,
    PublishOpen,
};
use sibyl_proto::{ErrorCode, Frame, FrameDecoder};
use support::*;

/// One group, one shard; stream `t` (2 partitions, fsync before ack).
const CONFIG: &str = "[[shards.groups]]\nid = 0\nshards = 1\n\
    [[streams]]\nname = \"t\"\npartitions = 2\ndurability = \"always\"\nmax_payload = 1024\n";

type Producer = (u64, [u8; PRODUCER_TOKEN_LEN]);

struct Reader {
    recv: RecvStream,
    dec: FrameDecoder,
}

impl Reader {
    async fn next(&mut self) -> Option<Frame> {
        let read = async {
            loop {
                if let Some(f) = self.dec.next_frame().unwrap() {
                    return Some(f);
                }
                match self.recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(c)) => self.dec.push(&c.bytes),
                    _ => return None,
                }
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("frame in time")
    }
}

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
    let mut r = Reader {
        recv,
        dec: FrameDecoder::default(),
    };
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
