//! The runner's contract without a real gateway: the environment builder, the exit-code
//! semantics through real (fake) client and server scripts, and matrix rendering.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use sibyl_interop::runner::{
    Case, Cell, ClientEnv, ClientSpec, ExitVerdict, Matrix, Runner, RunnerOptions, ServerSpec,
    Verdict, parse_shard_addrs, verdict_of,
};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn env_contract_has_every_variable() {
    let mut e = ClientEnv::new(
        Case::RefuseExpired,
        "127.0.0.1:4433".parse().unwrap(),
        Path::new("/ca.pem"),
        "sk_x",
        Path::new("/out"),
    );
    e.shards = vec![
        (0, "127.0.0.1:5000".parse().unwrap()),
        (1, "127.0.0.1:5001".parse().unwrap()),
    ];
    e.wait = Some(std::time::Duration::from_secs(2));
    e.records = Some(10);
    let vars: std::collections::BTreeMap<_, _> = e.vars().into_iter().collect();
    assert_eq!(vars["ROLE"], "client");
    assert_eq!(vars["TESTCASE"], "refuse-expired");
    assert_eq!(vars["HUB_ADDR"], "127.0.0.1:4433");
    assert_eq!(vars["CA_FILE"], "/ca.pem");
    assert_eq!(vars["API_KEY"], "sk_x");
    assert_eq!(vars["STREAMS"], "interop");
    assert_eq!(vars["OUTPUT_DIR"], "/out");
    assert_eq!(vars["SERVER_NAME"], "localhost");
    assert_eq!(vars["WAIT_MS"], "2000");
    assert_eq!(vars["RECORDS"], "10");
    assert_eq!(vars["SHARD_ADDRS"], "0=127.0.0.1:5000,1=127.0.0.1:5001");
    assert!(!vars.contains_key("EVENT_AT"));
    assert_eq!(parse_shard_addrs(&vars["SHARD_ADDRS"]).unwrap(), e.shards);
    assert!(parse_shard_addrs("0=nope").is_err());
    assert_eq!(parse_shard_addrs("").unwrap(), vec![]);
}

#[test]
fn exit_codes_map_to_verdicts() {
    assert_eq!(verdict_of(Some(0)), ExitVerdict::Pass);
    assert_eq!(verdict_of(Some(127)), ExitVerdict::Unsupported);
    assert_eq!(verdict_of(Some(1)), ExitVerdict::Fail);
    assert_eq!(verdict_of(None), ExitVerdict::Fail);
}

#[test]
fn case_names_round_trip() {
    for c in Case::ALL {
        assert_eq!(c.name().parse::<Case>().unwrap(), c);
    }
    assert!("nope".parse::<Case>().is_err());
    assert!(Case::QUICK.iter().all(|c| Case::ALL.contains(c)));
}

/// Fake server (writes server.env) and fake clients: pass, unsupported, fail with a reason
/// file, fail with only stderr; also checks the client saw the contract's variables.
#[test]
fn fake_processes_give_pass_unsupported_fail() {
    let dir = tempfile::tempdir().unwrap();
    let server = script(
        dir.path(),
        "server.sh",
        "[ \"$ROLE\" = server ] || exit 1\n\
         [ \"$TESTCASE\" = refuse-expired ] && exit 127\n\
         printf 'HUB_ADDR=127.0.0.1:9\\nCA_FILE=/nonexistent.pem\\nAPI_KEY=sk_fake\\nSHARD_ADDRS=0=127.0.0.1:10\\n' > \"$OUTPUT_DIR/server.env\"\n\
         exec sleep 30",
    );
    let checks = "[ \"$ROLE\" = client ] && [ \"$HUB_ADDR\" = 127.0.0.1:9 ] && [ \"$API_KEY\" = sk_fake ] \
                  && [ \"$SHARD_ADDRS\" = 0=127.0.0.1:10 ] && [ -d \"$OUTPUT_DIR\" ] || { echo env missing >&2; exit 9; }";
    let client = script(
        dir.path(),
        "client.sh",
        &format!(
            "{checks}\ncase \"$TESTCASE\" in\n\
             handshake) exit 0 ;;\n\
             ticket) echo 'not here' > \"$OUTPUT_DIR/reason.txt\"; exit 127 ;;\n\
             direct-connect) echo 'bad attach' > \"$OUTPUT_DIR/reason.txt\"; exit 1 ;;\n\
             *) echo first >&2; echo 'last line of stderr' >&2; exit 3 ;;\n\
             esac"
        ),
    );
    let out = dir.path().join("out");
    let runner = Runner {
        servers: vec![ServerSpec::Command {
            name: "fake".into(),
            command: vec![server.display().to_string()],
        }],
        clients: vec![ClientSpec {
            name: "sh".into(),
            command: vec![client.display().to_string()],
        }],
        cases: vec![
            Case::Handshake,
            Case::Ticket,
            Case::DirectConnect,
            Case::RefuseBadKey,
            Case::RefuseExpired,
        ],
        options: RunnerOptions {
            output_dir: Some(out.clone()),
            ..RunnerOptions::default()
        },
    };
    let m = runner.run(|_| {});
    let v: Vec<(String, Verdict, Option<String>)> = m
        .cells
        .iter()
        .map(|c| (c.case.clone(), c.verdict, c.reason.clone()))
        .collect();
    assert_eq!(v[0], ("handshake".into(), Verdict::Pass, None));
    assert_eq!(v[1].1, Verdict::Unsupported);
    assert_eq!(v[1].2.as_deref(), Some("client: not here"));
    assert_eq!(
        v[2],
        (
            "direct-connect".into(),
            Verdict::Fail,
            Some("bad attach".into())
        )
    );
    assert_eq!(
        v[3],
        (
            "refuse-bad-key".into(),
            Verdict::Fail,
            Some("last line of stderr".into())
        )
    );
    assert_eq!(v[4].1, Verdict::Unsupported, "server exit 127: {:?}", v[4]);
    assert!(m.any_failed());
    assert!(
        out.join("logs/fake/sh/handshake/client/client.stderr.log")
            .is_file()
    );
}

#[test]
fn matrix_renders_markdown_and_json() {
    let cell = |client: &str, case: &str, verdict, reason: Option<&str>| Cell {
        client: client.into(),
        server: "sibyl-gateway".into(),
        case: case.into(),
        verdict,
        duration_ms: 1500,
        reason: reason.map(Into::into),
        requirements: Default::default(),
    };
    let mut m = Matrix::default();
    m.push(cell("rust", "handshake", Verdict::Pass, None));
    m.push(cell(
        "python",
        "handshake",
        Verdict::Fail,
        Some("boom | pipe"),
    ));
    m.push(cell(
        "rust",
        "rebind",
        Verdict::Unsupported,
        Some("no hook"),
    ));
    assert!(m.any_failed());
    assert_eq!(m.counts(), (1, 1, 1));
    let md = m.to_markdown();
    assert!(md.contains("| case | rust | python |"), "{md}");
    assert!(
        md.contains("| handshake | ✓ pass (1.5 s) | ✗ fail (1.5 s) |"),
        "{md}"
    );
    assert!(md.contains("| rebind | – unsupported (1.5 s) | |"), "{md}");
    assert!(
        md.contains("python × sibyl-gateway × handshake: ✗ fail — boom | pipe"),
        "{md}"
    );
    let json: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3);
    assert_eq!(cells[0]["verdict"], "pass");
    assert!(cells[0].get("reason").is_none());
    assert_eq!(cells[1]["verdict"], "fail");
    assert_eq!(cells[2]["verdict"], "unsupported");
    assert_eq!(cells[2]["duration_ms"], 1500);
    let mut ok = Matrix::default();
    ok.push(cell("rust", "ticket", Verdict::Unsupported, None));
    assert!(!ok.any_failed());
    // A conformance cell lists its requirements, one row each.
    let mut conf = cell("python", "conformance", Verdict::Fail, Some("R02"));
    conf.requirements.insert("R01".into(), "pass".into());
    conf.requirements
        .insert("R02".into(), "fail: no close".into());
    let mut m = Matrix::default();
    m.push(conf);
    let md = m.to_markdown();
    assert!(
        md.contains("| requirement | python × sibyl-gateway |"),
        "{md}"
    );
    assert!(md.contains("| R01 | pass |"), "{md}");
    assert!(md.contains("| R02 | fail: no close |"), "{md}");
    let json: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
    assert_eq!(json["cells"][0]["requirements"]["R02"], "fail: no close");
}
