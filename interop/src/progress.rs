//! Progress output of `sibyl-bench` and `sibyl-interop`: an indicatif bar on a terminal,
//! plain lines otherwise (no bar, no escape codes in logs and CI output).
//!
//! ```text
//! Progress::new(total, what) ── stderr is a terminal? ── bar (lines printed above it)
//!                                                   └─ no ─ plain eprintln lines
//! ```

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar (or spinner, for an unknown total) that is only drawn on a terminal.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// `total` steps (`None`: a spinner) of `what` (e.g. "cells").
    pub fn new(total: Option<u64>, what: &str) -> Self {
        Self::with(std::io::stderr().is_terminal(), total, what)
    }

    /// Like [`new`](Self::new), with the terminal check given (tests).
    pub fn with(terminal: bool, total: Option<u64>, what: &str) -> Self {
        if !terminal {
            return Self { bar: None };
        }
        let bar = match total {
            Some(n) => {
                let b = ProgressBar::new(n);
                if let Ok(style) = ProgressStyle::with_template(&format!(
                    "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what} {{msg}}"
                )) {
                    b.set_style(style.progress_chars("=> "));
                }
                b
            }
            None => {
                let b = ProgressBar::new_spinner();
                if let Ok(style) =
                    ProgressStyle::with_template(&format!("{{spinner}} {{elapsed}} {what} {{msg}}"))
                {
                    b.set_style(style);
                }
                b.enable_steady_tick(Duration::from_millis(200));
                b
            }
        };
        Self { bar: Some(bar) }
    }

    /// Whether a bar is drawn.
    pub fn is_drawn(&self) -> bool {
        self.bar.is_some()
    }

    /// Prints a line (above the bar on a terminal, to stderr otherwise).
    pub fn line(&self, line: impl std::fmt::Display) {
        match &self.bar {
            Some(b) => b.println(line.to_string()),
            None => eprintln!("{line}"),
        }
    }

    /// Shows `msg` next to the bar (nothing without a bar).
    pub fn message(&self, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(msg.into());
        }
    }

    /// One step done.
    pub fn inc(&self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

static BENCH: std::sync::OnceLock<Progress> = std::sync::OnceLock::new();

/// `sibyl-bench`'s progress line: printed above a spinner on a terminal.
pub fn bench_line(line: std::fmt::Arguments<'_>) {
    let p = BENCH.get_or_init(|| Progress::new(None, "sibyl-bench"));
    p.line(line);
    p.message(line.to_string());
}

/// Clears `sibyl-bench`'s spinner (before the summary line).
pub fn bench_done() {
    if let Some(Some(b)) = BENCH.get().map(|p| p.bar.as_ref()) {
        b.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_bar_without_a_terminal() {
        let p = Progress::with(false, Some(3), "cells");
        assert!(!p.is_drawn());
        p.inc();
        p.message("x");
        assert!(Progress::with(true, None, "steps").is_drawn());
    }
}
