//! The store link end to end, in process: a real `Store` in a temp dir, a `StoreLinkServer`
//! on a socket beside it, and `StoreLink` / `CachedReader` clients.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use sibyl_gateway::predict::MemberId;
use sibyl_gateway::store::{NewRecord, Store, StoreConfig, StreamConfig};
use sibyl_gateway::storelink::{
    CacheConfig, CachedReader, GroupAssignment, LinkConfig, LinkError, ReaderConfig, RemoteError,
    StoreLink, StoreLinkServer, StreamInfo, socket_path,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Generous bound for anything asynchronous to happen (never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(20);

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    server: StoreLinkServer,
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

/// A store (configured by `tune`) with stream `orders` of 2 partitions, and its link server.
fn fixture_with(tune: impl FnOnce(&mut StoreConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig {
        dir: dir.path().join("store"),
        ..StoreConfig::default()
    };
    tune(&mut cfg);
    let store = Arc::new(Store::open(cfg).unwrap());
    store
        .create_stream(
            "orders",
            StreamConfig {
                partitions: 2,
                ..StreamConfig::default()
            },
        )
        .unwrap();
    let server = StoreLinkServer::bind(&socket_path(dir.path()), store.clone()).unwrap();
    Fixture { dir, store, server }
}

fn append(store: &Store, partition: u32, from: u64, n: u64) {
    let payloads: Vec<Vec<u8>> = (from..from + n)
        .map(|i| format!("record-{i}").into_bytes())
        .collect();
    let recs: Vec<NewRecord<'_>> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| NewRecord {
            timestamp_ms: 1_000 + from + i as u64,
            key: b"k",
            payload: p,
        })
        .collect();
    let r = store.append("orders", partition, &recs).unwrap();
    assert_eq!(r.base_offset, from);
}

fn payload(i: u64) -> Vec<u8> {
    format!("record-{i}").into_bytes()
}

#[tokio::test]
async fn socket_is_private_and_stale_sockets_are_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    let mode = std::fs::metadata(f.server.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let path = f.server.path().to_owned();
    // A second server on the same path replaces the (now stale) socket.
    std::mem::forget(f.server);
    let again = StoreLinkServer::bind(&path, f.store.clone()).unwrap();
    let link = StoreLink::connect(&path).await.unwrap();
    assert_eq!(link.streams().await.unwrap().len(), 1);
    drop(again);
    assert!(!path.exists(), "dropping the server removes the socket");
    // A regular file is never removed.
    std::fs::write(&path, b"x").unwrap();
    assert!(StoreLinkServer::bind(&path, f.store.clone()).is_err());
    drop(f.dir);
}

#[tokio::test]
async fn reads_bounds_lookups_and_errors() {
    let f = fixture();
    append(&f.store, 0, 0, 100);
    let link = StoreLink::connect(f.server.path()).await.unwrap();

    assert_eq!(
        link.streams().await.unwrap(),
        vec![StreamInfo {
            name: "orders".into(),
            partitions: 2
        }]
    );
    assert_eq!(link.bounds("orders", 0).await.unwrap(), (0, 100));
    assert_eq!(link.bounds("orders", 1).await.unwrap(), (0, 0));
    assert_eq!(
        link.offset_for_timestamp("orders", 0, 1_042).await.unwrap(),
        42
    );
    assert_eq!(
        link.offset_for_timestamp("orders", 0, 9_999).await.unwrap(),
        100
    );

    // Ranges, in order, across the limits.
    let b = link.read("orders", 0, 10, 5, 1 << 20).await.unwrap();
    assert_eq!((b.base_offset(), b.next_offset(), b.len()), (10, 15, 5));
    for (i, r) in b.iter().enumerate() {
        let o = 10 + i as u64;
        assert_eq!(
            (r.offset, r.timestamp, r.key, r.payload),
            (o, 1_000 + o, &b"k"[..], &payload(o)[..])
        );
    }
    let mut at = 0;
    let mut seen = 0;
    while at < 100 {
        let b = link.read("orders", 0, at, 1000, 300).await.unwrap();
        assert!(!b.is_empty());
        seen += b.len();
        at = b.next_offset();
    }
    assert_eq!(seen, 100);
    // At the tail: an empty batch.
    let b = link.read("orders", 0, 100, 10, 1 << 20).await.unwrap();
    assert!(b.is_empty());
    assert_eq!(b.next_offset(), 100);

    // Errors keep their type.
    let e = link.read("orders", 0, 101, 10, 1 << 20).await.unwrap_err();
    assert_eq!(
        e,
        LinkError::Store(RemoteError::OffsetOutOfRange {
            requested: 101,
            earliest: 0,
            next: 100
        })
    );
    assert!(!e.is_retryable());
    let e = link.bounds("nope", 0).await.unwrap_err();
    assert!(
        matches!(e, LinkError::Store(RemoteError::NoSuchStream { ref stream }) if stream == "nope")
    );
    let e = link.read("orders", 9, 0, 10, 100).await.unwrap_err();
    assert!(matches!(
        e,
        LinkError::Store(RemoteError::NoSuchPartition {
            partition: 9,
            partitions: 2,
            ..
        })
    ));
    // The link is still fine after errors.
    assert_eq!(link.bounds("orders", 0).await.unwrap(), (0, 100));
}

#[tokio::test]
async fn many_concurrent_reads_complete_out_of_order() {
    let f = fixture();
    append(&f.store, 0, 0, 2_000);
    append(&f.store, 1, 0, 10);
    let link = StoreLink::connect(f.server.path()).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let link = link.clone();
        tasks.spawn(async move {
            // Big and small reads interleaved, plus cheap bounds calls.
            let (from, n) = if i % 2 == 0 { (i * 5, 1_000) } else { (i, 1) };
            let b = link.read("orders", 0, from, n, 1 << 20).await.unwrap();
            let want = (from..(from + u64::from(n)).min(2_000)).collect::<Vec<_>>();
            assert_eq!(b.iter().map(|r| r.offset).collect::<Vec<_>>(), want);
            assert!(b.iter().all(|r| r.payload == payload(r.offset)));
            assert_eq!(link.bounds("orders", 1).await.unwrap(), (0, 10));
        });
    }
    let all = tokio::time::timeout(PATIENCE, async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    });
    all.await.expect("reads completed");
}

#[tokio::test]
async fn tail_watch_sees_appends() {
    let f = fixture();
    append(&f.store, 1, 0, 3);
    let link = StoreLink::connect(f.server.path()).await.unwrap();
    let mut rx = link.watch_tail("orders", 1);
    let mut rx2 = link.watch_tail("orders", 1);
    let wait_for = |rx: &mut tokio::sync::watch::Receiver<u64>, want: u64| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(PATIENCE, rx.wait_for(|v| *v >= want))
                .await
                .expect("tail seen")
                .map(|v| *v)
                .unwrap()
        }
    };
    assert_eq!(wait_for(&mut rx, 3).await, 3);
    let store = f.store.clone();
    tokio::task::spawn_blocking(move || {
        for i in 0..50 {
            append(&store, 1, 3 + i, 1);
        }
    })
    .await
    .unwrap();
    // Coalesced: only the final value is guaranteed to be seen.
    assert_eq!(wait_for(&mut rx, 53).await, 53);
    assert_eq!(wait_for(&mut rx2, 53).await, 53);
    assert_eq!(*rx.borrow_and_update(), 53);

    // A watch on a missing partition is closed.
    let mut bad = link.watch_tail("orders", 7);
    let closed = tokio::time::timeout(PATIENCE, async { while bad.changed().await.is_ok() {} });
    closed.await.expect("refused watch closes");
}

#[tokio::test]
async fn malformed_frame_closes_only_that_link() {
    let f = fixture();
    append(&f.store, 0, 0, 10);
    let good = StoreLink::connect(f.server.path()).await.unwrap();
    assert_eq!(good.bounds("orders", 0).await.unwrap(), (0, 10));

    for garbage in [
        // Length over the request bound.
        u32::MAX.to_be_bytes().to_vec(),
        // A well-framed body that is not a request.
        vec![0, 0, 0, 3, 0x01, 0xff, 0xff],
        // A wrong tag.
        vec![0, 0, 0, 1, 0x03],
    ] {
        let mut raw = tokio::net::UnixStream::connect(f.server.path())
            .await
            .unwrap();
        raw.write_all(&garbage).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(PATIENCE, raw.read(&mut buf))
            .await
            .expect("hub closes the bad link")
            .unwrap_or(0);
        assert_eq!(n, 0, "the hub answers garbage by closing");
    }
    // The other link keeps working.
    assert_eq!(good.bounds("orders", 0).await.unwrap(), (0, 10));
    let b = good.read("orders", 0, 0, 100, 1 << 20).await.unwrap();
    assert_eq!(b.len(), 10);
}

#[tokio::test]
async fn link_reconnects_and_keeps_watches() {
    let f = fixture();
    append(&f.store, 0, 0, 5);
    let path = f.server.path().to_owned();
    let cfg = LinkConfig {
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        ..LinkConfig::default()
    };
    let link = StoreLink::connect_with(&path, cfg).await.unwrap();
    let rx = link.watch_tail("orders", 0);
    let wait_for = |want: u64| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(PATIENCE, rx.wait_for(|v| *v >= want))
                .await
                .expect("tail seen")
                .map(|v| *v)
                .unwrap()
        }
    };
    assert_eq!(wait_for(5).await, 5);

    // The hub restarts its listener: every link drops.
    drop(f.server);
    let down = tokio::time::timeout(PATIENCE, async {
        while link.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    down.await.expect("link noticed the drop");
    let e = link.bounds("orders", 0).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");

    let _server = StoreLinkServer::bind(&path, f.store.clone()).unwrap();
    let up = tokio::time::timeout(PATIENCE, async {
        loop {
            match link.bounds("orders", 0).await {
                Ok(b) => return b,
                Err(e) => {
                    assert!(e.is_retryable(), "{e:?}");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });
    assert_eq!(up.await.expect("reconnected"), (0, 5));
    // The watch was re-registered on the new connection.
    append(&f.store, 0, 5, 2);
    assert_eq!(wait_for(7).await, 7);
    drop(f.dir);
}

#[tokio::test]
async fn cached_reader_serves_fan_out_from_one_fetch() {
    let f = fixture();
    append(&f.store, 0, 0, 1_000);
    let link = StoreLink::connect(f.server.path()).await.unwrap();
    let reader = CachedReader::new(link, CacheConfig::default(), ReaderConfig::default());

    // First read misses and fetches ahead; the rest of the range is then a hit.
    let b = reader.read("orders", 0, 0, 100, 1 << 20).await.unwrap();
    assert_eq!((b.base_offset(), b.len()), (0, 100));
    let s = reader.cache_stats();
    assert_eq!((s.hits, s.misses), (0, 1));
    let b = reader.read("orders", 0, 500, 100, 1 << 20).await.unwrap();
    assert_eq!((b.base_offset(), b.len()), (500, 100));
    assert!(b.iter().all(|r| r.payload == payload(r.offset)));
    assert_eq!(reader.cache_stats().hits, 1);

    // Fan-out at the tail: many subscribers read the same new position at once.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let reader = reader.clone();
        tasks.spawn(async move { reader.read("orders", 0, 1_000, 10, 1 << 20).await.unwrap() });
    }
    while let Some(b) = tasks.join_next().await {
        let b = b.unwrap();
        assert!(b.is_empty() && b.next_offset() == 1_000);
    }
    append(&f.store, 0, 1_000, 20);
    let fetches = reader.fetches();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let reader = reader.clone();
        tasks.spawn(async move { reader.read("orders", 0, 1_000, 10, 1 << 20).await.unwrap() });
    }
    while let Some(b) = tasks.join_next().await {
        let b = b.unwrap();
        assert_eq!(
            b.iter().map(|r| r.offset).collect::<Vec<_>>(),
            (1_000..1_010).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        reader.fetches(),
        fetches + 1,
        "32 subscribers, one hub read"
    );
    // The tail data is cached now; bytes are bounded by the cache.
    assert!(
        reader
            .read("orders", 0, 1_010, 100, 1 << 20)
            .await
            .unwrap()
            .len()
            == 10
    );
    assert!(reader.cache_bytes() > 0 && reader.cache_bytes() <= CacheConfig::default().total_bytes);
    // Errors pass through.
    assert!(matches!(
        reader.read("orders", 0, 5_000, 1, 1).await,
        Err(LinkError::Store(RemoteError::OffsetOutOfRange { .. }))
    ));
}

/// The next group push for a member, bounded by PATIENCE.
async fn next_push(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<GroupAssignment>,
) -> GroupAssignment {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a group push in time")
        .expect("membership alive")
}

fn parts(a: &GroupAssignment) -> Vec<u32> {
    a.partitions.iter().map(|p| p.0).collect()
}

#[tokio::test]
async fn group_members_on_two_links_split_and_the_survivor_takes_over() {
    let f = fixture();
    let a = StoreLink::connect(f.server.path()).await.unwrap();
    let b = StoreLink::connect(f.server.path()).await.unwrap();
    // Both shards use member id 1: the hub scopes ids to their link.
    let mut ra = a
        .join_group(MemberId(1), "orders", "g", vec![(0, 3), (1, 4)])
        .await;
    let a1 = next_push(&mut ra).await;
    assert_eq!(a1.partitions, vec![(0, 3), (1, 4)]);
    a.group_position(MemberId(1), 0, 10, true);
    a.group_position(MemberId(1), 1, 20, true);
    // The hub handled them before B joins: a request answered after them on A's link.
    a.streams().await.unwrap();
    let mut rb = b
        .join_group(MemberId(1), "orders", "g", vec![(0, 0), (1, 0)])
        .await;
    let b1 = next_push(&mut rb).await;
    assert!(b1.partitions.is_empty(), "B waits for A's final position");
    let a2 = next_push(&mut ra).await;
    assert!(a2.epoch > a1.epoch);
    assert_eq!(a2.partitions.len(), 1);
    let kept = a2.partitions[0].0;
    let moved = 1 - kept;
    // A's final position of the revoked partition completes the hand-over.
    a.group_position(MemberId(1), moved, 33, false);
    let b2 = next_push(&mut rb).await;
    assert_eq!(
        b2.partitions,
        vec![(moved, 33)],
        "continues at the committed position"
    );
    assert!(parts(&b2).iter().all(|p| !parts(&a2).contains(p)));
    // A's shard goes away: B owns both, A's from its last position.
    drop(a);
    let b3 = next_push(&mut rb).await;
    let known = if kept == 0 { 10 } else { 20 };
    let mut want = vec![(moved, 33), (kept, known)];
    want.sort_unstable();
    assert_eq!(b3.partitions, want);
    b.leave_group(MemberId(1));
    drop(f.dir);
}

#[tokio::test]
async fn group_members_are_revoked_while_the_link_is_down_and_rejoin() {
    let f = fixture();
    let path = f.server.path().to_owned();
    let cfg = LinkConfig {
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        ..LinkConfig::default()
    };
    let link = StoreLink::connect_with(&path, cfg).await.unwrap();
    let mut rx = link
        .join_group(MemberId(5), "orders", "g", vec![(0, 0), (1, 0)])
        .await;
    assert_eq!(parts(&next_push(&mut rx).await), vec![0, 1]);
    link.group_position(MemberId(5), 0, 12, true);
    link.group_position(MemberId(5), 1, 34, true);
    // Make sure the hub processed them: a request answered after them on the same link.
    link.streams().await.unwrap();
    // The hub's listener restarts: every link drops and the hub forgets its groups.
    drop(f.server);
    let down = next_push(&mut rx).await;
    assert_eq!(
        (down.epoch, down.partitions.len()),
        (0, 0),
        "revoked while down"
    );
    let _server = StoreLinkServer::bind(&path, f.store.clone()).unwrap();
    // Re-joined on the new connection, seeded with the positions it relayed.
    let up = next_push(&mut rx).await;
    assert_eq!(up.partitions, vec![(0, 12), (1, 34)]);
    drop(f.dir);
}

/// A store whose segments roll every 64 KiB with an index entry every 8 KiB, holding
/// `n` records of ~3 KiB (sizes vary) in partition 0 of `orders`.
fn raw_fixture(n: u64) -> Fixture {
    let f = fixture_with(|c| {
        c.segment_bytes = 64 << 10;
        c.index_interval_bytes = 8 << 10;
    });
    let store = &f.store;
    for i in 0..n {
        let p = big_payload(i);
        let r = store
            .append(
                "orders",
                0,
                &[NewRecord {
                    timestamp_ms: 5_000 + i,
                    key: b"key",
                    payload: &p,
                }],
            )
            .unwrap();
        assert_eq!(r.base_offset, i);
    }
    f
}

fn big_payload(i: u64) -> Vec<u8> {
    let len = 2_500 + (i as usize * 37) % 1_500;
    (0..len).map(|j| (i as usize + j) as u8).collect()
}

/// `(offset, timestamp, key, payload)` of a batch.
fn rows(b: &sibyl_gateway::storelink::RecordBatch) -> Vec<(u64, u64, Vec<u8>, Vec<u8>)> {
    b.iter()
        .map(|r| (r.offset, r.timestamp, r.key.to_vec(), r.payload.to_vec()))
        .collect()
}

#[tokio::test]
async fn raw_reads_return_what_verifying_reads_return_across_segments() {
    let f = raw_fixture(200);
    let link = StoreLink::connect(f.server.path()).await.unwrap();
    // Raw reads following their hints, 20 KiB at a time (ranges end inside frames).
    let (mut raw, mut hint, mut from, mut hinted) = (Vec::new(), None, 0, 0);
    while from < 200 {
        let (b, next) = link
            .read_raw("orders", 0, from, 1_000, 20 << 10, hint)
            .await
            .unwrap();
        assert_eq!(b.base_offset(), from);
        assert!(!b.is_empty());
        hinted += usize::from(hint.is_some());
        if let Some(n) = next {
            assert_eq!(n.next, b.next_offset());
        }
        hint = next;
        from = b.next_offset();
        raw.extend(rows(&b));
    }
    assert!(hinted > 10, "later reads start where the last one ended");
    let mut verified = Vec::new();
    let mut from = 0;
    while from < 200 {
        let b = link.read("orders", 0, from, 1_000, 20 << 10).await.unwrap();
        from = b.next_offset();
        verified.extend(rows(&b));
    }
    assert_eq!(raw.len(), 200);
    assert_eq!(raw, verified);
    for (o, ts, k, p) in &raw {
        assert_eq!(
            (*ts, k.as_slice(), p),
            (5_000 + o, &b"key"[..], &big_payload(*o))
        );
    }
    // Without a hint, from between index entries: the frames before `from` are skipped, and
    // the batch stops at its segment's end.
    for from in [1, 43, 77, 123] {
        let (b, _) = link
            .read_raw("orders", 0, from, 5, 1 << 20, None)
            .await
            .unwrap();
        let got = rows(&b);
        assert!(!got.is_empty() && got.len() <= 5);
        assert_eq!(got, raw[from as usize..from as usize + got.len()].to_vec());
    }
    // A hint for another offset is ignored; at the tail the batch is empty.
    let (b, _) = link.read_raw("orders", 0, 150, 1, 1, hint).await.unwrap();
    assert_eq!(rows(&b), raw[150..151].to_vec());
    let (b, next) = link.read_raw("orders", 0, 200, 1, 1, None).await.unwrap();
    assert!(b.is_empty() && b.next_offset() == 200 && next.is_none());
    assert!(matches!(
        link.read_raw("orders", 0, 201, 1, 1, None).await,
        Err(LinkError::Store(RemoteError::OffsetOutOfRange { .. }))
    ));
}

#[tokio::test]
async fn a_record_damaged_on_disk_stops_a_raw_read_and_is_reported_as_corrupt() {
    let f = raw_fixture(10);
    // Damage record 4's payload in the (single, first) segment file, after the store opened.
    let seg = f
        .dir
        .path()
        .join("store/orders/0")
        .join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&seg).unwrap();
    let frame = |i: u64| 8 + 20 + 3 + big_payload(i).len();
    let at: usize = (0..4).map(frame).sum::<usize>() + frame(4) - 1;
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();

    let link = StoreLink::connect(f.server.path()).await.unwrap();
    let (b, next) = link
        .read_raw("orders", 0, 0, 100, 1 << 20, None)
        .await
        .unwrap();
    assert_eq!(
        b.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    // From the damaged record on, the raw bytes hold nothing good: the verifying read's answer.
    assert!(matches!(
        link.read_raw("orders", 0, 4, 100, 1 << 20, next).await,
        Err(LinkError::Store(RemoteError::Corrupt { offset: 4, .. }))
    ));
    assert!(
        f.store
            .metrics()
            .corrupt_records
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn the_cached_reader_reads_large_records_raw_and_small_ones_verified() {
    let f = raw_fixture(100);
    append_small(&f.store);
    let link = StoreLink::connect(f.server.path()).await.unwrap();
    let reader = CachedReader::new(
        link,
        CacheConfig::default(),
        ReaderConfig {
            fetch_bytes: 16 << 10,
            ..ReaderConfig::default()
        },
    );
    let mut from = 0;
    while from < 100 {
        let b = reader
            .read("orders", 0, from, 1_000, 16 << 10)
            .await
            .unwrap();
        assert!(b.iter().all(|r| r.payload == big_payload(r.offset)));
        from = b.next_offset();
    }
    let raw = reader.raw_fetches();
    assert!(raw > 0, "large records are read raw after the first fetch");
    let mut from = 0;
    while from < 500 {
        let b = reader
            .read("orders", 1, from, 1_000, 16 << 10)
            .await
            .unwrap();
        from = b.next_offset();
    }
    assert_eq!(
        reader.raw_fetches(),
        raw,
        "small records are read the verifying way"
    );
}

/// 500 records of 10 bytes in partition 1 of `orders`.
fn append_small(store: &Store) {
    for i in 0..500u64 {
        let p = format!("small-{i:04}").into_bytes();
        store
            .append(
                "orders",
                1,
                &[NewRecord {
                    timestamp_ms: i,
                    key: b"",
                    payload: &p,
                }],
            )
            .unwrap();
    }
}
