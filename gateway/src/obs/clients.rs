//! Per-client delivery on a shard (I/O-free): what each attached session was sent, and its
//! rate between two reports, for the admin API's "top clients" (the hub sees no per-client
//! traffic; each shard reports its busiest sessions with its metrics).
//!
//! ```text
//! attach ── attached(conn, client_id) ──▶ ClientTable ◀── delivered(conn, records, bytes)
//! heartbeat ── top(now, n) ──▶ Vec<ClientRate> (rate since the previous report) ──▶ hub
//! session ends ── detached(conn)
//! ```

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Most clients one shard reports.
pub const TOP_CLIENTS: usize = 20;

/// One client session's delivery figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientRate {
    /// The token's client id (cut to 128 bytes).
    pub client_id: String,
    /// Records sent since the session attached.
    pub records: u64,
    /// Record bytes sent since the session attached.
    pub bytes: u64,
    /// Records per second since the previous report.
    pub records_per_s: f64,
}

#[derive(Debug)]
struct Entry {
    client_id: String,
    records: u64,
    bytes: u64,
    reported: u64,
    rate: f64,
}

/// Sessions of one shard by connection id. Call order: `attached`, any number of
/// `delivered`, `detached`; `top` whenever a report is due (`now` never moves backwards).
#[derive(Debug, Default)]
pub struct ClientTable {
    sessions: HashMap<usize, Entry>,
    last_report: Option<Instant>,
}

impl ClientTable {
    /// A session attached on connection `conn`.
    pub fn attached(&mut self, conn: usize, client_id: &str) {
        let mut id = client_id.to_owned();
        if id.len() > super::metrics::MAX_LABEL_LEN {
            let mut end = super::metrics::MAX_LABEL_LEN;
            while !id.is_char_boundary(end) {
                end -= 1;
            }
            id.truncate(end);
        }
        self.sessions.insert(
            conn,
            Entry {
                client_id: id,
                records: 0,
                bytes: 0,
                reported: 0,
                rate: 0.0,
            },
        );
    }

    /// The session on `conn` was sent `records` records of `bytes` bytes (unknown
    /// connections are ignored).
    pub fn delivered(&mut self, conn: usize, records: u64, bytes: u64) {
        if let Some(e) = self.sessions.get_mut(&conn) {
            e.records += records;
            e.bytes += bytes;
        }
    }

    /// The session on `conn` ended.
    pub fn detached(&mut self, conn: usize) {
        self.sessions.remove(&conn);
    }

    /// Attached sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is attached.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The `n` sessions with the highest rate since the previous call (ties: more records
    /// first); the first call reports rates of 0.
    pub fn top(&mut self, now: Instant, n: usize) -> Vec<ClientRate> {
        let secs = self
            .last_report
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        self.last_report = Some(now);
        for e in self.sessions.values_mut() {
            e.rate = if secs > 0.0 {
                (e.records - e.reported) as f64 / secs
            } else {
                0.0
            };
            e.reported = e.records;
        }
        let mut v: Vec<ClientRate> = self
            .sessions
            .values()
            .map(|e| ClientRate {
                client_id: e.client_id.clone(),
                records: e.records,
                bytes: e.bytes,
                records_per_s: e.rate,
            })
            .collect();
        v.sort_by(|a, b| {
            b.records_per_s
                .total_cmp(&a.records_per_s)
                .then(b.records.cmp(&a.records))
        });
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_between_reports_and_top_n() {
        let t0 = Instant::now();
        let mut t = ClientTable::default();
        t.attached(1, "slow");
        t.attached(2, "fast");
        t.attached(3, "gone");
        t.delivered(1, 10, 100);
        t.delivered(2, 50, 500);
        t.delivered(9, 1, 1); // unknown: ignored
        t.detached(3);
        let first = t.top(t0, 10);
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|c| c.records_per_s == 0.0));
        assert_eq!(first[0].client_id, "fast"); // ties by records
        t.delivered(1, 30, 300);
        t.delivered(2, 10, 100);
        let second = t.top(t0 + Duration::from_secs(2), 1);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].client_id, "slow");
        assert_eq!(second[0].records_per_s, 15.0);
        assert_eq!(second[0].records, 40);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn long_client_ids_are_cut() {
        let mut t = ClientTable::default();
        t.attached(1, &"é".repeat(200));
        let top = t.top(Instant::now(), 1);
        assert!(top[0].client_id.len() <= crate::obs::metrics::MAX_LABEL_LEN);
    }
}
