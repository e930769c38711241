//! The benchmark harness behind `sibyl-bench`: scenarios that measure a Sibyl figure and its
//! baseline (bare quinn, later a reactive/static policy) in the same run, and end with one
//! JSON line on stdout.
//!
//! ```text
//!  sibyl-bench <scenario> [--repeats N] [--quick] [--json-only]
//!     │  BenchTls (dev CA + leaf, sibyl-certs)        BaselineServer (bare quinn, 127.0.0.1:0)
//!     ├─ per repeat: SibylHalf::<scenario>(…)  then  quic::<baseline>(…)   (interleaved)
//!     ├─ medians per figure ──▶ Summary
//!     ├─ stderr: progress, then "ratio figure/baseline = x (target ≥ / ≤ t)"
//!     └─ stdout, last line: {"scenario":"…","figures":{…},"baseline":{…}}
//! ```
//!
//! The Sibyl half of every scenario sits behind [`SibylHalf`]; until the gateway and SDK
//! implement it, [`NotBuilt`] answers [`BenchError::SibylNotBuilt`] and the full scenarios
//! stop before measuring anything, while `baseline-<scenario>` runs the baseline alone.

pub mod gateway;
pub mod prefetch;
pub mod quic;
mod scenario;
pub mod throughput;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

pub use scenario::{
    ColdSample, NotBuilt, Ratio, Scenario, Settings, SibylHalf, Target, ThroughputParams, run,
};

/// Named figures of one side of a scenario (numbers only), e.g. `tickets_per_s`.
pub type Figures = BTreeMap<String, f64>;

/// The result of one scenario, printed as the last line on stdout.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// The scenario as named on the command line, e.g. `admission`.
    pub scenario: String,
    /// Sibyl's figures, medians over the repeats (empty for `baseline-*` scenarios).
    pub figures: Figures,
    /// The baseline's figures, medians over the repeats.
    pub baseline: Figures,
}

impl Summary {
    /// The summary as one line of JSON (no trailing newline). Non-finite numbers become
    /// `null`, as JSON has no NaN.
    pub fn to_json_line(&self) -> String {
        // Serializing string keys and f64 values into a String cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// Median of `values` (the mean of the two middle values for an even count), sorting the
/// slice in place with `f64::total_cmp`. Returns NaN for an empty slice.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Per-key medians of several repeats' figures. A key missing from some repeats gets the
/// median of the repeats that have it.
pub fn median_figures(repeats: &[Figures]) -> Figures {
    let mut by_key: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for figures in repeats {
        for (k, v) in figures {
            by_key.entry(k.as_str()).or_default().push(*v);
        }
    }
    by_key
        .into_iter()
        .map(|(k, mut v)| (k.to_owned(), median(&mut v)))
        .collect()
}

/// Milliseconds of a duration, as a figure.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Errors of the harness and its baselines.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The Sibyl half of this scenario does not exist yet; run `baseline-<scenario>`.
    #[error(
        "sibyl part not built yet for scenario `{scenario}` (run `sibyl-bench baseline-{scenario}` for the baseline alone)"
    )]
    SibylNotBuilt {
        /// The scenario.
        scenario: &'static str,
    },
    /// The Sibyl half failed.
    #[error("sibyl half failed: {0}")]
    Sibyl(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Generating or loading the dev certificates failed.
    #[error("certificates: {0}")]
    Certs(#[from] sibyl_certs::CertError),
    /// The TLS configuration lacks TLS_AES_128_GCM_SHA256, which QUIC needs for Initials.
    #[error("TLS configuration has no QUIC initial cipher suite")]
    NoInitialCipherSuite,
    /// Local I/O (socket, temporary directory).
    #[error("i/o: {0}")]
    Io(#[source] std::io::Error),
    /// quinn refused to start a connection (caller-side configuration).
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// A connection failed or was closed by the peer.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading a stream failed.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    /// A stream was finished after it had been closed.
    #[error("stream already closed")]
    StreamClosed,
    /// The stream ended before carrying everything requested.
    #[error("stream ended after {got} of {expected} bytes")]
    ShortStream {
        /// Bytes requested.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// A parameter is out of range (caller misuse).
    #[error("bad parameter: {0}")]
    BadParameter(&'static str),
    /// A measuring task panicked or was cancelled.
    #[error("a measuring task failed")]
    TaskFailed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty_and_unsorted() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn median_figures_per_key() {
        let a: Figures = [("x".into(), 1.0), ("y".into(), 10.0)].into();
        let b: Figures = [("x".into(), 3.0)].into();
        let c: Figures = [("x".into(), 2.0), ("y".into(), 20.0)].into();
        let m = median_figures(&[a, b, c]);
        assert_eq!(m["x"], 2.0);
        assert_eq!(m["y"], 15.0);
    }

    #[test]
    fn summary_is_one_json_line_with_three_keys() {
        let s = Summary {
            scenario: "admission".into(),
            figures: [("tickets_per_s".into(), 900.5)].into(),
            baseline: [("quinn_handshakes_per_s".into(), 1000.0)].into(),
        };
        let line = s.to_json_line();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 3);
        assert_eq!(v["scenario"], "admission");
        assert_eq!(v["figures"]["tickets_per_s"], 900.5);
        assert_eq!(v["baseline"]["quinn_handshakes_per_s"], 1000.0);
    }
}
