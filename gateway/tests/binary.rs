//! End-to-end tests of the `sibyl-gateway` binary: the hub supervising real shard processes,
//! the key tools and `token inspect`. Only processes started here are signalled, by pid.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_sibyl-gateway");
/// Generous bound for anything to happen on a loaded 2-core machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ready {
    group: u32,
    shard: u32,
    pid: i32,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

fn parse_ready(line: &str) -> Option<Ready> {
    if !line.contains("shard ready") {
        return None;
    }
    Some(Ready {
        group: field(line, "group")?.parse().ok()?,
        shard: field(line, "shard")?.parse().ok()?,
        pid: field(line, "pid")?.parse().ok()?,
    })
}

/// Whether `pid` is gone (no such process, or a zombie awaiting its reaper).
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn wait_gone(pid: i32) -> bool {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        if is_gone(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

struct Hub {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Hub {
    fn start(data_dir: &std::path::Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(["--heartbeat-interval", "200ms", "--drain-deadline", "5s"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx2.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Reads lines until `f` returns Some, bounded by PATIENCE.
    fn until<T>(&mut self, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let r = f(&l);
                    self.log.push(l);
                    if let Some(r) = r {
                        return r;
                    }
                }
                Err(_) => {
                    let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
                    panic!("gave up waiting; output so far:\n{}", self.log.join("\n"));
                }
            }
        }
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("hub did not exit; output:\n{}", self.log.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn hub_starts_shards_restarts_a_killed_one_and_drains_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut hub = Hub::start(&data, &[]);

    // Default: 2 groups × 2 shards, each reports ready. The banner (stdout) and the
    // `shard ready` lines (stderr) come through two reader threads in any order, so every
    // line is tried against every piece.
    enum Piece {
        Fingerprint(String),
        DevKey(String),
        Ready(Ready),
    }
    let (mut fingerprint, mut dev_key, mut ready) = (None, None, Vec::new());
    while fingerprint.is_none() || dev_key.is_none() || ready.len() < 4 {
        match hub.until(|l| {
            if l.contains("CA fingerprint:") {
                return Some(Piece::Fingerprint(l.to_owned()));
            }
            if let Some(k) = l.trim().strip_prefix("dev API key:") {
                return Some(Piece::DevKey(k.trim().to_owned()));
            }
            parse_ready(l).map(Piece::Ready)
        }) {
            Piece::Fingerprint(f) => fingerprint = Some(f),
            Piece::DevKey(k) => dev_key = Some(k),
            Piece::Ready(r) => ready.push(r),
        }
    }
    let (fingerprint, dev_key) = (fingerprint.unwrap(), dev_key.unwrap());
    assert!(fingerprint.contains("SHA256 "), "{fingerprint}");
    assert!(dev_key.starts_with("sk_"));
    let mut slots: Vec<(u32, u32)> = ready.iter().map(|r| (r.group, r.shard)).collect();
    slots.sort();
    assert_eq!(slots, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
    let mut all_pids: Vec<i32> = ready.iter().map(|r| r.pid).collect();

    // SIGKILL shard group=0 shard=1: the hub restarts it.
    let victim = ready
        .iter()
        .find(|r| r.group == 0 && r.shard == 1)
        .unwrap()
        .clone();
    kill(Pid::from_raw(victim.pid), Signal::SIGKILL).unwrap();
    let replacement = hub.until(|l| parse_ready(l).filter(|r| r.group == 0 && r.shard == 1));
    assert_ne!(replacement.pid, victim.pid);
    assert!(wait_gone(victim.pid));
    all_pids.push(replacement.pid);
    assert!(
        hub.log
            .iter()
            .any(|l| l.contains("shard died; restarting") && l.contains("shard=1"))
    );

    // SIGTERM the hub: it drains and exits 0, leaving no shard behind.
    kill(Pid::from_raw(hub.child.id() as i32), Signal::SIGTERM).unwrap();
    let status = hub.wait_exit();
    assert!(status.success(), "{status:?}");
    for pid in all_pids {
        assert!(wait_gone(pid), "shard pid {pid} survived the hub");
    }

    // A second start reuses the data dir and prints no new dev key.
    let mut hub = Hub::start(&data, &[]);
    let fp2 = hub.until(|l| l.contains("CA fingerprint:").then(|| l.to_owned()));
    assert_eq!(fp2, fingerprint);
    hub.until(|l| l.contains("Press Ctrl-C").then_some(()));
    assert!(!hub.log.iter().any(|l| l.contains("dev API key:")));
    kill(Pid::from_raw(hub.child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(hub.wait_exit().success());
}

#[test]
fn shards_exit_when_the_hub_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(&tmp.path().join("data"), &[]);
    let mut pids = Vec::new();
    while pids.len() < 4 {
        pids.push(hub.until(parse_ready).pid);
    }
    hub.child.kill().unwrap(); // SIGKILL: no drain; the shards see their control socket close
    let _ = hub.child.wait();
    for pid in pids {
        assert!(wait_gone(pid), "orphaned shard {pid}");
    }
}

#[test]
fn invalid_config_is_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("gw.toml");
    std::fs::write(&cfg, "[[shards.groups]]\nid = 0\nshards = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shards.groups[0].shards must be ≥ 1"), "{err}");

    std::fs::write(&cfg, "[supervision]\nheartbeat = \"1s\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat"));
    assert!(
        !tmp.path().join("d").exists(),
        "nothing is created for a refused config"
    );
}

#[test]
fn api_key_new_then_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "keys",
            "api-key",
            "new",
            "--name",
            "orders-app",
            "--scope",
            "orders.*:subscribe,publish",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("sk_"));

    let stored = std::fs::read_to_string(tmp.path().join("api-keys.toml")).unwrap();
    assert!(
        !stored.contains(&key[16..]),
        "the key itself is never stored"
    );

    let store =
        sibyl_gateway::apikeys::ApiKeyStore::load(&tmp.path().join("api-keys.toml")).unwrap();
    let rec = store.verify(&key).unwrap();
    assert_eq!(rec.name, "orders-app");
    assert!(rec.allows("orders.eu", sibyl_gateway::apikeys::ScopeAction::Publish));

    let check = |k: &str| {
        let mut c = Command::new(BIN)
            .args(["keys", "api-key", "check", "--data-dir"])
            .arg(tmp.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(c.stdin.take().unwrap(), "{k}").unwrap();
        c.wait_with_output().unwrap()
    };
    assert!(check(&key).status.success());
    let mut wrong = key.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == 'A' { 'B' } else { 'A' });
    let out = check(&wrong);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));

    // Bad scope: refused, store unchanged.
    let out = Command::new(BIN)
        .args([
            "keys",
            "api-key",
            "new",
            "--name",
            "x",
            "--scope",
            "orders",
            "--data-dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("api-keys.toml")).unwrap(),
        stored
    );
}

#[test]
fn token_inspect_prints_claims_or_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keyring.cbor");
    let out = Command::new(BIN)
        .args(["keys", "generate", "--file"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ring = sibyl_tokens::Keyring::load(&keys).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let scopes = vec![sibyl_tokens::Scope::subscribe("orders.*".parse().unwrap())];
    let claims = sibyl_tokens::Claims::issue(
        "client-7",
        3,
        scopes.clone(),
        "default",
        now,
        Duration::from_secs(600),
    )
    .unwrap();
    let text = sibyl_tokens::to_text(&ring.seal(&claims, b"sibyl-dev").unwrap());

    let inspect = |token: &str| {
        Command::new(BIN)
            .args(["token", "inspect", "--keys"])
            .arg(&keys)
            .arg(token)
            .output()
            .unwrap()
    };
    let out = inspect(&text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["client_id"], "client-7");
    assert_eq!(v["shard_group"], 3);
    assert_eq!(v["scopes"][0]["stream"], "orders.*");
    assert_eq!(v["expires_at"], now + 600);
    let secret_hex = hex::encode(claims.session_secret.as_bytes());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("secret") && !printed.contains(&secret_hex));

    // Tampered: refused as invalid.
    let mut bytes = sibyl_tokens::from_text(&text).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let out = inspect(&sibyl_tokens::to_text(&bytes));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused (invalid)"));

    // Expired long ago: refused as stale.
    let old = sibyl_tokens::Claims::issue(
        "c",
        0,
        scopes,
        "default",
        now - 7200,
        Duration::from_secs(60),
    )
    .unwrap();
    let out = inspect(&sibyl_tokens::to_text(
        &ring.seal(&old, b"sibyl-dev").unwrap(),
    ));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused (stale)"));

    // Rotation through the CLI keeps old tokens opening during the grace period.
    let out = Command::new(BIN)
        .args(["keys", "rotate", "--grace", "1h", "--file"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(inspect(&text).status.success());
}

#[test]
fn certs_init_writes_the_four_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let out = Command::new(BIN)
        .args(["certs", "init", "--name", "edge.example", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("CA fingerprint:"));
}
