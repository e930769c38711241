//! Crash durability: a child process (this test binary, re-executed in a "writer" role) appends
//! under `Durability::Always` and prints each acknowledged offset; the parent SIGKILLs it and
//! checks that every acknowledged record survived, byte for byte. Several cycles on one store.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use sibyl_gateway::store::{Durability, NewRecord, Store, StoreConfig, StreamConfig};

const ROLE_ENV: &str = "SIBYL_STORE_CRASH_WRITER_DIR";
const CYCLES: usize = 5;
const ACKS_BEFORE_KILL: usize = 40;

fn cfg(dir: &Path) -> StoreConfig {
    // Small segments so the crash cycles cross segment rolls too.
    StoreConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 512,
        ..StoreConfig::new(dir)
    }
}

/// Deterministic content of offset `i`.
fn record_bytes(i: u64) -> (u64, Vec<u8>, Vec<u8>) {
    let key = format!("key-{i}").into_bytes();
    let payload = (0..(50 + i % 200))
        .map(|j| (i.wrapping_mul(31).wrapping_add(j) % 251) as u8)
        .collect();
    (1_700_000_000_000 + i, key, payload)
}

/// The writer role: appends batches of 1 to 3 records forever, printing `next` after each ack.
fn writer(dir: &str) {
    let store = Store::open(cfg(Path::new(dir))).expect("writer opens the store");
    let stream_cfg = StreamConfig {
        durability: Durability::Always,
        ..StreamConfig::default()
    };
    store
        .create_stream("crash", stream_cfg)
        .expect("create stream");
    let mut out = std::io::stdout().lock();
    let mut n = 0u64;
    loop {
        let (_, next) = store.bounds("crash", 0).expect("bounds");
        let batch = 1 + n % 3;
        n += 1;
        let owned: Vec<_> = (next..next + batch).map(record_bytes).collect();
        let recs: Vec<_> = owned
            .iter()
            .map(|(ts, k, p)| NewRecord {
                timestamp_ms: *ts,
                key: k,
                payload: p,
            })
            .collect();
        let r = store.append("crash", 0, &recs).expect("append");
        assert_eq!(r.base_offset, next);
        writeln!(out, "{}", next + batch).expect("stdout");
        out.flush().expect("stdout flush");
    }
}

#[test]
fn acknowledged_records_survive_sigkill() {
    if let Ok(dir) = std::env::var(ROLE_ENV) {
        writer(&dir);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = 0u64;
    for cycle in 0..CYCLES {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "acknowledged_records_survive_sigkill",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < ACKS_BEFORE_KILL {
            let line = lines.next().expect("child exited early").unwrap();
            // The test harness prints its own lines; acks are the bare numbers.
            if let Ok(next) = line.trim().parse::<u64>() {
                assert!(next > acked, "acks grow: {next} after {acked}");
                acked = next;
                seen += 1;
            }
        }
        // SIGKILL, by PID, of the child we started.
        child.kill().unwrap();
        child.wait().unwrap();
        // Acks printed after our last read but before the kill may exist; drain them.
        for line in lines.map_while(Result::ok) {
            if let Ok(next) = line.trim().parse::<u64>() {
                acked = next;
            }
        }
        let store = Store::open(cfg(tmp.path())).unwrap();
        let (earliest, next) = store.bounds("crash", 0).unwrap();
        assert_eq!(earliest, 0);
        assert!(
            next >= acked,
            "cycle {cycle}: acked {acked}, recovered only {next}"
        );
        let mut at = 0;
        while at < acked {
            let got = store.read("crash", 0, at, 1000, 1 << 20).unwrap();
            assert!(!got.is_empty());
            for r in &got {
                let (ts, k, p) = record_bytes(r.offset);
                assert_eq!(r.offset, at);
                assert_eq!(
                    (r.timestamp_ms, &r.key, &r.payload),
                    (ts, &k, &p),
                    "offset {at}"
                );
                at += 1;
            }
        }
        assert_eq!(
            store
                .metrics()
                .corrupt_records
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
    assert!(acked >= (CYCLES * ACKS_BEFORE_KILL) as u64);
}
