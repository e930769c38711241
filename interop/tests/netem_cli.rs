//! The `sibyl-netem` binary: first stdout line, forwarding, config file, SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Failure guard for blocking reads (never a timing assertion).
const GUARD: Duration = Duration::from_secs(10);

/// A blocking UDP echo server answering `count` datagrams.
fn echo(count: usize) -> (SocketAddr, JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind echo");
    sock.set_read_timeout(Some(GUARD)).expect("timeout");
    let addr = sock.local_addr().expect("addr");
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..count {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    (addr, thread)
}

/// Kills the child by PID on drop if a test fails before it exits.
struct Netem(Child);

impl Drop for Netem {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn start(args: &[&str]) -> (Netem, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sibyl-netem"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sibyl-netem");
    let stdout = child.stdout.take().expect("piped stdout");
    let child = Netem(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("socket address");
    (child, addr)
}

fn round_trip(proxy: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    sock.set_read_timeout(Some(GUARD)).expect("timeout");
    sock.send_to(payload, proxy).expect("send");
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).expect("echo through the proxy");
    assert_eq!(from, proxy);
    buf[..n].to_vec()
}

fn terminate(mut child: Netem) {
    let pid = Pid::from_raw(i32::try_from(child.0.id()).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn forwards_with_flags_and_exits_on_sigterm() {
    let (upstream, echo) = echo(1);
    let up = upstream.to_string();
    let (child, proxy) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--delay",
        "1ms",
        "--jitter",
        "1ms",
        "--seed",
        "7",
        "--down-delay",
        "2ms",
    ]);
    assert!(proxy.ip().is_loopback() && proxy.port() != 0);
    assert_eq!(round_trip(proxy, b"hello"), b"hello");
    terminate(child);
    echo.join().expect("echo thread");
}

#[test]
fn reads_a_config_file() {
    let (upstream, echo) = echo(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("netem.toml");
    let text = format!(
        "upstream = \"{upstream}\"\nseed = 3\n[up]\ndelay = \"1ms\"\n[down]\nduplicate = 0.0\n"
    );
    std::fs::write(&path, text).expect("write config");
    let (child, proxy) = start(&["--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(round_trip(proxy, b"from file"), b"from file");
    terminate(child);
    echo.join().expect("echo thread");
}

#[test]
fn rejects_bad_settings() {
    let bad: [&[&str]; 5] = [
        &["--upstream", "192.0.2.1:4433"],
        &["--upstream", "127.0.0.1:4433", "--listen", "0.0.0.0:0"],
        &["--upstream", "127.0.0.1:4433", "--loss", "1.5"],
        &["--upstream", "127.0.0.1:4433", "--delay", "soon"],
        &["--loss", "0.1"],
    ];
    for args in bad {
        let out = Command::new(env!("CARGO_BIN_EXE_sibyl-netem"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run sibyl-netem");
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!out.stderr.is_empty(), "{args:?} gave no reason");
    }
}
