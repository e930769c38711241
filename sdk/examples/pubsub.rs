//! Publishes N records to a stream, then subscribes from the earliest offset and prints how
//! many records came back and at what rate (one JSON line each).
//!
//! ```text
//! cargo run --release -p sibyl-sdk --example pubsub -- --hub 127.0.0.1:4433 \
//!     --ca ./sibyl-data/certs/ca.pem --api-key sk_... --stream demo --records 100000
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use sibyl_sdk::{Client, PublisherConfig, Start, Trust};

/// Publish then subscribe on a Sibyl gateway.
#[derive(Debug, Parser)]
struct Args {
    /// Hub address, host:port.
    #[arg(long, default_value = "127.0.0.1:4433")]
    hub: String,
    /// CA certificate (PEM) to trust, e.g. the gateway's dev CA.
    #[arg(long)]
    ca: PathBuf,
    /// API key (needs publish and subscribe scope on the stream).
    #[arg(long, env = "SIBYL_API_KEY")]
    api_key: String,
    /// Stream to use.
    #[arg(long, default_value = "demo")]
    stream: String,
    /// Records to publish.
    #[arg(long, default_value_t = 10_000)]
    records: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Sends kept in flight by the publisher loop.
    #[arg(long, default_value_t = 4096)]
    in_flight: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let a = Args::parse();
    let client = Client::builder()
        .hub(a.hub.as_str())
        .trust(Trust::CaFile(a.ca.clone()))
        .api_key(a.api_key.clone())
        .want_publish(a.stream.clone())
        .want_subscribe(a.stream.clone())
        .connect()
        .await
        .context("connecting")?;

    let publisher = client
        .publisher_with(a.stream.clone(), PublisherConfig::default())
        .await
        .context("opening the publisher")?;
    let body = vec![b'x'; a.size];
    let t0 = Instant::now();
    let mut acks = futures::stream::iter(0..a.records)
        .map(|i| publisher.send(i.to_be_bytes().to_vec(), body.clone()))
        .buffer_unordered(a.in_flight);
    let mut acked = 0u64;
    while let Some(ack) = acks.next().await {
        ack.context("publishing")?;
        acked += 1;
    }
    drop(acks);
    let pub_s = t0.elapsed().as_secs_f64();
    println!(
        "{{\"phase\":\"publish\",\"records\":{acked},\"seconds\":{pub_s:.3},\"records_per_s\":{:.0}}}",
        acked as f64 / pub_s
    );
    publisher.close().await.context("closing the publisher")?;

    let mut sub = client
        .subscribe(a.stream.clone())
        .start(Start::Earliest)
        .open()
        .await
        .context("subscribing")?;
    let t1 = Instant::now();
    let mut got = 0u64;
    // The stream may hold older records too: read until N records or 2 s of silence.
    while got < a.records {
        match tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
            Ok(Some(r)) => {
                r.context("subscription")?;
                got += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let sub_s = t1.elapsed().as_secs_f64();
    let m = sub.metrics();
    println!(
        "{{\"phase\":\"subscribe\",\"records\":{got},\"seconds\":{sub_s:.3},\"records_per_s\":{:.0},\"duplicates_dropped\":{},\"reconnects\":{}}}",
        got as f64 / sub_s,
        m.duplicates_dropped,
        m.reconnects
    );
    sub.close().await;
    client.close().await;
    Ok(())
}
