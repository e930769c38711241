//! The worked examples of `docs/PROTOCOL.md`: `print_examples` (ignored; run with
//! `cargo test -p sibyl-proto --test doc_examples -- --ignored --nocapture`) prints them from the
//! real encoder; `doc_examples_decode` checks every example block in the document decodes to
//! the same frame and re-encodes to the same bytes.

use std::collections::BTreeMap;

use sibyl_proto::frame::*;
use sibyl_proto::{Codec, ErrorCode, Frame, Reader, attach_proof};

fn examples() -> Vec<(&'static str, Frame)> {
    let secret = [0x11; 32];
    let exporter = [0x22; 32];
    vec![
        (
            "hello",
            Hello {
                client_id: "app-1".into(),
                api_key: "sk_test".into(),
                profile: Profile {
                    region: "eu".into(),
                    device_class: "server".into(),
                    sdk_version: "sibyl-sdk/0.1".into(),
                },
                wants: vec![Want {
                    stream: "prices".into(),
                    action: Action::Subscribe,
                }],
                versions: vec![1],
            }
            .into(),
        ),
        (
            "ticket",
            Ticket {
                version: 1,
                token: vec![0xde, 0xad, 0xbe, 0xef],
                session_secret: secret,
                shard_group: 7,
                expires_at: 1_700_000_000,
                endpoints: vec![
                    Endpoint {
                        addr: "127.0.0.1:4434".into(),
                        server_name: "shard-a".into(),
                    },
                    Endpoint {
                        addr: "127.0.0.1:4435".into(),
                        server_name: "shard-b".into(),
                    },
                ],
            }
            .into(),
        ),
        (
            "group_hint",
            GroupHint {
                shard_group: 7,
                endpoints: vec![Endpoint {
                    addr: "127.0.0.1:4434".into(),
                    server_name: "shard-a".into(),
                }],
            }
            .into(),
        ),
        (
            "refused",
            Refused {
                code: ErrorCode::UnsupportedVersion,
                reason: "no common version".into(),
                retry_after_ms: None,
                versions: vec![1],
            }
            .into(),
        ),
        (
            "attach",
            Attach {
                token: vec![0xde, 0xad, 0xbe, 0xef],
                proof: attach_proof(&secret, &exporter),
                client_id: "app-1".into(),
                resume: None,
            }
            .into(),
        ),
        (
            "attached",
            Attached {
                session_id: 42,
                limits: SessionLimits {
                    max_streams: 100,
                    max_frame: 65_536,
                    idle_timeout_ms: 30_000,
                },
                server_time: 1_700_000_000_000,
            }
            .into(),
        ),
        (
            "early_attach",
            EarlyAttach {
                token: vec![0xde, 0xad, 0xbe, 0xef],
                client_id: "app-1".into(),
                resume: Some(42),
            }
            .into(),
        ),
        (
            "attach_proof",
            AttachProof {
                proof: attach_proof(&secret, &exporter),
            }
            .into(),
        ),
        (
            "subscribe",
            Subscribe {
                sub_id: 1,
                stream: "prices".into(),
                start: Start::Offsets(BTreeMap::from([(0, 100)])),
                group: None,
                mode: Mode::Predictive,
            }
            .into(),
        ),
        (
            "subscribe_latest",
            Subscribe {
                sub_id: 2,
                stream: "news".into(),
                start: Start::Latest,
                group: Some("g".into()),
                mode: Mode::Reactive,
            }
            .into(),
        ),
        (
            "assignment",
            Assignment {
                sub_id: 1,
                epoch: 1,
                partitions: vec![AssignedPartition {
                    partition: 0,
                    start_offset: 100,
                    priority: 5,
                }],
            }
            .into(),
        ),
        (
            "grant",
            Grant {
                rate_records_per_s: 1000,
                burst: 200,
                lease_expires_ms: 1_700_000_005_000,
            }
            .into(),
        ),
        (
            "partition_open",
            PartitionOpen {
                sub_id: 1,
                partition: 0,
                epoch: 1,
            }
            .into(),
        ),
        (
            "records",
            Records::from_records(
                0,
                &[
                    Record {
                        offset: 100,
                        timestamp: 1_700_000_000_000,
                        key: b"k1".to_vec(),
                        payload: b"hello".to_vec(),
                    },
                    Record {
                        offset: 101,
                        timestamp: 1_700_000_000_001,
                        key: vec![],
                        payload: b"world".to_vec(),
                    },
                ],
            )
            .expect("valid batch")
            .into(),
        ),
        (
            "position",
            Position {
                partition: 0,
                next_offset: 102,
                epoch: Some(1),
            }
            .into(),
        ),
        ("publish_open", PublishOpen::new("prices").into()),
        (
            "publish_open_producer",
            PublishOpen::idempotent("prices", Some((42, [0x33; 16]))).into(),
        ),
        (
            "publish_accepted_producer",
            PublishAccepted {
                partitions: 4,
                max_frame: 1_572_880,
                producer_id: Some(42),
                producer_token: Some([0x33; 16]),
                max_in_flight: Some(64),
            }
            .into(),
        ),
        (
            "produce",
            Produce::from_records(
                1,
                0,
                &[NewRecord {
                    timestamp: 0,
                    key: b"k1".to_vec(),
                    payload: b"hi".to_vec(),
                }],
            )
            .expect("valid batch")
            .into(),
        ),
        (
            "produce_ack",
            ProduceAck {
                seq: 1,
                partition: 0,
                base_offset: 102,
                count: 1,
            }
            .into(),
        ),
    ]
}

fn hex_block(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "generator for docs/PROTOCOL.md; run with --ignored --nocapture"]
fn print_examples() {
    for (name, f) in examples() {
        println!(
            "<!-- example: {name} -->\n```text\n{}\n```\n",
            hex_block(&f.to_vec())
        );
    }
}

/// Extracts `(name, bytes)` for every `<!-- example: NAME -->` + fenced hex block.
fn doc_blocks(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- example: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next().map(str::trim),
            Some("```text"),
            "example {name}: expected a ```text fence"
        );
        let mut hex = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            hex.extend(l.chars().filter(|c| !c.is_whitespace()));
        }
        out.push((
            name.to_string(),
            hex::decode(&hex).unwrap_or_else(|e| panic!("example {name}: bad hex: {e}")),
        ));
    }
    out
}

#[test]
fn doc_examples_decode() {
    // The runtime value first: cargo sets it for every test run, while the compile-time one
    // is wherever the binary was built (a checkout sharing this target dir may be gone).
    let dir = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    let path = std::path::Path::new(&dir).join("../../docs/PROTOCOL.md");
    let doc = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let blocks = doc_blocks(&doc);
    let expected = examples();
    assert_eq!(
        blocks.len(),
        expected.len(),
        "every example appears once in the document"
    );
    for (name, bytes) in blocks {
        let want = expected
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("unknown example {name}"));
        let mut r = Reader::new(&bytes);
        let got =
            Frame::decode(&mut r).unwrap_or_else(|e| panic!("example {name} does not decode: {e}"));
        assert_eq!(r.remaining(), 0, "example {name}: extra bytes");
        assert_eq!(got, want.1, "example {name}: decodes to a different frame");
        assert_eq!(
            got.to_vec(),
            bytes,
            "example {name}: re-encodes differently"
        );
    }
}

#[test]
fn attach_proof_example() {
    // The attach example's proof: HMAC-SHA256(key = 32×0x11, msg = 32×0x22), cross-checked with
    // Python's `hmac.new(bytes([0x11]*32), bytes([0x22]*32), hashlib.sha256)`.
    assert_eq!(
        hex::encode(attach_proof(&[0x11; 32], &[0x22; 32])),
        "acfecbc329264d7fdf1f0b9428f9fcd8936da6200960a422170f3d7a97eaed0e"
    );
}
