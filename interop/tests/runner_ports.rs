//! Fixed shard ports for the impairment cases: the generated config, the port-range probe,
//! and a real `sibyl-gateway` binding its shards at `port_base` (again after a SIGKILL).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sibyl_interop::runner::{Gateway, GatewayOptions, free_port_range};

fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SIBYL_GATEWAY_BIN") {
        return p.into();
    }
    let p =
        PathBuf::from(env!("CARGO_BIN_EXE_sibyl-interop-client")).with_file_name("sibyl-gateway");
    assert!(
        p.is_file(),
        "{} missing: cargo build -p sibyl-gateway",
        p.display()
    );
    p
}

#[test]
fn config_carries_port_base_and_rewrite() {
    let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:9000".parse().unwrap();
    let opts = GatewayOptions {
        port_base: Some(7000),
        rewrite: vec![(a, b)],
        ..GatewayOptions::default()
    };
    let t = opts.config_toml();
    let v: toml::Value = toml::from_str(&t).unwrap();
    assert_eq!(v["shards"]["port_base"].as_integer(), Some(7000));
    assert_eq!(v["shards"]["groups"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["advertise"]["rewrite"]["127.0.0.1:7000"].as_str(),
        Some("127.0.0.1:9000")
    );
    let plain = GatewayOptions::default().config_toml();
    assert!(
        !plain.contains("port_base") && !plain.contains("rewrite"),
        "{plain}"
    );
}

#[test]
fn free_port_range_is_bindable() {
    let base = free_port_range(3).unwrap();
    assert!(u32::from(base) + 2 <= u32::from(u16::MAX));
    for k in 0..3 {
        std::net::UdpSocket::bind(("127.0.0.1", base + k)).unwrap();
    }
}

#[test]
fn shards_bind_at_port_base_and_rebind_it_after_sigkill() {
    let base = free_port_range(2).unwrap();
    let opts = GatewayOptions {
        port_base: Some(base),
        ..GatewayOptions::default()
    };
    let g = Gateway::start(&gateway_bin(), &opts).unwrap();
    let shards = g.current_shards();
    let addrs: Vec<(u32, SocketAddr)> = shards.iter().map(|r| (r.group, r.addr)).collect();
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    assert_eq!(addrs, vec![(0, at(base)), (1, at(base + 1))]);
    let victim = g.signal_shard(at(base), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let again = loop {
        if let Some(r) = g
            .current_shards()
            .into_iter()
            .find(|r| r.group == 0 && r.pid != victim.pid)
        {
            break r;
        }
        assert!(Instant::now() < deadline, "{}", g.log_tail(40).join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(again.addr, at(base));
    g.stop(Duration::from_secs(10));
}
