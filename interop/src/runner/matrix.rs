//! The result matrix: client × server × case → pass / fail / unsupported, rendered as
//! Markdown and JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

/// The verdict of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The client exited 0.
    Pass,
    /// The client or the server exited 127, or the runner knows a side cannot run the case.
    Unsupported,
    /// Anything else: non-zero exit, timeout, server failure, a runner-side check failed.
    Fail,
}

impl Verdict {
    fn symbol(self) -> &'static str {
        match self {
            Verdict::Pass => "✓ pass",
            Verdict::Unsupported => "– unsupported",
            Verdict::Fail => "✗ fail",
        }
    }
}

/// One result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Client implementation name (`rust`, `python`, …).
    pub client: String,
    /// Server implementation name (`sibyl-gateway`, …).
    pub server: String,
    /// Test case name.
    pub case: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Wall-clock duration of the cell in milliseconds (server start included).
    pub duration_ms: u64,
    /// Why, for `fail` and `unsupported`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The `conformance` case: requirement id (PROTOCOL.md §10) → `pass` / `fail: why`, as
    /// the client wrote them to `requirements.json`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub requirements: BTreeMap<String, String>,
}

/// All results of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Matrix {
    /// Cells in run order.
    pub cells: Vec<Cell>,
}

impl Matrix {
    /// Adds a cell.
    pub fn push(&mut self, cell: Cell) {
        self.cells.push(cell);
    }

    /// Whether any cell failed (the runner then exits non-zero).
    pub fn any_failed(&self) -> bool {
        self.cells.iter().any(|c| c.verdict == Verdict::Fail)
    }

    /// Counts of (pass, fail, unsupported).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |v| self.cells.iter().filter(|c| c.verdict == v).count();
        (n(Verdict::Pass), n(Verdict::Fail), n(Verdict::Unsupported))
    }

    /// JSON: `{"cells": [{client, server, case, verdict, duration_ms, reason?}, …]}`.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, integers and enums into a String cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Markdown: one table per server (rows: cases, columns: clients), then the reasons of
    /// every non-passing cell.
    pub fn to_markdown(&self) -> String {
        let mut out = String::from("# Sibyl interop matrix\n\n");
        let (p, f, u) = self.counts();
        let _ = writeln!(out, "{p} pass, {f} fail, {u} unsupported\n");
        let servers = ordered(self.cells.iter().map(|c| c.server.as_str()));
        let clients = ordered(self.cells.iter().map(|c| c.client.as_str()));
        let cases = ordered(self.cells.iter().map(|c| c.case.as_str()));
        for server in &servers {
            let _ = writeln!(out, "## server: {server}\n");
            let _ = write!(out, "| case |");
            for c in &clients {
                let _ = write!(out, " {c} |");
            }
            out.push_str("\n|---|");
            for _ in &clients {
                out.push_str("---|");
            }
            out.push('\n');
            for case in &cases {
                let _ = write!(out, "| {case} |");
                for client in &clients {
                    match self.find(client, server, case) {
                        Some(cell) => {
                            let _ = write!(
                                out,
                                " {} ({:.1} s) |",
                                cell.verdict.symbol(),
                                cell.duration_ms as f64 / 1000.0
                            );
                        }
                        None => out.push_str(" |"),
                    }
                }
                out.push('\n');
            }
            out.push('\n');
        }
        let notes: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| c.verdict != Verdict::Pass)
            .collect();
        let checked: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| !c.requirements.is_empty())
            .collect();
        if !checked.is_empty() {
            out.push_str("## requirements (PROTOCOL.md §10)\n\n| requirement |");
            for c in &checked {
                let _ = write!(out, " {} × {} |", c.client, c.server);
            }
            out.push_str("\n|---|");
            for _ in &checked {
                out.push_str("---|");
            }
            out.push('\n');
            let ids: BTreeSet<&str> = checked
                .iter()
                .flat_map(|c| c.requirements.keys().map(String::as_str))
                .collect();
            for id in ids {
                let _ = write!(out, "| {id} |");
                for c in &checked {
                    let _ = write!(
                        out,
                        " {} |",
                        c.requirements.get(id).map_or("", String::as_str)
                    );
                }
                out.push('\n');
            }
            out.push('\n');
        }
        if !notes.is_empty() {
            out.push_str("## reasons\n\n");
            for c in notes {
                let _ = writeln!(
                    out,
                    "- {} × {} × {}: {} — {}",
                    c.client,
                    c.server,
                    c.case,
                    c.verdict.symbol(),
                    c.reason.as_deref().unwrap_or("(no reason given)")
                );
            }
        }
        out
    }

    fn find(&self, client: &str, server: &str, case: &str) -> Option<&Cell> {
        self.cells
            .iter()
            .rev()
            .find(|c| c.client == client && c.server == server && c.case == case)
    }
}

/// Distinct values in first-seen order.
fn ordered<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = BTreeSet::new();
    it.filter(|s| seen.insert(*s)).collect()
}
