//! One real run: `handshake` and `ticket` with the Rust client against a real
//! `sibyl-gateway` (built by `cargo build -p sibyl-gateway`, or `SIBYL_GATEWAY_BIN`).

use std::path::PathBuf;

use sibyl_interop::runner::{Case, ClientSpec, Runner, RunnerOptions, ServerSpec, Verdict};

fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SIBYL_GATEWAY_BIN") {
        return p.into();
    }
    let client = PathBuf::from(env!("CARGO_BIN_EXE_sibyl-interop-client"));
    let p = client.with_file_name("sibyl-gateway");
    assert!(
        p.is_file(),
        "{} missing: run `cargo build -p sibyl-gateway` first or set SIBYL_GATEWAY_BIN",
        p.display()
    );
    p
}

#[test]
fn rust_client_handshake_and_ticket_pass() {
    let out = tempfile::tempdir().unwrap();
    let runner = Runner {
        servers: vec![ServerSpec::Gateway {
            bin: gateway_bin(),
            data_plane: false,
        }],
        clients: vec![ClientSpec {
            name: "rust".into(),
            command: vec![env!("CARGO_BIN_EXE_sibyl-interop-client").into()],
        }],
        cases: vec![Case::Handshake, Case::Ticket, Case::Transfer],
        options: RunnerOptions {
            output_dir: Some(out.path().to_owned()),
            ..RunnerOptions::default()
        },
    };
    let m = runner.run(|_| {});
    assert_eq!(m.cells.len(), 3);
    for c in &m.cells[..2] {
        assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
    }
    // Statically unsupported while the gateway lacks the data plane: reason says why.
    assert_eq!(m.cells[2].verdict, Verdict::Unsupported);
    assert!(
        m.cells[2]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("publish")
    );
    assert!(!m.any_failed());
}
