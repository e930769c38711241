//! PROTOCOL.md §10 stays complete: every requirement id the text uses is in the table, every
//! row has a check, a `wire` row's check exists in the Python conformance client, a `client`
//! row names a test that exists, and the conformance client checks nothing the table lacks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("interop/ sits in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `R` followed by two digits in `text` after `marker`.
fn ids_after(text: &str, marker: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        let tail = &rest[i + marker.len()..];
        let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
        if digits.len() == 2 {
            out.insert(format!("R{digits}"));
        }
        rest = tail;
    }
    out
}

/// Files under `dir` (recursively) whose name ends in `.rs`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n != "target") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_requirement_has_a_check() {
    let doc = read("docs/PROTOCOL.md");
    let (text, table) = doc
        .split_once("## 10. Requirements and their checks")
        .expect("PROTOCOL.md has §10");
    let used = ids_after(text, "**[R");
    let mut rows = BTreeSet::new();
    let mut wire = BTreeSet::new();
    let mut client_tests = Vec::new();
    for line in table.lines().filter(|l| l.starts_with("| R")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (id, check) = (cells[1].to_owned(), cells[4]);
        assert!(rows.insert(id.clone()), "{id} twice in §10");
        if check == "wire" {
            wire.insert(id);
        } else {
            let test = check
                .rsplit('`')
                .nth(1)
                .unwrap_or_else(|| panic!("{id}: a client check names its test in backticks"));
            assert!(check.starts_with("client:"), "{id}: check {check:?}");
            client_tests.push((id, test.to_owned()));
        }
    }
    assert_eq!(used, rows, "ids used in the text vs rows of §10");
    assert!(rows.len() >= 20, "only {} requirements", rows.len());

    let checks = ids_after(&read("interop/clients/python/conformance.py"), "@check(\"R");
    assert_eq!(wire, checks, "wire rows of §10 vs checks in conformance.py");

    let mut files = Vec::new();
    for dir in ["sdk", "gateway", "tokens", "certs", "interop"] {
        rust_files(&root().join(dir), &mut files);
    }
    let sources: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect();
    for (id, test) in client_tests {
        let decl = format!("fn {test}(");
        assert!(
            sources.iter().any(|s| s.contains(&decl)),
            "{id}: no test `{test}` in the workspace"
        );
    }
}
