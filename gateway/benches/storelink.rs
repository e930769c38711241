//! Throughput of the store link: 1M 100-byte records read through a `StoreLink` (and through
//! a `CachedReader`, second pass from cache), against `Store::read` directly as the baseline.
//!
//! `cargo bench -p sibyl-gateway --bench storelink`; prints a JSON summary line last.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use sibyl_gateway::store::{NewRecord, Store, StoreConfig, StreamConfig};
use sibyl_gateway::storelink::{
    CacheConfig, CachedReader, ReaderConfig, StoreLink, StoreLinkServer,
};

const N: u64 = 1_000_000;
const PAYLOAD: usize = 100;
const BATCH_BYTES: u32 = 1 << 20;

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        Store::open(StoreConfig {
            dir: dir.path().join("store"),
            ..StoreConfig::default()
        })
        .expect("open store"),
    );
    store
        .create_stream("bench", StreamConfig::default())
        .expect("create stream");
    let payload = [0x5a_u8; PAYLOAD];
    let chunk: Vec<NewRecord<'_>> = (0..10_000)
        .map(|i| NewRecord {
            timestamp_ms: i,
            key: b"",
            payload: &payload,
        })
        .collect();
    for _ in 0..N / 10_000 {
        store.append("bench", 0, &chunk).expect("append");
    }

    // Baseline: the store itself (second pass, so both sides read a warm page cache).
    let mut direct = 0.0;
    for _ in 0..2 {
        let t = Instant::now();
        let mut at = 0;
        while at < N {
            let recs = store
                .read("bench", 0, at, usize::MAX, BATCH_BYTES as usize)
                .expect("read");
            at += recs.len() as u64;
        }
        direct = t.elapsed().as_secs_f64();
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (link_s, cached_s, cache_hit_s) = rt.block_on(async {
        let sock = dir.path().join("run").join("store.sock");
        let _server = StoreLinkServer::bind(&sock, store.clone()).expect("bind");
        let link = StoreLink::connect(&sock).await.expect("connect");
        let t = Instant::now();
        let mut at = 0;
        while at < N {
            let b = link
                .read("bench", 0, at, u32::MAX, BATCH_BYTES)
                .await
                .expect("read");
            at = b.next_offset();
        }
        let link_s = t.elapsed().as_secs_f64();

        let reader = CachedReader::new(
            link,
            CacheConfig {
                partition_bytes: 256 << 20,
                total_bytes: 256 << 20,
            },
            ReaderConfig::default(),
        );
        let pass = || {
            let reader = reader.clone();
            async move {
                let t = Instant::now();
                let mut at = 0;
                while at < N {
                    let b = reader
                        .read("bench", 0, at, 16_384, BATCH_BYTES)
                        .await
                        .expect("read");
                    at = b.next_offset();
                }
                t.elapsed().as_secs_f64()
            }
        };
        let cold = pass().await;
        let warm = pass().await;
        (link_s, cold, warm)
    });
    let rate = |s: f64| N as f64 / s;
    println!("store direct      : {:>12.0} records/s", rate(direct));
    println!("store link        : {:>12.0} records/s", rate(link_s));
    println!("cached reader cold: {:>12.0} records/s", rate(cached_s));
    println!("cached reader warm: {:>12.0} records/s", rate(cache_hit_s));
    println!(
        "{{\"bench\":\"storelink\",\"records\":{N},\"payload_bytes\":{PAYLOAD},\"direct_rps\":{:.0},\"link_rps\":{:.0},\"cached_cold_rps\":{:.0},\"cached_warm_rps\":{:.0},\"link_vs_direct\":{:.3}}}",
        rate(direct),
        rate(link_s),
        rate(cached_s),
        rate(cache_hit_s),
        direct / link_s
    );
}
