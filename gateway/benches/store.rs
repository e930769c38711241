//! Store throughput: append 100-byte records in batches of 256 under `Never` and
//! `Interval(5 ms)` (the flush driver is simulated by calling `flush_due` after each batch),
//! and read them back 256 at a time.
//!
//! Run: `cargo bench -p sibyl-gateway --bench store`.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sibyl_gateway::store::{Durability, NewRecord, Store, StoreConfig, StreamConfig};

const BATCH: usize = 256;

fn bench_append(c: &mut Criterion) {
    let payload = [0x5Au8; 100];
    let mut g = c.benchmark_group("store_append_100B_x256");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, durability) in [
        ("never", Durability::Never),
        (
            "interval_5ms",
            Durability::Interval(Duration::from_millis(5)),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(tmp.path())).unwrap();
        store
            .create_stream(
                "b",
                StreamConfig {
                    durability,
                    ..StreamConfig::default()
                },
            )
            .unwrap();
        let mut ts = 1_700_000_000_000u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                ts += 1;
                let recs: Vec<_> = (0..BATCH)
                    .map(|_| NewRecord {
                        timestamp_ms: ts,
                        key: b"key",
                        payload: &payload,
                    })
                    .collect();
                store.append("b", 0, &recs).unwrap();
                store.flush_due(Instant::now()).unwrap();
            })
        });
    }
    g.finish();
}

fn bench_read(c: &mut Criterion) {
    let payload = [0x5Au8; 100];
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(tmp.path())).unwrap();
    store
        .create_stream(
            "r",
            StreamConfig {
                durability: Durability::Never,
                ..StreamConfig::default()
            },
        )
        .unwrap();
    let total = 200_000u64;
    for i in 0..total / BATCH as u64 {
        let recs: Vec<_> = (0..BATCH)
            .map(|_| NewRecord {
                timestamp_ms: i,
                key: b"key",
                payload: &payload,
            })
            .collect();
        store.append("r", 0, &recs).unwrap();
    }
    let (_, next) = store.bounds("r", 0).unwrap();
    let mut g = c.benchmark_group("store_read_100B_x256");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut at = 0u64;
    g.bench_function("sequential", |b| {
        b.iter(|| {
            if at + BATCH as u64 > next {
                at = 0;
            }
            let got = store.read("r", 0, at, BATCH, 1 << 20).unwrap();
            at += got.len() as u64;
            got
        })
    });
    g.finish();
}

criterion_group!(benches, bench_append, bench_read);
criterion_main!(benches);
