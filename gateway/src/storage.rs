//! The hub's store lifecycle: open `<data_dir>/store`, create the configured streams, drive
//! interval fsyncs and retention, sync everything on shutdown.
//!
//! ```text
//! Config.streams ──ensure_streams──▶ Store (create_stream is idempotent)
//! flush thread:     park until next_flush_deadline (an append arming one unparks it) ─▶ flush_due(now)
//! retention task:   every RETENTION_EVERY ─▶ spawn_blocking(enforce_retention(now))
//! shutdown:         StoreTasks::stop ─▶ join the flush thread ─▶ sync_all
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use crate::config::{Config, StreamSpec, SyntheticSpec};
use crate::store::{Durability, Store, StoreConfig, StoreError, StreamConfig};

/// How often retention runs.
pub const RETENTION_EVERY: Duration = Duration::from_secs(30);
/// Longest sleep of the flush driver while nothing is pending (appends that arm a deadline
/// wake it at once; this only bounds a missed wake-up).
const FLUSH_IDLE: Duration = Duration::from_secs(1);

/// The store directory of a data directory: `<data_dir>/store`.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}

/// Opens the store of `data_dir` (fails with [`StoreError::Locked`] while a hub runs on it).
pub fn open_store(data_dir: &Path) -> Result<Store, StoreError> {
    Store::open(StoreConfig::new(store_dir(data_dir)))
}

/// Creates every `[[streams]]` entry of `config` and the streams of synthetic publishers
/// that do not exist yet (`interval:5ms`). Existing streams with the same configuration are
/// left alone; a different configuration is an error naming the stream.
pub fn ensure_streams(store: &Store, config: &Config) -> Result<(), StoreError> {
    for s in &config.streams {
        let cfg = spec_config(s)?;
        store.create_stream(&s.name, cfg)?;
    }
    for sy in &config.synthetic {
        if store.streams().iter().any(|(n, _)| *n == sy.name) {
            continue;
        }
        store.create_stream(&sy.name, synthetic_stream(sy))?;
    }
    Ok(())
}

fn spec_config(s: &StreamSpec) -> Result<StreamConfig, StoreError> {
    s.stream_config()
        .map_err(|reason| StoreError::InvalidConfig { reason })
}

/// The configuration a synthetic publisher's stream is created with.
pub fn synthetic_stream(sy: &SyntheticSpec) -> StreamConfig {
    StreamConfig {
        partitions: sy.partitions,
        durability: Durability::Interval(Duration::from_millis(5)),
        retention_bytes: None,
        retention_age: None,
    }
}

/// The store's background work; [`stop`](Self::stop) it at shutdown.
#[derive(Debug)]
pub struct StoreTasks {
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    flush: Option<JoinHandle<()>>,
    retention: tokio::task::JoinHandle<()>,
}

impl StoreTasks {
    /// Starts the flush driver (a thread) and the retention task. Must be called inside a
    /// tokio runtime.
    pub fn start(store: Arc<Store>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flush = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::Builder::new()
                .name("store-flush".into())
                .spawn(move || flush_driver(&store, &stop))?
        };
        let retention = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(RETENTION_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let s = store.clone();
                    match tokio::task::spawn_blocking(move || {
                        s.enforce_retention(SystemTime::now())
                    })
                    .await
                    {
                        Ok(Ok(0)) => {}
                        Ok(Ok(n)) => info!(segments = n, "retention deleted segments"),
                        Ok(Err(e)) => warn!(error = %e, "retention failed"),
                        Err(e) => warn!(error = %e, "retention task failed"),
                    }
                }
            })
        };
        Ok(Self {
            store,
            stop,
            flush: Some(flush),
            retention,
        })
    }

    /// Stops the background work and fsyncs every partition.
    pub fn stop(mut self) -> Result<(), StoreError> {
        self.retention.abort();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.flush.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.store.sync_all()
    }
}

fn flush_driver(store: &Store, stop: &AtomicBool) {
    // Sleeps until the next deadline; an append arming a new one unparks it (an unpark that
    // comes before the park makes the park return at once, so none is lost).
    store.set_flush_waker(std::thread::current());
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wake = store
            .next_flush_deadline()
            .map_or(now + FLUSH_IDLE, |d| d.min(now + FLUSH_IDLE));
        if wake > now {
            std::thread::park_timeout(wake - now);
        }
        if let Err(e) = store.flush_due(Instant::now()) {
            warn!(error = %e, "interval flush failed (retried)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_creates_the_demo_stream_idempotently() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path()).unwrap();
        let mut config = Config::default();
        config
            .synthetic
            .push(SyntheticSpec::parse("name=synth,partitions=2").unwrap());
        ensure_streams(&store, &config).unwrap();
        ensure_streams(&store, &config).unwrap();
        let streams = store.streams();
        let names: Vec<&str> = streams.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["events", "synth"]);
        assert_eq!(streams[0].1.partitions, 4);
        assert_eq!(
            streams[0].1.durability,
            Durability::Interval(Duration::from_millis(5))
        );
        // Another configuration for an existing stream is refused.
        config.streams[0].partitions = 8;
        assert!(matches!(
            ensure_streams(&store, &config),
            Err(StoreError::ConfigMismatch { .. })
        ));
    }

    #[tokio::test]
    async fn tasks_stop_and_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open_store(dir.path()).unwrap());
        ensure_streams(&store, &Config::default()).unwrap();
        let tasks = StoreTasks::start(store.clone()).unwrap();
        let rec = crate::store::NewRecord {
            timestamp_ms: 1,
            key: b"",
            payload: b"x",
        };
        store.append("events", 0, &[rec]).unwrap();
        tasks.stop().unwrap();
        assert!(
            store
                .metrics()
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
    }

    #[test]
    fn an_append_arming_a_flush_deadline_wakes_the_parked_driver() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open_store(dir.path()).unwrap());
        ensure_streams(&store, &Config::default()).unwrap();
        // Stand-in driver: registers itself, then parks far longer than any test runs; it
        // only returns early if the append unparks it.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let driver = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.set_flush_waker(std::thread::current());
                ready_tx.send(()).unwrap();
                let parked = Instant::now();
                std::thread::park_timeout(Duration::from_secs(120));
                parked.elapsed()
            })
        };
        ready_rx.recv().unwrap();
        let rec = crate::store::NewRecord {
            timestamp_ms: 1,
            key: b"",
            payload: b"x",
        };
        // `events` is `interval:5ms`: the first append arms a deadline.
        store.append("events", 0, &[rec]).unwrap();
        assert!(store.next_flush_deadline().is_some());
        let slept = driver.join().unwrap();
        assert!(slept < Duration::from_secs(120), "the driver was not woken");
    }
}
