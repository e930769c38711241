//! Synthetic publishers: generated records appended straight into the store by the hub, for
//! demos and benchmarks (`--synthetic name=events,partitions=4,rate=10000,size=100,skew=0.0`).
//!
//! ```text
//! thread per spec: every TICK ── SyntheticPlan::due(elapsed) ──▶ per-partition counts
//!                  (I/O-free: rate × elapsed, split by Zipf-like weights with carried
//!                  fractions) ──▶ one Store::append per partition with records
//! ```
//!
//! Payloads are `size` bytes: the little-endian sequence number of the record within its
//! partition, then a repeating pattern, so consumers can check what they receive.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::config::SyntheticSpec;
use crate::store::{NewRecord, Store};

/// How often a synthetic publisher appends.
pub const TICK: Duration = Duration::from_millis(5);
/// Most records appended per partition per tick (bounds a tick's memory after a stall).
const MAX_PER_TICK: u64 = 65_536;

/// How many records each partition is due (I/O-free).
#[derive(Debug, Clone)]
pub struct SyntheticPlan {
    rate: u64,
    weights: Vec<f64>,
    carry: Vec<f64>,
    emitted: u64,
}

impl SyntheticPlan {
    /// `rate` records/s over `partitions` partitions with Zipf exponent `skew`
    /// (weight of partition k ∝ 1/(k+1)^skew; 0 = uniform).
    pub fn new(rate: u64, partitions: u32, skew: f64) -> Self {
        let raw: Vec<f64> = (0..partitions.max(1))
            .map(|k| 1.0 / f64::from(k + 1).powf(skew))
            .collect();
        let sum: f64 = raw.iter().sum();
        Self {
            rate,
            weights: raw.iter().map(|w| w / sum).collect(),
            carry: vec![0.0; raw.len()],
            emitted: 0,
        }
    }

    /// Per-partition record counts due now that `elapsed` has passed since the start.
    /// Over time partition k gets `rate × elapsed × weight_k` records (± 1).
    pub fn due(&mut self, elapsed: Duration) -> Vec<u64> {
        let target = (elapsed.as_secs_f64() * self.rate as f64) as u64;
        let n = target.saturating_sub(self.emitted);
        self.emitted = self.emitted.max(target);
        self.weights
            .iter()
            .zip(self.carry.iter_mut())
            .map(|(w, c)| {
                *c += n as f64 * w;
                let whole = c.floor();
                *c -= whole;
                (whole as u64).min(MAX_PER_TICK)
            })
            .collect()
    }
}

/// Fills `payload` (its length is the record size) for record `seq`.
pub fn fill_payload(payload: &mut [u8], seq: u64) {
    let n = payload.len().min(8);
    payload[..n].copy_from_slice(&seq.to_le_bytes()[..n]);
    for (i, b) in payload.iter_mut().enumerate().skip(8) {
        *b = (i as u8).wrapping_mul(31);
    }
}

/// A running synthetic publisher; dropping it stops it.
#[derive(Debug)]
pub struct Synthetic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    appended: Arc<AtomicU64>,
}

impl Synthetic {
    /// Starts publishing `spec` into `store` (the stream must exist).
    pub fn start(store: Arc<Store>, spec: SyntheticSpec) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let appended = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, appended) = (stop.clone(), appended.clone());
            std::thread::Builder::new()
                .name(format!("synthetic-{}", spec.name))
                .spawn(move || run(&store, &spec, &stop, &appended))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            appended,
        })
    }

    /// Records appended so far.
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }
}

impl Drop for Synthetic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(store: &Store, spec: &SyntheticSpec, stop: &AtomicBool, appended: &AtomicU64) {
    let partitions = store
        .streams()
        .into_iter()
        .find(|(n, _)| *n == spec.name)
        .map_or(0, |(_, c)| c.partitions);
    if partitions == 0 {
        warn!(stream = %spec.name, "synthetic publisher: no such stream");
        return;
    }
    let mut plan = SyntheticPlan::new(spec.rate, partitions, spec.skew);
    let mut seqs: Vec<u64> = (0..partitions)
        .map(|p| store.bounds(&spec.name, p).map_or(0, |b| b.1))
        .collect();
    let size = spec.size as usize;
    let mut buf: Vec<u8> = Vec::new();
    let start = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for (p, n) in plan.due(start.elapsed()).into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let n = n as usize;
            buf.resize(n * size, 0);
            for (i, chunk) in buf.chunks_mut(size.max(1)).take(n).enumerate() {
                if size > 0 {
                    fill_payload(chunk, seqs[p] + i as u64);
                }
            }
            let recs: Vec<NewRecord<'_>> = (0..n)
                .map(|i| NewRecord {
                    timestamp_ms: ts,
                    key: b"",
                    payload: &buf[i * size..(i + 1) * size],
                })
                .collect();
            // `p` < partitions ≤ 4096, from an enumerate over `partitions` entries.
            match store.append(&spec.name, p as u32, &recs) {
                Ok(r) => {
                    seqs[p] = r.base_offset + u64::from(r.count);
                    appended.fetch_add(u64::from(r.count), Ordering::Relaxed);
                    crate::obs::add(
                        &crate::obs::metrics::SYNTHETIC_RECORDS,
                        &[("stream", &spec.name)],
                        u64::from(r.count),
                    );
                }
                Err(e) => {
                    warn!(stream = %spec.name, error = %e, "synthetic append failed; stopping");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_plan_splits_evenly_and_keeps_the_rate() {
        let mut plan = SyntheticPlan::new(1000, 4, 0.0);
        let mut total = vec![0u64; 4];
        for ms in (5..=1000).step_by(5) {
            for (t, n) in total.iter_mut().zip(plan.due(Duration::from_millis(ms))) {
                *t += n;
            }
        }
        assert_eq!(total.iter().sum::<u64>(), 1000);
        assert!(total.iter().all(|&t| (249..=251).contains(&t)), "{total:?}");
    }

    #[test]
    fn skew_favours_low_partitions() {
        let mut plan = SyntheticPlan::new(10_000, 4, 1.0);
        let got = plan.due(Duration::from_secs(1));
        // Weights 1, 1/2, 1/3, 1/4 over 25/12.
        assert_eq!(got[0], 4800);
        assert!(got[0] > got[1] && got[1] > got[2] && got[2] > got[3]);
    }

    #[test]
    fn payload_carries_the_sequence() {
        let mut p = vec![0u8; 20];
        fill_payload(&mut p, 0x0102);
        assert_eq!(u64::from_le_bytes(p[..8].try_into().unwrap()), 0x0102);
        let mut tiny = vec![0u8; 3];
        fill_payload(&mut tiny, 0x0a0b0c);
        assert_eq!(tiny, [0x0c, 0x0b, 0x0a]);
    }
}
