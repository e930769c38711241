//! `sibyl-interop-client`: the Rust implementation of the interop client contract
//! (`interop/README.md`). Reads `TESTCASE`, `HUB_ADDR`, `CA_FILE`, `API_KEY`, … from the
//! environment; exits 0 (pass), 127 (case not supported) or 1 (fail, reason in
//! `OUTPUT_DIR/reason.txt` and on stderr).
//!
//! Positive paths go through the SDK (`sibyl_sdk::Client`); the refusal cases need to send
//! what the SDK never sends (a forged token, a replayed proof, a token to the wrong group),
//! so they speak `sibyl-proto` frames over quinn directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use futures::StreamExt as _;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use sha2::{Digest, Sha256};
use sibyl_certs::{ClientTlsBuilder, Trust};
use sibyl_interop::runner::{
    ATTACHED_FILE, EVENT_DONE_FILE, EVENT_REQUEST_FILE, EVENT_STARTED_FILE, EXIT_UNSUPPORTED,
    PROGRESS_FILE, REASON_FILE, parse_shard_addrs,
};
use sibyl_proto::frame::{Action, Attach, Hello, Profile, Ticket, Want};
use sibyl_proto::proof::{EXPORTER_CONTEXT, EXPORTER_LABEL};
use sibyl_proto::{Codec, ErrorCode, Frame, FrameDecoder};
use sibyl_sdk::{Client, ConnectError, Start};

/// Bound on any single network step (never a timing assertion: the runner has its own).
const STEP: Duration = Duration::from_secs(20);

/// The contract's environment.
struct Env {
    case: String,
    hub: SocketAddr,
    ca: PathBuf,
    server_name: String,
    api_key: String,
    stream: String,
    out: PathBuf,
    client_id: String,
    records: u64,
    event_at: Option<u64>,
    shards: Vec<(u32, SocketAddr)>,
    wait: Duration,
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| format!("environment variable {name} is not set"))
}

impl Env {
    fn from_env() -> anyhow::Result<Self> {
        let opt = |n: &str| std::env::var(n).ok().filter(|s| !s.is_empty());
        Ok(Self {
            case: var("TESTCASE")?,
            hub: var("HUB_ADDR")?.parse().context("HUB_ADDR")?,
            ca: var("CA_FILE")?.into(),
            server_name: opt("SERVER_NAME").unwrap_or_else(|| "localhost".into()),
            api_key: var("API_KEY")?,
            stream: opt("STREAMS")
                .and_then(|s| s.split(',').next().map(str::to_owned))
                .unwrap_or_else(|| "interop".into()),
            out: var("OUTPUT_DIR")?.into(),
            client_id: opt("CLIENT_ID").unwrap_or_else(|| "interop-rust".into()),
            records: opt("RECORDS")
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(1000),
            event_at: opt("EVENT_AT").map(|s| s.parse()).transpose()?,
            shards: parse_shard_addrs(&opt("SHARD_ADDRS").unwrap_or_default())
                .map_err(|e| anyhow!(e))?,
            wait: Duration::from_millis(
                opt("WAIT_MS")
                    .map(|s| s.parse())
                    .transpose()?
                    .unwrap_or(2000),
            ),
        })
    }
}

enum Outcome {
    Pass(String),
    Unsupported(String),
}

fn main() -> ExitCode {
    // SDK events (attach, session end, rebind) with timestamps on stderr, for the cell's log.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sibyl_sdk=info".into()),
        )
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let env = match Env::from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("sibyl-interop-client: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let out = env.out.clone();
    let result = rt.block_on(run(env));
    let code = match result {
        Ok(Outcome::Pass(msg)) => {
            println!("pass: {msg}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Unsupported(why)) => {
            let _ = std::fs::write(out.join(REASON_FILE), &why);
            eprintln!("unsupported: {why}");
            ExitCode::from(EXIT_UNSUPPORTED as u8)
        }
        Err(e) => {
            let _ = std::fs::write(out.join(REASON_FILE), format!("{e:#}"));
            eprintln!("fail: {e:#}");
            ExitCode::FAILURE
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(env: Env) -> anyhow::Result<Outcome> {
    match env.case.as_str() {
        "handshake" => handshake(&env).await,
        "ticket" => ticket_case(&env).await,
        "direct-connect" => direct_connect(&env).await,
        "refuse-bad-key" => refuse_bad_key(&env).await,
        "refuse-forged-token" => refuse_forged(&env).await,
        "refuse-expired" => refuse_expired(&env).await,
        "refuse-wrong-group" => refuse_wrong_group(&env).await,
        "token-replay" => token_replay(&env).await,
        "transfer" | "resume" | "drain" | "loss" | "blackhole" | "rebind" => transfer(&env).await,
        // The conformance checks send hand-made bytes; they live in the Python client, which
        // shares no code with the gateway (interop/clients/python/conformance.py).
        "conformance" => Ok(Outcome::Unsupported(
            "the requirement checks are the Python client's (conformance.py)".into(),
        )),
        other => Ok(Outcome::Unsupported(format!("unknown test case {other:?}"))),
    }
}

// ---- raw quinn + sibyl-proto helpers ----------------------------------------------------

fn endpoint(env: &Env) -> anyhow::Result<Endpoint> {
    let tls = ClientTlsBuilder::new(Trust::CaFile(env.ca.clone())).build()?;
    let mut ep = Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )));
    Ok(ep)
}

async fn connect(ep: &Endpoint, addr: SocketAddr, name: &str) -> anyhow::Result<Connection> {
    let c = tokio::time::timeout(STEP, ep.connect(addr, name)?)
        .await
        .with_context(|| format!("handshake with {addr} timed out"))?
        .with_context(|| format!("handshake with {addr}"))?;
    Ok(c)
}

async fn send_frame(send: &mut SendStream, f: &Frame) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    f.encode(&mut buf);
    send.write_all(&buf).await?;
    Ok(())
}

/// One frame, or `None` when the stream or connection ended first.
async fn recv_frame(recv: &mut RecvStream) -> anyhow::Result<Option<Frame>> {
    let mut dec = FrameDecoder::default();
    let read = async {
        loop {
            if let Some(f) = dec.next_frame()? {
                return Ok(Some(f));
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(c)) => dec.push(&c.bytes),
                _ => return Ok(None),
            }
        }
    };
    tokio::time::timeout(STEP, read)
        .await
        .context("no frame in time")?
}

fn hello(env: &Env, api_key: &str) -> Hello {
    Hello {
        client_id: env.client_id.clone(),
        api_key: api_key.to_owned(),
        profile: Profile::default(),
        wants: vec![
            Want {
                stream: env.stream.clone(),
                action: Action::Subscribe,
            },
            Want {
                stream: env.stream.clone(),
                action: Action::Publish,
            },
        ],
        versions: vec![1],
    }
}

async fn get_ticket(env: &Env, ep: &Endpoint) -> anyhow::Result<Ticket> {
    let conn = connect(ep, env.hub, &env.server_name).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send_frame(&mut send, &Frame::Hello(hello(env, &env.api_key))).await?;
    let answer = recv_frame(&mut recv).await?;
    conn.close(0u32.into(), b"");
    match answer {
        Some(Frame::Ticket(t)) => Ok(t),
        Some(Frame::Refused(r)) => bail!("hub refused: {} {}", r.code, r.reason),
        other => bail!("unexpected hub answer: {other:?}"),
    }
}

fn proof_for(conn: &Connection, t: &Ticket) -> anyhow::Result<[u8; 32]> {
    let mut ex = [0u8; 32];
    conn.export_keying_material(&mut ex, EXPORTER_LABEL, EXPORTER_CONTEXT)
        .map_err(|_| anyhow!("TLS exporter unavailable"))?;
    Ok(sibyl_proto::attach_proof(&t.session_secret, &ex))
}

fn attach_frame(env: &Env, token: Vec<u8>, proof: [u8; 32]) -> Frame {
    Frame::Attach(Attach {
        token,
        proof,
        client_id: env.client_id.clone(),
        resume: None,
    })
}

fn first_endpoint(t: &Ticket) -> anyhow::Result<(SocketAddr, String)> {
    let e = t.endpoints.first().context("ticket without endpoints")?;
    Ok((
        e.addr.parse().context("ticket endpoint addr")?,
        e.server_name.clone(),
    ))
}

/// Sends `attach` on a new connection to `addr` and expects the shard to close with `want`.
async fn expect_refusal(
    conn: &Connection,
    attach: &Frame,
    want: ErrorCode,
) -> anyhow::Result<Outcome> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send_frame(&mut send, attach).await?;
    if let Some(f) = recv_frame(&mut recv).await? {
        bail!("expected close with {want}, got frame {:?}", f.frame_type());
    }
    let e = tokio::time::timeout(STEP, conn.closed())
        .await
        .context("shard did not close in time")?;
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let code = ErrorCode::from_u64(c.error_code.into_inner());
            ensure!(code == want, "expected close with {want}, got {code}");
            Ok(Outcome::Pass(format!("shard closed with {code}")))
        }
        other => bail!("expected close with {want}, got {other}"),
    }
}

// ---- cases ------------------------------------------------------------------------------

async fn handshake(env: &Env) -> anyhow::Result<Outcome> {
    let ep = endpoint(env)?;
    let conn = connect(&ep, env.hub, &env.server_name).await?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .context("no ALPN negotiated")?;
    ensure!(
        alpn == b"sibyl/1",
        "ALPN {:?}",
        String::from_utf8_lossy(&alpn)
    );
    conn.close(0u32.into(), b"");
    ep.wait_idle().await;
    Ok(Outcome::Pass("TLS 1.3 handshake, ALPN sibyl/1".into()))
}

async fn ticket_case(env: &Env) -> anyhow::Result<Outcome> {
    let ep = endpoint(env)?;
    let t = get_ticket(env, &ep).await?;
    ensure!(t.version == 1, "ticket version {}", t.version);
    ensure!(!t.token.is_empty(), "empty token");
    ensure!(!t.endpoints.is_empty(), "no endpoints");
    for e in &t.endpoints {
        e.addr
            .parse::<SocketAddr>()
            .with_context(|| format!("endpoint addr {:?}", e.addr))?;
    }
    Ok(Outcome::Pass(format!(
        "ticket: group {}, {} endpoints, {}-byte token",
        t.shard_group,
        t.endpoints.len(),
        t.token.len()
    )))
}

async fn sdk_client(env: &Env, api_key: &str) -> Result<Client, ConnectError> {
    Client::builder()
        .hub(env.hub)
        .hub_server_name(env.server_name.clone())
        .trust(Trust::CaFile(env.ca.clone()))
        .api_key(api_key)
        .client_id(env.client_id.clone())
        .want_subscribe(env.stream.clone())
        .want_publish(env.stream.clone())
        .connect()
        .await
}

async fn direct_connect(env: &Env) -> anyhow::Result<Outcome> {
    let client = tokio::time::timeout(STEP * 2, sdk_client(env, &env.api_key))
        .await
        .context("connect timed out")??;
    let s = client.session().context("connected without a session")?;
    let _ = std::fs::write(
        env.out.join(ATTACHED_FILE),
        format!("{}\n", s.endpoint.addr),
    );
    let msg = format!(
        "attached to {} (group {}, session {})",
        s.endpoint.addr, s.shard_group, s.session_id
    );
    client.close().await;
    Ok(Outcome::Pass(msg))
}

async fn refuse_bad_key(env: &Env) -> anyhow::Result<Outcome> {
    let bogus = "sk_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    match tokio::time::timeout(STEP * 2, sdk_client(env, bogus))
        .await
        .context("connect timed out")?
    {
        Ok(c) => {
            c.close().await;
            bail!("connected with a bogus API key")
        }
        Err(e) if e.code() == Some(ErrorCode::Unauthenticated) => {
            Ok(Outcome::Pass(format!("refused: {e}")))
        }
        Err(e) => bail!("expected UNAUTHENTICATED, got: {e}"),
    }
}

async fn refuse_forged(env: &Env) -> anyhow::Result<Outcome> {
    let ep = endpoint(env)?;
    let t = get_ticket(env, &ep).await?;
    let (addr, name) = first_endpoint(&t)?;
    let mut token = t.token.to_vec();
    let mid = token.len() / 2;
    let b = token.get_mut(mid).context("empty token")?;
    *b ^= 0x01;
    let conn = connect(&ep, addr, &name).await?;
    let f = attach_frame(env, token, proof_for(&conn, &t)?);
    expect_refusal(&conn, &f, ErrorCode::TokenInvalid).await
}

async fn refuse_expired(env: &Env) -> anyhow::Result<Outcome> {
    let ep = endpoint(env)?;
    let t = get_ticket(env, &ep).await?;
    let (addr, name) = first_endpoint(&t)?;
    tokio::time::sleep(env.wait).await;
    let conn = connect(&ep, addr, &name).await?;
    let f = attach_frame(env, t.token.to_vec(), proof_for(&conn, &t)?);
    expect_refusal(&conn, &f, ErrorCode::TokenExpired).await
}

async fn refuse_wrong_group(env: &Env) -> anyhow::Result<Outcome> {
    let ep = endpoint(env)?;
    let t = get_ticket(env, &ep).await?;
    let Some((g, addr)) = env
        .shards
        .iter()
        .find(|(g, _)| *g != t.shard_group)
        .copied()
    else {
        return Ok(Outcome::Unsupported(format!(
            "SHARD_ADDRS names no shard outside group {}",
            t.shard_group
        )));
    };
    let conn = connect(&ep, addr, &env.server_name).await?;
    let f = attach_frame(env, t.token.to_vec(), proof_for(&conn, &t)?);
    let r = expect_refusal(&conn, &f, ErrorCode::WrongGroup).await?;
    let _ = g;
    Ok(r)
}

async fn token_replay(env: &Env) -> anyhow::Result<Outcome> {
    let ep = endpoint(env)?;
    let t = get_ticket(env, &ep).await?;
    let (addr, name) = first_endpoint(&t)?;
    let a = connect(&ep, addr, &name).await?;
    let proof_a = proof_for(&a, &t)?;
    let b = connect(&ep, addr, &name).await?;
    let f = attach_frame(env, t.token.to_vec(), proof_a);
    let r = expect_refusal(&b, &f, ErrorCode::ProofFailed).await;
    a.close(0u32.into(), b"");
    r
}

/// `transfer` and the data-plane variants: publish `RECORDS` records through the SDK and
/// receive them on a subscription from `earliest`, checking order, count and a running hash
/// of (offset, key, payload) on both sides. For `resume`/`drain` the runner kills or drains
/// the attached shard once `progress.txt` reaches `EVENT_AT`; for `blackhole` it blackholes
/// every proxy for 5 s; for `rebind` the client moves to a new UDP port itself
/// ([`Client::rebind`]) and checks that the session survived (same session id: migration,
/// not a reconnect).
///
/// For every mid-stream event the publisher sends the first half, then waits until the
/// event started (received `EVENT_AT` and the shard is killed or draining, the blackhole is
/// on, the socket moved) before it sends the rest, so the second half crosses the network
/// after the event, however fast the first half went.
async fn transfer(env: &Env) -> anyhow::Result<Outcome> {
    let gated = matches!(
        env.case.as_str(),
        "blackhole" | "rebind" | "resume" | "drain"
    );
    let (event_tx, mut event_rx) = tokio::sync::watch::channel(false);
    let client = tokio::time::timeout(STEP * 2, sdk_client(env, &env.api_key))
        .await
        .context("connect timed out")??;
    if let Some(s) = client.session() {
        let _ = std::fs::write(
            env.out.join(ATTACHED_FILE),
            format!("{}\n", s.endpoint.addr),
        );
    }
    let publisher = client
        .publisher(env.stream.clone())
        .await
        .context("opening the publisher")?;
    let mut sub = client
        .subscribe(env.stream.clone())
        .start(Start::Earliest)
        .open()
        .await
        .context("opening the subscription")?;
    let n = env.records;
    let payload = |i: u64| format!("record-{i:08}").into_bytes();
    let send = async {
        let mut sent = Sha256::new();
        // Pipelined: each send waits for window room (in call order), not for its ack; the
        // acks are checked at the end.
        let mut acks = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
        for i in 0..n {
            if gated && i == n / 2 {
                tokio::time::timeout(STEP * 3, event_rx.wait_for(|started| *started))
                    .await
                    .context("the mid-stream event never started")?
                    .context("receiver gone")?;
            }
            let p = payload(i);
            sent.update(&p);
            let ack = publisher
                .send(Vec::new(), p)
                .admitted()
                .await
                .with_context(|| format!("publishing record {i}"))?;
            acks.push(ack);
        }
        publisher.flush().await?;
        for (i, ack) in acks.into_iter().enumerate() {
            ack.await
                .with_context(|| format!("record {i} not acknowledged"))?;
        }
        anyhow::Ok(sent.finalize())
    };
    let recv = async {
        let mut got = Sha256::new();
        let mut last: std::collections::BTreeMap<u32, u64> = Default::default();
        let mut count = 0u64;
        let mut rebound = None;
        while count < n {
            let r = tokio::time::timeout(STEP * 3, sub.next())
                .await
                .with_context(|| format!("no record after {count}"))?
                .context("subscription ended")??;
            if let Some(prev) = last.insert(r.partition, r.offset) {
                ensure!(
                    r.offset > prev,
                    "partition {}: offset {} after {} (duplicate or reorder)",
                    r.partition,
                    r.offset,
                    prev
                );
            }
            ensure!(
                r.payload.as_ref() == payload(count).as_slice(),
                "record {count}: payload {:?}",
                String::from_utf8_lossy(&r.payload)
            );
            got.update(&r.payload);
            count += 1;
            if gated && Some(count) == env.event_at.map(|a| a.clamp(1, n / 2)) {
                if env.case == "rebind" {
                    let before = client.local_addr().context("no local address")?;
                    let session = client.session_id();
                    let after = client.rebind().context("rebind")?;
                    ensure!(after != before, "rebind kept the address {before}");
                    eprintln!("rebind at record {count}: {before} -> {after}");
                    rebound = Some((before, after, session));
                } else {
                    std::fs::write(env.out.join(EVENT_REQUEST_FILE), b"")
                        .context("asking for the blackhole")?;
                    let started = env.out.join(EVENT_STARTED_FILE);
                    let wait = async {
                        while !started.exists() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::time::timeout(STEP, wait)
                        .await
                        .context("the runner never started the blackhole")?;
                }
                let _ = event_tx.send(true);
            }
            if count.is_multiple_of(50) || Some(count) == env.event_at {
                let _ = std::fs::write(env.out.join(PROGRESS_FILE), count.to_string());
                if let Some(s) = client.session() {
                    let _ = std::fs::write(
                        env.out.join(ATTACHED_FILE),
                        format!("{}\n", s.endpoint.addr),
                    );
                }
            }
        }
        anyhow::Ok((got.finalize(), rebound))
    };
    let (sent, (got, rebound)) = tokio::try_join!(send, recv)?;
    ensure!(sent == got, "hash mismatch");
    let mut note = String::new();
    if env.case == "rebind" {
        let (before, after, session) = rebound.context("never rebound")?;
        let now = client.local_addr().context("no local address")?;
        ensure!(
            now == after && now != before,
            "local address {now} (was {before}, rebound to {after})"
        );
        ensure!(
            client.session_id() == session,
            "the session changed ({session:?} -> {:?}): a reconnect, not a migration",
            client.session_id()
        );
        note = format!(", migrated {before} -> {after} in session {session:?}");
    }
    // Done with both: no stream left for the close to cut.
    drop(sub);
    drop(publisher);
    if matches!(env.case.as_str(), "resume" | "drain" | "blackhole") {
        ensure!(
            env.out.join(EVENT_DONE_FILE).exists(),
            "all records received before the runner's event"
        );
    }
    client.close().await;
    Ok(Outcome::Pass(format!(
        "{n} records in order, sha256 {}{note}",
        hex::encode(sent)
    )))
}
