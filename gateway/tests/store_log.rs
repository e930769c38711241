//! Integration tests of the embedded log on real files.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sibyl_gateway::store::{
    Durability, NewRecord, Record, Store, StoreConfig, StoreError, StreamConfig,
};

fn cfg(dir: &Path, segment_bytes: u64) -> StoreConfig {
    StoreConfig {
        segment_bytes,
        index_interval_bytes: 256,
        ..StoreConfig::new(dir)
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("payload-{i}-")
        .repeat(1 + (i % 7) as usize)
        .into_bytes()
}

fn key(i: u64) -> Vec<u8> {
    format!("k{}", i % 13).into_bytes()
}

/// Appends records `from..to` (timestamps `1000 + 10 * i`) in batches of `batch`.
fn append_range(store: &Store, stream: &str, part: u32, from: u64, to: u64, batch: u64) {
    let mut i = from;
    while i < to {
        let end = (i + batch).min(to);
        let keys: Vec<_> = (i..end).map(key).collect();
        let payloads: Vec<_> = (i..end).map(payload).collect();
        let recs: Vec<_> = (i..end)
            .zip(keys.iter().zip(&payloads))
            .map(|(j, (k, p))| NewRecord {
                timestamp_ms: 1000 + 10 * j,
                key: k,
                payload: p,
            })
            .collect();
        let r = store.append(stream, part, &recs).unwrap();
        assert_eq!((r.base_offset, u64::from(r.count)), (i, end - i));
        i = end;
    }
}

fn check(rec: &Record, i: u64) {
    assert_eq!(rec.offset, i);
    assert_eq!(rec.timestamp_ms, 1000 + 10 * i);
    assert_eq!(rec.key, key(i), "key of {i}");
    assert_eq!(rec.payload, payload(i), "payload of {i}");
}

fn read_all(store: &Store, stream: &str, part: u32, from: u64) -> Vec<Record> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let got = store.read(stream, part, at, 37, 4096).unwrap();
        let Some(last) = got.last() else { return out };
        at = last.offset + 1;
        out.extend(got);
    }
}

fn segments(dir: &Path, stream: &str, part: u32) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir.join(stream).join(part.to_string()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_across_rolls_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let sc = StreamConfig {
        partitions: 2,
        durability: Durability::Never,
        ..StreamConfig::default()
    };
    {
        let store = Store::open(cfg(tmp.path(), 2048)).unwrap();
        store.create_stream("orders", sc.clone()).unwrap();
        store.create_stream("orders", sc.clone()).unwrap(); // idempotent
        assert!(matches!(
            store.create_stream(
                "orders",
                StreamConfig {
                    partitions: 3,
                    ..sc.clone()
                }
            ),
            Err(StoreError::ConfigMismatch { .. })
        ));
        append_range(&store, "orders", 0, 0, 300, 7);
        append_range(&store, "orders", 1, 0, 5, 5);
        assert!(
            segments(tmp.path(), "orders", 0).len() > 5,
            "small segments rolled"
        );
        assert!(store.metrics().segments_rolled.load(Relaxed) > 5);
        let all = read_all(&store, "orders", 0, 0);
        assert_eq!(all.len(), 300);
        all.iter().zip(0..).for_each(|(r, i)| check(r, i));
    }
    let store = Store::open(cfg(tmp.path(), 2048)).unwrap();
    assert_eq!(store.streams(), vec![("orders".to_owned(), sc)]);
    assert_eq!(store.bounds("orders", 0).unwrap(), (0, 300));
    assert_eq!(store.bounds("orders", 1).unwrap(), (0, 5));
    // Every start offset, across segment boundaries, after reopen (indexes rebuilt).
    for from in [0, 1, 41, 42, 150, 299] {
        let got = store.read("orders", 0, from, 1000, usize::MAX).unwrap();
        assert_eq!(got.len() as u64, 300 - from, "from {from}");
        got.iter().zip(from..).for_each(|(r, i)| check(r, i));
    }
    // Limits: max_records, max_bytes (at least one record even if larger).
    assert_eq!(store.read("orders", 0, 10, 3, usize::MAX).unwrap().len(), 3);
    let one = store.read("orders", 0, 10, 100, 1).unwrap();
    assert_eq!(one.len(), 1);
    check(&one[0], 10);
    // Past the end: empty at `next`, error beyond.
    assert!(store.read("orders", 0, 300, 10, 1000).unwrap().is_empty());
    assert!(matches!(
        store.read("orders", 0, 301, 10, 1000),
        Err(StoreError::OffsetOutOfRange {
            requested: 301,
            earliest: 0,
            next: 300,
            ..
        })
    ));
    // Appends continue after reopen.
    append_range(&store, "orders", 0, 300, 310, 3);
    check(&store.read("orders", 0, 305, 1, 1000).unwrap()[0], 305);
    // Timestamps.
    assert_eq!(store.offset_for_timestamp("orders", 0, 0).unwrap(), 0);
    assert_eq!(
        store
            .offset_for_timestamp("orders", 0, 1000 + 10 * 123)
            .unwrap(),
        123
    );
    assert_eq!(
        store
            .offset_for_timestamp("orders", 0, 1000 + 10 * 123 - 5)
            .unwrap(),
        123
    );
    assert_eq!(
        store
            .offset_for_timestamp("orders", 0, 1000 + 10 * 309)
            .unwrap(),
        309
    );
    assert_eq!(
        store.offset_for_timestamp("orders", 0, u64::MAX).unwrap(),
        310
    );
    // Caller errors.
    assert!(matches!(
        store.read("nope", 0, 0, 1, 1),
        Err(StoreError::NoSuchStream { .. })
    ));
    assert!(matches!(
        store.bounds("orders", 2),
        Err(StoreError::NoSuchPartition { partition: 2, .. })
    ));
    assert!(matches!(
        store.create_stream("../x", StreamConfig::default()),
        Err(StoreError::InvalidName { .. })
    ));
    let big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(
        store.append(
            "orders",
            0,
            &[NewRecord {
                timestamp_ms: 0,
                key: b"",
                payload: &big
            }]
        ),
        Err(StoreError::PayloadTooLarge { .. })
    ));
    let bigkey = vec![0u8; 4097];
    assert!(matches!(
        store.append(
            "orders",
            0,
            &[NewRecord {
                timestamp_ms: 0,
                key: &bigkey,
                payload: b""
            }]
        ),
        Err(StoreError::KeyTooLarge { .. })
    ));
    assert_eq!(
        store.bounds("orders", 0).unwrap(),
        (0, 310),
        "rejected batches wrote nothing"
    );
}

#[test]
fn second_open_of_same_dir_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let _a = Store::open(cfg(tmp.path(), 4096)).unwrap();
    assert!(matches!(
        Store::open(cfg(tmp.path(), 4096)),
        Err(StoreError::Locked { .. })
    ));
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = Store::open(cfg(tmp.path(), 1 << 20)).unwrap();
        store.create_stream("s", StreamConfig::default()).unwrap();
        append_range(&store, "s", 0, 0, 20, 4);
    }
    let seg = segments(tmp.path(), "s", 0).pop().unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    // Cut the last record in half, then append garbage after the cut.
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&[0xA5; 333])
        .unwrap();

    let store = Store::open(cfg(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(store.metrics().torn_tails_truncated.load(Relaxed), 1);
    assert_eq!(store.metrics().corrupt_records.load(Relaxed), 0);
    assert_eq!(store.bounds("s", 0).unwrap(), (0, 19));
    append_range(&store, "s", 0, 19, 30, 5);
    let all = read_all(&store, "s", 0, 0);
    assert_eq!(all.len(), 30);
    all.iter().zip(0..).for_each(|(r, i)| check(r, i));
    drop(store);
    // And it is all still there, clean, after another reopen.
    let store = Store::open(cfg(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(store.metrics().torn_tails_truncated.load(Relaxed), 0);
    assert_eq!(read_all(&store, "s", 0, 0).len(), 30);
}

#[test]
fn corrupt_record_in_the_middle_is_reported_and_never_served() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let store = Store::open(cfg(tmp.path(), 1 << 20)).unwrap();
        store.create_stream("s", StreamConfig::default()).unwrap();
        append_range(&store, "s", 0, 0, 50, 10);
    }
    let seg = segments(tmp.path(), "s", 0).pop().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    // Flip a byte inside record 20's payload (find it by its unique text).
    let needle = b"payload-20-";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 3] ^= 0x20;
    fs::write(&seg, &bytes).unwrap();

    let store = Store::open(cfg(tmp.path(), 1 << 20)).unwrap();
    assert_eq!(store.metrics().corrupt_records.load(Relaxed), 1);
    assert_eq!(store.metrics().torn_tails_truncated.load(Relaxed), 0);
    assert_eq!(store.bounds("s", 0).unwrap(), (0, 50));
    // A read reaching the corrupt record stops before it.
    let got = store.read("s", 0, 15, 100, usize::MAX).unwrap();
    assert_eq!(
        got.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (15..20).collect::<Vec<_>>()
    );
    // A read starting on it names the offset and where to resume.
    match store.read("s", 0, 20, 100, usize::MAX) {
        Err(StoreError::Corrupt {
            offset: 20,
            resume_at: Some(21),
            path,
        }) => assert_eq!(path, seg),
        other => panic!("expected Corrupt at 20, got {other:?}"),
    }
    let after = store.read("s", 0, 21, 100, usize::MAX).unwrap();
    assert_eq!(after.len(), 29);
    after.iter().zip(21..).for_each(|(r, i)| check(r, i));
    // Never served, whatever the start.
    for from in 0..50 {
        if let Ok(got) = store.read("s", 0, from, 100, usize::MAX) {
            assert!(got.iter().all(|r| r.offset != 20));
            got.iter().for_each(|r| check(r, r.offset));
        }
    }
    // Appends continue after the end.
    append_range(&store, "s", 0, 50, 52, 2);
    assert_eq!(store.bounds("s", 0).unwrap(), (0, 52));
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn retention_by_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(tmp.path(), 2048)).unwrap();
    let sc = StreamConfig {
        retention_bytes: Some(5000),
        durability: Durability::Never,
        ..StreamConfig::default()
    };
    store.create_stream("r", sc).unwrap();
    append_range(&store, "r", 0, 0, 400, 8);
    let before = segments(tmp.path(), "r", 0).len();
    let deleted = store.enforce_retention(SystemTime::now()).unwrap();
    assert!(deleted > 0);
    let after = segments(tmp.path(), "r", 0);
    assert_eq!(after.len() as u64, before as u64 - deleted);
    let total: u64 = after.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(total >= 5000, "keeps at least retention_bytes");
    let first = fs::metadata(&after[0]).unwrap().len();
    assert!(total - first < 5000, "deletes every segment it can");
    let (earliest, next) = store.bounds("r", 0).unwrap();
    assert!(earliest > 0);
    assert_eq!(next, 400);
    // Reads: before earliest is out of range; from earliest works.
    assert!(matches!(
        store.read("r", 0, earliest - 1, 10, 1000),
        Err(StoreError::OffsetOutOfRange { earliest: e, next: 400, .. }) if e == earliest
    ));
    let rest = read_all(&store, "r", 0, earliest);
    assert_eq!(rest.len() as u64, 400 - earliest);
    rest.iter().zip(earliest..).for_each(|(r, i)| check(r, i));
    assert_eq!(
        store.enforce_retention(SystemTime::now()).unwrap(),
        0,
        "idempotent"
    );
    drop(store);
    let store = Store::open(cfg(tmp.path(), 2048)).unwrap();
    assert_eq!(store.bounds("r", 0).unwrap(), (earliest, 400));
}

#[test]
fn retention_by_age_with_synthetic_now() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(tmp.path(), 2048)).unwrap();
    let age = Duration::from_secs(60);
    let sc = StreamConfig {
        retention_age: Some(age),
        durability: Durability::Never,
        ..StreamConfig::default()
    };
    store.create_stream("a", sc).unwrap();
    // Timestamps 1000 + 10*i ms; last one 1000 + 10*199 = 2990.
    append_range(&store, "a", 0, 0, 200, 10);
    let t = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
    assert_eq!(store.enforce_retention(t(1000 + 60_000)).unwrap(), 0);
    // At 61.5 s, records older than 1.5 s are expired: offsets < 50.
    let deleted = store.enforce_retention(t(1500 + 60_000)).unwrap();
    assert!(deleted > 0);
    let (earliest, next) = store.bounds("a", 0).unwrap();
    assert!(earliest > 0 && earliest <= 50, "earliest {earliest}");
    assert_eq!(next, 200);
    // Much later everything goes, the active segment too; the offsets carry on.
    store
        .enforce_retention(t(now_ms().max(100_000_000)))
        .unwrap();
    assert_eq!(store.bounds("a", 0).unwrap(), (200, 200));
    assert!(store.read("a", 0, 200, 10, 100).unwrap().is_empty());
    assert!(matches!(
        store.read("a", 0, 199, 10, 100),
        Err(StoreError::OffsetOutOfRange { .. })
    ));
    append_range(&store, "a", 0, 200, 205, 5);
    check(&store.read("a", 0, 200, 1, 100).unwrap()[0], 200);
}

#[test]
fn interval_durability_flush_schedule_and_tail_watch() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(tmp.path(), 1 << 20)).unwrap();
    let iv = Duration::from_millis(5);
    store
        .create_stream(
            "i",
            StreamConfig {
                durability: Durability::Interval(iv),
                partitions: 2,
                ..StreamConfig::default()
            },
        )
        .unwrap();
    let mut tail = store.subscribe_tail("i", 1).unwrap();
    assert_eq!(*tail.borrow_and_update(), 0);
    assert_eq!(store.next_flush_deadline(), None);
    let before = Instant::now();
    append_range(&store, "i", 1, 0, 10, 10);
    assert!(tail.has_changed().unwrap());
    assert_eq!(*tail.borrow_and_update(), 10);
    let deadline = store
        .next_flush_deadline()
        .expect("pending data has a deadline");
    assert!(deadline >= before + iv);
    let fsyncs = store.metrics().fsyncs.load(Relaxed);
    store
        .flush_due(deadline - Duration::from_millis(1))
        .unwrap();
    assert_eq!(store.metrics().fsyncs.load(Relaxed), fsyncs, "not due yet");
    store.flush_due(deadline).unwrap();
    assert_eq!(store.metrics().fsyncs.load(Relaxed), fsyncs + 1);
    assert_eq!(store.next_flush_deadline(), None);
}

#[test]
fn partitions_append_in_parallel() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(tmp.path(), 8192)).unwrap();
    store
        .create_stream(
            "p",
            StreamConfig {
                partitions: 4,
                durability: Durability::Never,
                ..StreamConfig::default()
            },
        )
        .unwrap();
    std::thread::scope(|s| {
        for part in 0..4 {
            let store = &store;
            s.spawn(move || append_range(store, "p", part, 0, 200, 9));
        }
    });
    for part in 0..4 {
        let all = read_all(&store, "p", part, 0);
        assert_eq!(all.len(), 200);
        all.iter().zip(0..).for_each(|(r, i)| check(r, i));
    }
}
