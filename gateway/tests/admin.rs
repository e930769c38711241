//! The admin listener of the real `sibyl-gateway` binary: `/metrics` follows real traffic
//! (records published = the counter's increase; deliveries and consumer-group lag reported
//! by the shards), the bearer token is required, the JSON API and the operator commands
//! read the same state, and `check-config` refuses a bad file by field name.

mod support;

use std::path::Path;

use futures::StreamExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use sibyl_sdk::{Client, Start, Trust};
use support::*;

const STREAM: &str = "obs";
const RECORDS: u64 = 500;
const TOKEN: &str = "test-admin-token-0123456789";

fn config(token_file: &Path) -> String {
    format!(
        "[[shards.groups]]\nid = 0\nshards = 2\n\
         [[streams]]\nname = \"{STREAM}\"\npartitions = 2\ndurability = \"always\"\n\
         [admin]\ntoken_file = \"{}\"\n",
        token_file.display()
    )
}

fn scrape(addr: &str, token: Option<&str>) -> Result<String, ureq::Error> {
    let mut req = ureq::get(&format!("http://{addr}/metrics"));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    req.call()?.body_mut().read_to_string()
}

/// Sum of the samples of `name` whose label set contains every `labels` pair (`k="v"`).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, val)| rest.contains(&format!("{k}=\"{val}\""))))
            .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

fn gateway_cmd(args: &[&str], data: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

#[test]
fn metrics_follow_the_traffic_and_the_api_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let gw = Gateway::start(&config(&token_file), 2);
    let admin = std::fs::read_to_string(gw.data().join("run/admin.addr")).unwrap();
    let admin = admin.trim().to_owned();
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains(&format!("http://{admin}/"))),
        "the banner names the admin listener"
    );

    // The token is required.
    match scrape(&admin, None) {
        Err(ureq::Error::StatusCode(401)) => {}
        other => panic!("no token: expected 401, got {other:?}"),
    }
    let before = scrape(&admin, Some(TOKEN)).unwrap();
    let published_before = value(
        &before,
        "sibyl_publish_records_total",
        &[("stream", STREAM)],
    );
    assert_eq!(published_before, 0.0);

    let rt = runtime();
    let payload_bytes: u64 = rt.block_on(async {
        let client = Client::builder()
            .hub(gw.hub)
            .trust(Trust::CaFile(gw.ca()))
            .api_key(&gw.dev_key)
            .client_id("obs-test-client")
            .want_publish(STREAM)
            .want_subscribe(STREAM)
            .connect()
            .await
            .expect("connect");
        let publisher = client.publisher(STREAM).await.expect("publisher");
        let mut acks = Vec::new();
        let mut bytes = 0;
        for i in 0..RECORDS {
            let p = format!("record-{i:06}").into_bytes();
            bytes += p.len() as u64;
            acks.push(publisher.send(Vec::new(), p).admitted().await.unwrap());
        }
        publisher.flush().await.unwrap();
        for a in acks {
            a.await.unwrap();
        }
        let mut sub = client
            .subscribe(STREAM)
            .group("g")
            .start(Start::Earliest)
            .open()
            .await
            .expect("subscribe");
        for _ in 0..RECORDS {
            tokio::time::timeout(PATIENCE, sub.next())
                .await
                .expect("records arrive")
                .expect("subscription open")
                .expect("record");
        }
        // Keep the subscription (and so the group) while the shards report.
        let deadline = Instant::now() + PATIENCE;
        let text = loop {
            let text = tokio::task::spawn_blocking({
                let admin = admin.clone();
                move || scrape(&admin, Some(TOKEN)).unwrap()
            })
            .await
            .unwrap();
            let delivered = value(&text, "sibyl_delivery_records_total", &[("stream", STREAM)]);
            let lag = value(
                &text,
                "sibyl_consumer_group_lag",
                &[("consumer_group", "g")],
            );
            let has_lag = text.contains("sibyl_consumer_group_lag{");
            if delivered >= RECORDS as f64 && has_lag && lag == 0.0 {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "shards never reported the deliveries (delivered {delivered}, lag {lag}):\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let clients = tokio::task::spawn_blocking({
            let admin = admin.clone();
            move || {
                ureq::get(&format!("http://{admin}/api/clients"))
                    .header("Authorization", format!("Bearer {TOKEN}"))
                    .call()
                    .unwrap()
                    .body_mut()
                    .read_to_string()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let clients: serde_json::Value = serde_json::from_str(&clients).unwrap();
        assert!(
            clients
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["client_id"] == "obs-test-client"
                    && c["records"].as_u64() >= Some(RECORDS)
                    && c["group"] == 0),
            "the subscriber is a top client: {clients}"
        );
        // The counters the hub keeps itself, exact: records published = the increase.
        let published = value(&text, "sibyl_publish_records_total", &[("stream", STREAM)]);
        assert_eq!(published - published_before, RECORDS as f64);
        assert_eq!(
            value(&text, "sibyl_publish_bytes_total", &[("stream", STREAM)]),
            bytes as f64
        );
        // One ticket, one attach (a shard of group 0, labelled as such), live shard figures.
        assert!(value(&text, "sibyl_tickets_total", &[("group", "0")]) >= 1.0);
        assert!(value(&text, "sibyl_attach_seconds_count", &[("group", "0")]) >= 1.0);
        assert!(value(&text, "sibyl_attaches_total", &[("result", "ok")]) >= 1.0);
        assert!(value(&text, "sibyl_grants_total", &[]) >= 1.0);
        assert_eq!(value(&text, "sibyl_shards", &[("state", "ready")]), 2.0);
        assert!(value(&text, "process_resident_memory_bytes", &[("shard", "1")]) > 0.0);
        assert!(text.contains("# TYPE sibyl_store_fsync_seconds histogram"));
        assert!(value(&text, "sibyl_store_fsync_seconds_count", &[]) >= 1.0);
        assert_eq!(
            value(&text, "sibyl_stream_end_offset", &[("stream", STREAM)]),
            RECORDS as f64
        );
        sub.close().await;
        client.close().await;
        bytes
    });
    assert!(payload_bytes > 0);

    // The JSON API and the operator commands read the same state.
    let status = ureq::get(&format!("http://{admin}/api/status"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let stream = status["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == STREAM)
        .unwrap();
    assert_eq!(stream["published_records"], RECORDS);
    let ends: u64 = stream["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end"].as_u64().unwrap())
        .sum();
    assert_eq!(ends, RECORDS);
    // The subscriber's session was among the shards' top clients while it was attached.
    assert!(
        status["clients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["client_id"] != "obs-test-client"),
        "a closed session is no longer listed: {status}"
    );

    let data = gw.data();
    let tf = token_file.to_str().unwrap();
    let out = gateway_cmd(&["status", "--token-file", tf], &data);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2/2 shards ready") && text.contains(STREAM),
        "{text}"
    );
    let out = gateway_cmd(&["streams", "describe", STREAM, "--token-file", tf], &data);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("published {RECORDS} records")),
        "{out:?}"
    );
    let out = gateway_cmd(&["groups", "list", "--token-file", tf], &data);
    assert!(out.status.success(), "{out:?}");
    let out = gateway_cmd(&["status"], &data);
    assert!(!out.status.success(), "no token: refused");
}

#[test]
fn check_config_names_the_bad_field() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |toml: &str| {
        let f = tmp.path().join("gateway.toml");
        std::fs::write(&f, toml).unwrap();
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&f)
            .output()
            .unwrap()
    };
    let ok = check("[admin]\nenabled = false\n");
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("config OK"));
    for (toml, field) in [
        (
            "[[shards.groups]]\nid = 0\nshards = 0\n",
            "shards.groups[0].shards",
        ),
        (
            "[admin]\ntoken_file = \"/nonexistent/token\"\n",
            "admin.token_file",
        ),
        ("[admin]\nbogus = 1\n", "bogus"),
        ("[logging]\nformat = \"xml\"\n", "xml"),
    ] {
        let out = check(toml);
        assert!(!out.status.success(), "{toml} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{toml}: {err}");
    }
}

#[test]
fn json_logs_carry_the_session_span() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        "[[shards.groups]]\nid = 3\nshards = 1\n[logging]\nformat = \"json\"\n",
    )
    .unwrap();
    // Killed (by its handle) when the test ends, also on a failed assertion.
    struct Hub(std::process::Child);
    impl Drop for Hub {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut hub = Hub(Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap());
    let child = &mut hub.0;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
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
    let mut log = Vec::new();
    let mut wait_for = |f: &dyn Fn(&str) -> bool| -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(l) = rx.recv_timeout(left) else {
                panic!("gave up; output:\n{}", log.join("\n"));
            };
            eprintln!("{l}");
            log.push(l.clone());
            if f(&l) {
                return l;
            }
        }
    };
    let hub: std::net::SocketAddr = wait_for(&|l| l.trim().starts_with("hub address:"))
        .trim()
        .trim_start_matches("hub address:")
        .trim()
        .parse()
        .unwrap();
    let key = wait_for(&|l| l.trim().starts_with("dev API key:"))
        .trim()
        .trim_start_matches("dev API key:")
        .trim()
        .to_owned();
    let ready = wait_for(&|l| l.contains("shard ready"));
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("a JSON log line");
    assert_eq!(ready["fields"]["group"], 3);
    let rt = runtime();
    let client = rt.block_on(async {
        Client::builder()
            .hub(hub)
            .trust(Trust::CaFile(tmp.path().join("data/certs/ca.pem")))
            .api_key(&key)
            .client_id("json-log-client")
            .connect()
            .await
            .expect("connect")
    });
    let line = wait_for(&|l| l.contains("session attached"));
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["span"]["client_id"], "json-log-client", "{line}");
    assert_eq!(v["span"]["group"], 3, "{line}");
    assert_eq!(v["span"]["shard"], 0, "{line}");
    rt.block_on(client.close());
}

#[test]
fn sighup_reloads_certificates_and_keys_and_names_what_needs_a_restart() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut gw = Gateway::start("[[shards.groups]]\nid = 0\nshards = 1\n", 1);
    let cfg = gw.dir().join("gateway.toml");
    std::fs::write(
        &cfg,
        "[[shards.groups]]\nid = 0\nshards = 1\n[subscribe]\nbatch_records = 100\n",
    )
    .unwrap();
    kill(Pid::from_raw(gw.pid()), Signal::SIGHUP).unwrap();
    gw.until(|l| l.contains("hub certificates reloaded").then_some(()));
    gw.until(|l| l.contains("API keys reloaded").then_some(()));
    let line = gw.until(|l| l.contains("need a restart").then(|| l.to_owned()));
    assert!(line.ends_with("need a restart: subscribe"), "{line}");
    assert!(gw.running(), "the hub still runs");
    // A clean stop removes the admin address the operator commands would find.
    let addr_file = gw.data().join("run/admin.addr");
    assert!(addr_file.exists());
    kill(Pid::from_raw(gw.pid()), Signal::SIGTERM).unwrap();
    assert!(gw.exit_success());
    assert!(!addr_file.exists(), "admin.addr left behind");
}
