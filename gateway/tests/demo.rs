//! End-to-end tests of `sibyl-gateway demo`: the real binary runs the hub, its shard
//! processes, a synthetic publisher and SDK consumers, checks every record and exits 0 only
//! when nothing was lost or repeated. Only processes started here are signalled, by pid.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_sibyl-gateway");
/// Generous bound for anything to happen on a loaded 2-core machine; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(90);

struct Demo {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Demo {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("demo")
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Self {
            child,
            lines,
            stdout: Vec::new(),
            stderr,
        }
    }

    /// Reads stdout lines until `f` matches one, bounded by PATIENCE.
    fn until(&mut self, f: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = f(&l);
                    self.stdout.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("gave up waiting; stdout:\n{}", self.stdout.join("\n"));
                }
            }
        }
    }

    /// Waits for the exit (bounded), then collects the rest of stdout and all of stderr.
    fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("demo did not exit; stdout:\n{}", self.stdout.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF, which the exit (and the shards' exit) brings.
        while let Ok(l) = self.lines.recv_timeout(PATIENCE) {
            self.stdout.push(l);
        }
        let stderr = self.stderr.join().unwrap();
        (status, self.stdout, stderr)
    }
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

/// `pid=N` of every `  shard gG.sS pid=N addr=…` line.
fn shard_pids(stdout: &[String]) -> Vec<i32> {
    stdout
        .iter()
        .filter(|l| l.trim_start().starts_with("shard g"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("pid="))
                .and_then(|p| p.parse().ok())
        })
        .collect()
}

/// `delivered N` of consumer `name`'s summary line.
fn delivered(stdout: &[String], name: &str) -> Option<u64> {
    let line = stdout
        .iter()
        .find(|l| l.trim_start().starts_with(&format!("{name} @")))?;
    let rest = line.split_once("delivered ")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

fn context(stdout: &[String], stderr: &str) -> String {
    format!("stdout:\n{}\nstderr:\n{stderr}", stdout.join("\n"))
}

#[test]
fn demo_delivers_every_record_to_every_consumer_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let data: PathBuf = tmp.path().join("data");
    let data_arg = data.to_str().unwrap();
    let demo = Demo::start(&[
        "--consumers",
        "2",
        "--seconds",
        "3",
        "--rate",
        "2000",
        "--data-dir",
        data_arg,
    ]);
    let (status, stdout, stderr) = demo.finish();
    let ctx = context(&stdout, &stderr);
    assert!(status.success(), "{status:?}\n{ctx}");
    let summary = stdout
        .iter()
        .find(|l| l.starts_with("summary: "))
        .unwrap_or_else(|| panic!("no summary line\n{ctx}"));
    assert!(summary.contains("2 consumers"), "{summary}");
    assert!(stdout.iter().any(|l| l.starts_with("result: OK")), "{ctx}");
    assert!(
        stdout
            .iter()
            .any(|l| l.starts_with("[") && l.contains("published")),
        "no progress line\n{ctx}"
    );
    let published: u64 = summary
        .split_once("published ")
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(published > 0, "{summary}");
    for c in ["c0", "c1"] {
        let n = delivered(&stdout, c).unwrap_or_else(|| panic!("no summary for {c}\n{ctx}"));
        // Fresh data dir, subscribed from the earliest offset: every published record.
        assert_eq!(n, published, "{c}\n{ctx}");
    }
    let pids = shard_pids(&stdout);
    assert_eq!(
        pids.len(),
        4,
        "default layout is 2 groups × 2 shards\n{ctx}"
    );
    for pid in pids {
        assert!(wait_gone(pid), "shard pid {pid} survived the demo");
    }
    // A given data dir is kept, with the demo's stream in its store.
    assert!(data.join("certs").exists());
    tmp.close().unwrap();
}

#[test]
fn ctrl_c_stops_early_prints_the_summary_and_removes_the_temp_dir() {
    let mut demo = Demo::start(&["--consumers", "1", "--seconds", "0", "--rate", "1000"]);
    demo.until(|l| l.starts_with("[") && l.contains("published"));
    kill(Pid::from_raw(demo.child.id() as i32), Signal::SIGINT).unwrap();
    let (status, stdout, stderr) = demo.finish();
    let ctx = context(&stdout, &stderr);
    assert!(status.success(), "{status:?}\n{ctx}");
    assert!(
        stdout
            .iter()
            .any(|l| l.starts_with("summary: ") && l.contains("(interrupted)")),
        "{ctx}"
    );
    assert!(delivered(&stdout, "c0").is_some_and(|n| n > 0), "{ctx}");
    for pid in shard_pids(&stdout) {
        assert!(wait_gone(pid), "shard pid {pid} survived the demo");
    }
    let dir_line = stdout
        .iter()
        .find_map(|l| l.split_once("data dir ").map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| panic!("{ctx}"));
    let dir = dir_line.split(" · ").next().unwrap();
    assert!(!Path::new(dir).exists(), "temp data dir {dir} left behind");
    assert!(
        stdout.iter().any(|l| l == &format!("removed {dir}")),
        "{ctx}"
    );
}
