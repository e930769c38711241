//! The status page of the real `sibyl-gateway` binary in headless Chromium: with a synthetic
//! publisher running, the page's plots draw points from live data and no script error
//! occurs. The page marks both on `<body>`: `data-plotted="live"` once a plot drew a
//! non-zero rate, `data-error` from `window.onerror`.
//!
//! Chromium is Debian's `chromium` package (`.ci/run` installs it). Without it the test
//! says so loudly and passes, except under CI (`CI=true`), where it fails.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()?;
        let path = String::from_utf8(out.stdout).ok()?;
        let path = path.trim();
        (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
    })
}

#[test]
fn status_page_plots_live_data_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        let msg = "chromium is not installed: the status page test did NOT run \
                   (apt-get install chromium, as .ci/run does)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("\n!!!!!!!!!! {msg} !!!!!!!!!!\n");
        return;
    };
    let gw = Gateway::start(
        "[[shards.groups]]\nid = 0\nshards = 1\n\
         [[synthetic]]\nname = \"page\"\npartitions = 2\nrate = 2000\nsize = 50\n",
        1,
    );
    let admin = std::fs::read_to_string(gw.data().join("run/admin.addr")).unwrap();
    let url = format!("http://{}/", admin.trim());
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            // Virtual time: the page's one-second poll runs several times.
            "--virtual-time-budget=8000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Bounded wait; only this child is killed (by its handle) if it hangs.
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    let body = dom
        .find("<body")
        .map(|i| &dom[i..dom[i..].find('>').map_or(dom.len(), |j| i + j + 1)])
        .unwrap_or_else(|| panic!("no <body> in the DOM; chromium said:\n{log}"));
    assert!(!body.contains("data-error"), "script error: {body}\n{log}");
    assert!(
        !log.contains("Uncaught"),
        "console error in chromium's log:\n{log}"
    );
    assert!(
        body.contains("data-plotted=\"live\""),
        "the plots never drew live data: {body}\nchromium said:\n{log}"
    );
    // The tables were filled from the API too.
    assert!(
        dom.contains(">page<"),
        "stream table without the stream:\n{dom}"
    );
    assert!(
        dom.contains("g0.s0"),
        "shard table without the shard:\n{dom}"
    );
}
