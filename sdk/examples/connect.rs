//! Connects through the hub to a shard, prints the ticket and the attached shard, exits 0.
//!
//! ```text
//! cargo run -p sibyl-sdk --example connect -- --hub 127.0.0.1:4433 \
//!     --ca ./sibyl-data/certs/ca.pem --api-key sk_...
//! cargo run -p sibyl-sdk --example connect -- --hub 127.0.0.1:4433 --pin <sha256 hex> --api-key sk_...
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sibyl_sdk::{Client, ClientConfig, Trust, parse_fingerprint};

/// Connect to a Sibyl gateway and report the session.
#[derive(Debug, Parser)]
struct Args {
    /// Hub address, host:port.
    #[arg(long, default_value = "127.0.0.1:4433")]
    hub: String,
    /// Name the hub certificate is checked against (default: the host, or "localhost").
    #[arg(long)]
    server_name: Option<String>,
    /// CA certificate (PEM) to trust, e.g. the gateway's dev CA.
    #[arg(long, conflicts_with_all = ["pin", "platform_roots"])]
    ca: Option<PathBuf>,
    /// Trust exactly the server certificate with this SHA-256 fingerprint (hex).
    #[arg(long, conflicts_with = "platform_roots")]
    pin: Option<String>,
    /// Trust the operating system's root certificates.
    #[arg(long)]
    platform_roots: bool,
    /// API key.
    #[arg(long, env = "SIBYL_API_KEY")]
    api_key: String,
    /// Client id (default: random).
    #[arg(long)]
    client_id: Option<String>,
    /// Streams to announce for subscribing.
    #[arg(long = "subscribe")]
    subscribe: Vec<String>,
    /// Give up after this many failed rounds.
    #[arg(long, default_value_t = 3)]
    max_failures: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let trust = match (&args.ca, &args.pin, args.platform_roots) {
        (Some(ca), _, _) => Trust::CaFile(ca.clone()),
        (None, Some(pin), _) => Trust::PinnedSha256(parse_fingerprint(pin)?),
        (None, None, true) => Trust::PlatformRoots,
        (None, None, false) => {
            anyhow::bail!("choose a trust: --ca <pem>, --pin <sha256> or --platform-roots")
        }
    };
    let mut config = ClientConfig::default();
    config.max_failures = Some(args.max_failures);
    let mut b = Client::builder()
        .hub(args.hub.as_str())
        .trust(trust)
        .api_key(args.api_key)
        .config(config)?
        .connect_timeout(Some(Duration::from_secs(30)))?;
    if let Some(name) = args.server_name {
        b = b.hub_server_name(name);
    }
    if let Some(id) = args.client_id {
        b = b.client_id(id);
    }
    for s in args.subscribe {
        b = b.want_subscribe(s);
    }
    let client = b.connect().await.context("connecting")?;
    let session = client.session().context("attached session")?;
    let t = &session.ticket;
    println!("client:   {}", client.client_id());
    println!(
        "ticket:   version {}, shard group {}, expires at {} (unix s)",
        t.version, t.shard_group, t.expires_at
    );
    for (i, ep) in t.endpoints.iter().enumerate() {
        println!("  endpoint {i}: {} ({})", ep.addr, ep.server_name);
    }
    println!(
        "attached: {} ({}), session {}, max_streams {}, max_frame {}",
        session.endpoint.addr,
        session.endpoint.server_name,
        session.session_id,
        session.limits.max_streams,
        session.limits.max_frame
    );
    client.close().await;
    Ok(())
}
