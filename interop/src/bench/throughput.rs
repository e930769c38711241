//! The Sibyl half of `throughput` against a real `sibyl-gateway` process: one SDK client
//! publishing (hub connection) and one subscribing (shard connection), in the same run as
//! bare quinn streaming the same bytes.
//!
//! ```text
//!  per repeat: GatewayProcess::start(THROUGHPUT_CONFIG, 1 shard, BenchTls files)
//!    ├─ bytes_per_s_16k:  publish total_bytes of 16 KiB records to `bulk` (never), wait
//!    │                    for every ack; then subscribe from Earliest and time
//!    │                    open() → last payload byte delivered (the read path alone,
//!    │                    one-way like the baseline's uni stream)
//!    ├─ records_per_s_100b: subscribe to `small` (never) from Earliest, then publish N
//!    │                    100-byte records; rate = delivered / (first send → last delivered)
//!    └─ publish_records_per_s_100b: publish N 100-byte records to `durable`
//!                         (interval:5ms); rate = acked / (first send → last ack)
//! ```
//!
//! A fresh gateway per repeat keeps every repeat on an empty log. The publisher and the
//! subscriber are separate [`sibyl_sdk::Client`]s (one connection each); the grant is set far
//! above the measured rates so it never paces the benchmark.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use sibyl_sdk::{Client, PublisherConfig, Start, SubscriptionConfig, Trust};

use super::gateway::GatewayProcess;
use super::quic::BenchTls;
use super::{BenchError, Figures, SibylHalf, ThroughputParams};

/// Stream of the bulk figure (durability `never`).
pub const BULK_STREAM: &str = "bulk";
/// Stream of the end-to-end small-record figure (durability `never`).
pub const SMALL_STREAM: &str = "small";
/// Stream of the publish figure (durability `interval:5ms`).
pub const DURABLE_STREAM: &str = "durable";

/// The gateway configuration of the throughput scenario: one group of one shard, the three
/// streams with one partition each, and a grant far above any rate measured here.
pub const THROUGHPUT_CONFIG: &str = r#"
[[shards.groups]]
id = 0
shards = 1

[[streams]]
name = "bulk"
partitions = 1
durability = "never"

[[streams]]
name = "small"
partitions = 1
durability = "never"

[[streams]]
name = "durable"
partitions = 1
durability = "interval:5ms"

[subscribe]
grant_rate = 1000000000
grant_burst = 100000000
"#;

/// Resolved sends the publishing loop may hold before it collects their acks.
const REAP_AT: usize = 1 << 16;

/// How long a run may go without progress before it is declared stuck.
const STALL: Duration = Duration::from_secs(20);

/// The Sibyl half of `throughput`.
#[derive(Debug)]
pub struct ThroughputHalf {
    certs: sibyl_certs::CertPaths,
    config: String,
}

impl ThroughputHalf {
    /// A half serving `tls`'s certificate files from a fresh gateway per repeat.
    pub fn new(tls: &BenchTls) -> Self {
        Self {
            certs: tls.paths().clone(),
            config: THROUGHPUT_CONFIG.to_owned(),
        }
    }

    /// With `admin = false` the gateways run with `[admin] enabled = false` (no metrics).
    pub fn admin(mut self, admin: bool) -> Self {
        self.config = format!("{THROUGHPUT_CONFIG}\n[admin]\nenabled = {admin}\n");
        self
    }
}

fn sibyl_err(e: impl std::error::Error + Send + Sync + 'static) -> BenchError {
    BenchError::Sibyl(Box::new(e))
}

async fn client(gw: &GatewayProcess, stream: &str, publish: bool) -> Result<Client, BenchError> {
    let b = Client::builder()
        .hub(gw.hub())
        .trust(Trust::CaFile(gw.ca().to_owned()))
        .api_key(gw.dev_key());
    let b = if publish {
        b.want_publish(stream)
    } else {
        b.want_subscribe(stream)
    };
    b.connect().await.map_err(sibyl_err)
}

fn publisher_config() -> Result<PublisherConfig, BenchError> {
    PublisherConfig::default()
        .max_inflight_bytes(32 << 20)
        .map_err(sibyl_err)
}

/// The stream's next item, `Err` after [`STALL`] without one. A ready item is taken
/// without arming a timer (a timer per record would cost more than the record).
async fn next_within<S: futures::Stream + Unpin>(
    s: &mut S,
) -> Result<Option<S::Item>, tokio::time::error::Elapsed> {
    if let Some(item) = s.next().now_or_never() {
        return Ok(item);
    }
    tokio::time::timeout(STALL, s.next()).await
}

/// Publishes `count` records of `size` payload bytes (empty key) and waits for every ack.
/// Returns the time from the first send to the last ack.
async fn publish(
    gw: &GatewayProcess,
    stream: &str,
    count: u64,
    size: usize,
) -> Result<Duration, BenchError> {
    let client = client(gw, stream, true).await?;
    let publisher = client
        .publisher_with(stream, publisher_config()?)
        .await
        .map_err(sibyl_err)?;
    let payload = Bytes::from(vec![0x5a; size]);
    let start = Instant::now();
    // Every record is admitted in call order before the next send (`admitted()`, the SDK's
    // pipelining idiom), so the publisher's window stays full whatever the record size; acks
    // come in send order (one partition) and are collected when the window is full or
    // `REAP_AT` of them have piled up (polling one per record costs a waker each). A send that is
    // only created and not polled would not queue for the window: keeping a deque of raw
    // `send` futures and awaiting only the front one degrades to one record per linger once
    // the window is full (16 KiB records did exactly that: ~7 MB/s).
    let mut pending = std::collections::VecDeque::new();
    let mut acked = 0u64;
    let reap = |pending: &mut std::collections::VecDeque<sibyl_sdk::SendFuture>,
                acked: &mut u64|
     -> Result<(), BenchError> {
        while let Some(r) = pending.front_mut().and_then(|f| f.now_or_never()) {
            pending.pop_front();
            r.map_err(sibyl_err)?;
            *acked += 1;
        }
        Ok(())
    };
    for _ in 0..count {
        let send = publisher.send(Bytes::new(), payload.clone());
        if pending.len() >= REAP_AT {
            reap(&mut pending, &mut acked)?;
        }
        let send = if send.is_admitted() {
            send
        } else {
            reap(&mut pending, &mut acked)?;
            tokio::time::timeout(STALL, send.admitted())
                .await
                .map_err(|_| BenchError::BadParameter("publisher stalled"))?
                .map_err(sibyl_err)?
        };
        pending.push_back(send);
    }
    for front in pending {
        tokio::time::timeout(STALL, front)
            .await
            .map_err(|_| BenchError::BadParameter("publisher stalled"))?
            .map_err(sibyl_err)?;
        acked += 1;
    }
    let took = start.elapsed();
    publisher.close().await.map_err(sibyl_err)?;
    client.close().await;
    if acked != count {
        return Err(BenchError::ShortStream {
            expected: count,
            got: acked,
        });
    }
    Ok(took)
}

/// Reads `count` records from `sub`, returning the payload bytes seen and the instant the
/// last record arrived.
async fn drain(
    sub: &mut sibyl_sdk::Subscription,
    count: u64,
) -> Result<(u64, Instant), BenchError> {
    let mut got = 0u64;
    let mut bytes = 0u64;
    let mut next = 0u64;
    while got < count {
        match next_within(sub).await {
            Ok(Some(r)) => {
                let r = r.map_err(sibyl_err)?;
                if r.offset != next {
                    return Err(BenchError::BadParameter("subscription gap or duplicate"));
                }
                next += 1;
                got += 1;
                bytes += r.payload.len() as u64;
            }
            Ok(None) | Err(_) => {
                return Err(BenchError::ShortStream {
                    expected: count,
                    got,
                });
            }
        }
    }
    Ok((bytes, Instant::now()))
}

fn sub_config() -> Result<SubscriptionConfig, BenchError> {
    SubscriptionConfig::default()
        .buffer_bytes(16 << 20)
        .map_err(sibyl_err)
}

async fn subscribe(client: &Client, stream: &str) -> Result<sibyl_sdk::Subscription, BenchError> {
    client
        .subscribe(stream)
        .start(Start::Earliest)
        .config(sub_config()?)
        .open()
        .await
        .map_err(sibyl_err)
}

/// `bytes_per_s_16k`: publish, then time the subscription's delivery of it all.
async fn bulk(gw: &GatewayProcess, total: u64, size: u64) -> Result<f64, BenchError> {
    let size = size.max(1);
    let count = total.div_ceil(size);
    let size = usize::try_from(size).map_err(|_| BenchError::BadParameter("write size"))?;
    publish(gw, BULK_STREAM, count, size).await?;
    let client = client(gw, BULK_STREAM, false).await?;
    let start = Instant::now();
    let mut sub = subscribe(&client, BULK_STREAM).await?;
    let (bytes, end) = drain(&mut sub, count).await?;
    sub.close().await;
    client.close().await;
    Ok(bytes as f64 / (end - start).as_secs_f64())
}

/// `records_per_s_100b`: subscription open first, then publish; delivered records / (first
/// send → last delivered).
async fn end_to_end(gw: &GatewayProcess, count: u64, size: usize) -> Result<f64, BenchError> {
    let client_sub = client(gw, SMALL_STREAM, false).await?;
    let mut sub = subscribe(&client_sub, SMALL_STREAM).await?;
    let reader = tokio::spawn(async move {
        let r = drain(&mut sub, count).await;
        sub.close().await;
        r
    });
    let start = Instant::now();
    let published = publish(gw, SMALL_STREAM, count, size).await;
    let read = reader.await.map_err(|_| BenchError::TaskFailed)?;
    client_sub.close().await;
    published?;
    let (_, end) = read?;
    Ok(count as f64 / (end - start).as_secs_f64())
}

impl SibylHalf for ThroughputHalf {
    async fn throughput(&mut self, params: ThroughputParams) -> Result<Figures, BenchError> {
        let (certs, config) = (self.certs.clone(), self.config.clone());
        let gw =
            tokio::task::spawn_blocking(move || GatewayProcess::start(&config, 1, Some(&certs)))
                .await
                .map_err(|_| BenchError::TaskFailed)??;
        let small = usize::try_from(params.small_record.max(1))
            .map_err(|_| BenchError::BadParameter("small record size"))?;
        let small_count =
            (params.total_bytes / params.small_record.max(1)).clamp(10_000, 5_000_000);

        let mut f = Figures::new();
        let bulk = bulk(&gw, params.total_bytes, params.write_size).await?;
        f.insert("bytes_per_s_16k".into(), bulk);
        let e2e = end_to_end(&gw, small_count, small).await?;
        f.insert("records_per_s_100b".into(), e2e);
        let took = publish(&gw, DURABLE_STREAM, small_count, small).await?;
        f.insert(
            "publish_records_per_s_100b".into(),
            small_count as f64 / took.as_secs_f64(),
        );
        // Stops the gateway (SIGTERM by pid) off the async threads.
        tokio::task::spawn_blocking(move || drop(gw))
            .await
            .map_err(|_| BenchError::TaskFailed)?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_declares_the_three_streams_and_an_unlimiting_grant() {
        let v: toml::Table = toml::from_str(THROUGHPUT_CONFIG).unwrap();
        let streams = v["streams"].as_array().unwrap();
        let find = |name: &str| {
            streams
                .iter()
                .find(|s| s["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("stream {name}"))
        };
        assert_eq!(find(BULK_STREAM)["durability"].as_str(), Some("never"));
        assert_eq!(find(SMALL_STREAM)["durability"].as_str(), Some("never"));
        assert_eq!(
            find(DURABLE_STREAM)["durability"].as_str(),
            Some("interval:5ms")
        );
        // Far above the 1 M records/s target, so the grant never paces a run.
        assert!(v["subscribe"]["grant_rate"].as_integer().unwrap() >= 100_000_000);
        assert_eq!(v["shards"]["groups"].as_array().unwrap().len(), 1);
    }
}
