//! The netem proxy on real loopback sockets, against a UDP echo server.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sibyl_interop::netem::{
    Direction, DirectionConfig, Impairer, Impairment, NetemError, Proxy, ProxyHandle, ProxyStats,
    Verdict, spawn_many,
};
use tokio::net::UdpSocket;

/// Failure guard for waits (never a timing assertion).
const GUARD: Duration = Duration::from_secs(10);

/// A UDP echo server on 127.0.0.1:0; it logs the source address of each datagram.
struct Echo {
    addr: SocketAddr,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo() -> Echo {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = sock.local_addr().expect("echo addr");
    let sources = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&sources);
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            log.lock().expect("echo log").push(from);
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    Echo {
        addr,
        sources,
        task,
    }
}

async fn client_to(proxy: &ProxyHandle) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    sock.connect(proxy.local_addr())
        .await
        .expect("connect client");
    sock
}

async fn recv(sock: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(GUARD, sock.recv(&mut buf))
        .await
        .expect("a datagram before the guard")
        .expect("recv");
    buf.truncate(n);
    buf
}

async fn wait_stats(proxy: &ProxyHandle, what: &str, ok: impl Fn(&ProxyStats) -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while !ok(&proxy.stats()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {:?}",
            proxy.stats()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn passes_traffic_through_unchanged() {
    let echo = echo().await;
    let proxy = Proxy::new(echo.addr).spawn().await.expect("spawn");
    assert!(proxy.local_addr().ip().is_loopback() && proxy.local_addr().port() != 0);
    assert_eq!(proxy.upstream(), echo.addr);
    let client = client_to(&proxy).await;
    for i in 0..20u32 {
        let payload = format!("packet {i}").into_bytes();
        client.send(&payload).await.expect("send");
        assert_eq!(recv(&client).await, payload);
    }
    let big = vec![0xA5; 60_000];
    client.send(&big).await.expect("send big");
    assert_eq!(
        recv(&client).await,
        big,
        "large datagrams are not truncated"
    );
    wait_stats(&proxy, "all sent", |s| s.down.sent == 21).await;
    let s = proxy.stats();
    assert_eq!((s.up.received, s.up.sent, s.up.dropped()), (21, 21, 0));
    assert_eq!((s.down.received, s.down.dropped()), (21, 0));
    assert_eq!(s.mappings, 1);
    proxy.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn delay_holds_packets_at_least_the_configured_time() {
    let echo = echo().await;
    let up = DirectionConfig {
        delay: Duration::from_millis(30),
        ..Default::default()
    };
    let down = DirectionConfig {
        delay: Duration::from_millis(50),
        jitter: Duration::from_millis(10),
        ..Default::default()
    };
    let imp = Impairment { seed: 1, up, down };
    let proxy = Proxy::new(echo.addr)
        .impairment(imp)
        .spawn()
        .await
        .expect("spawn");
    let client = client_to(&proxy).await;
    for i in 0..5u8 {
        let t0 = tokio::time::Instant::now();
        client.send(&[i]).await.expect("send");
        assert_eq!(recv(&client).await, vec![i]);
        let rtt = t0.elapsed();
        assert!(
            rtt >= Duration::from_millis(30 + 40),
            "round trip {rtt:?} below the delay"
        );
    }
}

/// Sends `n` numbered packets through a proxy whose up direction loses with `loss`, and
/// returns the numbers that came back. Packets go in batches small enough for the default
/// socket buffers, so the kernel never drops any.
async fn survivors(seed: u64, loss: f64, n: u32, predicted: &BTreeSet<u32>) -> BTreeSet<u32> {
    const BATCH: u32 = 20;
    let echo = echo().await;
    let up = DirectionConfig {
        loss,
        ..Default::default()
    };
    let imp = Impairment {
        seed,
        up,
        down: DirectionConfig::default(),
    };
    let proxy = Proxy::new(echo.addr)
        .impairment(imp)
        .spawn()
        .await
        .expect("spawn");
    let client = client_to(&proxy).await;
    let mut got = BTreeSet::new();
    for start in (0..n).step_by(BATCH as usize) {
        let end = (start + BATCH).min(n);
        for i in start..end {
            client.send(&i.to_be_bytes()).await.expect("send");
        }
        let expected = predicted.range(..end).count();
        while got.len() < expected {
            let p = recv(&client).await;
            got.insert(u32::from_be_bytes(p.try_into().expect("4-byte packet")));
        }
        wait_stats(&proxy, "batch handled", |s| s.up.received == u64::from(end)).await;
    }
    let s = proxy.stats();
    assert_eq!(s.up.dropped_loss as usize, n as usize - predicted.len());
    assert_eq!(
        s.up.sent as usize,
        predicted.len(),
        "nothing beyond the expected survivors"
    );
    got
}

#[tokio::test]
async fn seeded_loss_drops_the_predicted_packets_every_run() {
    let (seed, loss, n) = (7, 0.3, 300u32);
    // The I/O-free machine with the proxy's up-direction seed predicts the dropped set.
    let cfg = DirectionConfig {
        loss,
        ..Default::default()
    };
    let mut model = Impairer::new(cfg, Direction::Up.seed(seed), Instant::now());
    let predicted: BTreeSet<u32> = (0..n)
        .filter(|i| {
            matches!(
                model.handle(Instant::now(), i.to_be_bytes().to_vec()),
                Verdict::Emit(_)
            )
        })
        .collect();
    assert!(
        predicted.len() > 150 && predicted.len() < 270,
        "{} survivors",
        predicted.len()
    );
    let first = survivors(seed, loss, n, &predicted).await;
    assert_eq!(first, predicted);
    let second = survivors(seed, loss, n, &predicted).await;
    assert_eq!(second, first, "same seed, same dropped set");
}

#[tokio::test]
async fn blackhole_toggles_at_runtime() {
    let echo = echo().await;
    let proxy = Proxy::new(echo.addr).spawn().await.expect("spawn");
    let client = client_to(&proxy).await;
    proxy.set_blackhole(true);
    client.send(b"lost").await.expect("send");
    wait_stats(&proxy, "blackholed", |s| s.up.dropped_blackhole == 1).await;
    proxy.set_blackhole(false);
    client.send(b"found").await.expect("send");
    assert_eq!(
        recv(&client).await,
        b"found",
        "the blackholed packet never arrives"
    );
    assert_eq!(echo.sources.lock().expect("log").len(), 1);
}

#[tokio::test]
async fn each_client_source_address_gets_its_own_mapping() {
    let echo = echo().await;
    let proxy = Proxy::new(echo.addr).spawn().await.expect("spawn");
    let a = client_to(&proxy).await;
    let b = client_to(&proxy).await;
    a.send(b"a1").await.expect("send");
    assert_eq!(recv(&a).await, b"a1");
    b.send(b"b1").await.expect("send");
    assert_eq!(recv(&b).await, b"b1");
    a.send(b"a2").await.expect("send");
    assert_eq!(recv(&a).await, b"a2");
    let sources = echo.sources.lock().expect("log").clone();
    assert_eq!(sources.len(), 3);
    assert_ne!(sources[0], sources[1], "two clients, two upstream sockets");
    assert_eq!(sources[0], sources[2], "a client keeps its mapping");
    assert!(sources.iter().all(|s| s.ip().is_loopback()));
    assert_eq!(proxy.stats().mappings, 2);
}

#[tokio::test]
async fn mapping_limit_refuses_new_clients() {
    let echo = echo().await;
    let proxy = Proxy::new(echo.addr)
        .max_mappings(1)
        .spawn()
        .await
        .expect("spawn");
    let a = client_to(&proxy).await;
    let b = client_to(&proxy).await;
    a.send(b"a").await.expect("send");
    assert_eq!(recv(&a).await, b"a");
    b.send(b"b").await.expect("send");
    wait_stats(&proxy, "refused", |s| s.refused_mappings == 1).await;
    assert_eq!(proxy.stats().mappings, 1);
}

#[tokio::test]
async fn update_changes_impairment_at_runtime() {
    let echo = echo().await;
    let proxy = Proxy::new(echo.addr).spawn().await.expect("spawn");
    let client = client_to(&proxy).await;
    let lossy = DirectionConfig {
        loss: 1.0,
        ..Default::default()
    };
    proxy
        .update(lossy, DirectionConfig::default())
        .expect("valid update");
    client.send(b"dropped").await.expect("send");
    wait_stats(&proxy, "lost", |s| s.up.dropped_loss == 1).await;
    proxy
        .update(DirectionConfig::default(), DirectionConfig::default())
        .expect("valid update");
    client.send(b"kept").await.expect("send");
    assert_eq!(recv(&client).await, b"kept");
    let bad = DirectionConfig {
        loss: 2.0,
        ..Default::default()
    };
    assert!(matches!(
        proxy.update(DirectionConfig::default(), bad),
        Err(NetemError::Config(_))
    ));
}

#[tokio::test]
async fn refuses_non_loopback_addresses() {
    let upstream: SocketAddr = "192.0.2.1:4433".parse().expect("addr");
    let err = Proxy::new(upstream)
        .spawn()
        .await
        .expect_err("not loopback");
    assert!(
        matches!(
            err,
            NetemError::NotLoopback {
                role: "upstream",
                ..
            }
        ),
        "{err}"
    );
    let loopback: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    let any: SocketAddr = "0.0.0.0:0".parse().expect("addr");
    let err = Proxy::new(loopback)
        .listen(any)
        .spawn()
        .await
        .expect_err("not loopback");
    assert!(
        matches!(err, NetemError::NotLoopback { role: "listen", .. }),
        "{err}"
    );
    let bad = Impairment::symmetric(
        DirectionConfig {
            duplicate: -1.0,
            ..Default::default()
        },
        0,
    );
    let err = Proxy::new(loopback)
        .impairment(bad)
        .spawn()
        .await
        .expect_err("invalid");
    assert!(matches!(err, NetemError::Config(_)), "{err}");
}

#[tokio::test]
async fn spawn_many_fronts_each_upstream() {
    let echoes = [echo().await, echo().await, echo().await];
    let upstreams: Vec<SocketAddr> = echoes.iter().map(|e| e.addr).collect();
    let proxies = spawn_many(&upstreams, &Impairment::default())
        .await
        .expect("spawn");
    assert_eq!(proxies.len(), 3);
    for (i, (proxy, echo)) in proxies.iter().zip(&echoes).enumerate() {
        assert_eq!(proxy.upstream(), echo.addr);
        let client = client_to(proxy).await;
        client.send(&[i as u8]).await.expect("send");
        assert_eq!(recv(&client).await, vec![i as u8]);
        assert_eq!(
            echo.sources.lock().expect("log").len(),
            1,
            "reached its own upstream"
        );
    }
}

#[tokio::test]
async fn shutdown_and_drop_close_the_listen_socket() {
    let echo = echo().await;
    for by_drop in [false, true] {
        let proxy = Proxy::new(echo.addr).spawn().await.expect("spawn");
        let client = client_to(&proxy).await;
        client.send(b"x").await.expect("send");
        assert_eq!(recv(&client).await, b"x");
        if by_drop {
            drop(proxy);
        } else {
            proxy.shutdown().await;
        }
        // Once the socket is closed, the kernel answers with port unreachable.
        let deadline = tokio::time::Instant::now() + GUARD;
        let mut buf = [0u8; 16];
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "proxy still answering"
            );
            let _ = client.send(b"y").await;
            match tokio::time::timeout(Duration::from_millis(20), client.recv(&mut buf)).await {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                Ok(Ok(_)) if !by_drop => panic!("a proxy that was shut down forwarded a packet"),
                _ => {}
            }
        }
    }
}
