//! `plugbus test`: recorded events run through the real component in the real sandbox, the
//! outcome compared with each case's expectation (snapshot testing).
//!
//! - [`case`]: the case file (JSON lines: a recorded CloudEvents JSON event, or
//!   `{"event", "kv", "expect"}`), read with errors naming the file and line.
//! - [`runner`]: loads the component the way the host does (same loader, limits, config) and
//!   runs each case in a fresh instance whose clocks and random are fixed by the event
//!   ([`crate::sandbox::FixedWorld`]), kv starting from the case's.
//! - [`diff`]: expected vs got, per field, as readable text.
//! - [`dlq`]: a kept dead letter (`GET /v1/dlq`) turned back into the case that failed.
//!
//! Never: a second sandbox (it runs [`crate::sandbox::Plugin::handle_fixed`]), network (outbound
//! HTTP is answered from the case's stubs, [`crate::sandbox::http_stubs`]) or a bus (outputs are
//! collected, never published), or a kv store beyond the case's own in memory.

pub mod case;
pub mod diff;
pub mod dlq;
pub mod runner;

pub use case::{Case, CaseFile, Expect, Verdict};
pub use diff::{Mismatch, compare};
pub use runner::{Outcome, Runner};

use std::path::{Path, PathBuf};

/// Why a case file could not be tested (not: a case that differs; see [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// The file cannot be read or written.
    #[error("{}: {what}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// One line of the case file is not a case.
    #[error("{}:{line}: {what}", file.display())]
    Line {
        /// The case file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        what: String,
    },
    /// The component does not load (the loader's reason).
    #[error("{}: the component does not load: {reason}", file.display())]
    Load {
        /// The component file.
        file: PathBuf,
        /// The loader's reason.
        reason: String,
    },
    /// The sandbox could not be set up.
    #[error("the sandbox could not start: {0}")]
    Sandbox(String),
}

/// What one case did, and how it compares.
#[derive(Debug)]
pub struct CaseReport {
    /// 1-based case number (its position among the cases).
    pub number: usize,
    /// Its line in the file.
    pub line: usize,
    /// The event's id.
    pub event_id: String,
    /// What the component did, in a line (its outputs and kv are not kept: a handler may
    /// write 16 MiB of kv per event, and a case file can hold any number of cases).
    pub got: String,
    /// How it differs from the expectation, each difference as the report shows it (values cut
    /// to a few KiB, at most [`MAX_SHOWN`] of them and a line saying how many more), never the
    /// values themselves (review 61f F2: a run kept every differing case's outputs, kv and HTTP
    /// bodies whole, about 20 MiB a case); `None`: the case has none yet.
    pub mismatches: Option<Vec<String>>,
}

/// The most differences of one case a report keeps and shows.
pub const MAX_SHOWN: usize = 32;

/// `mismatches` as a report keeps them ([`CaseReport::mismatches`]).
fn shown(mismatches: Vec<Mismatch>) -> Vec<String> {
    let more = mismatches.len().saturating_sub(MAX_SHOWN);
    let mut shown: Vec<String> = mismatches.iter().take(MAX_SHOWN).map(ToString::to_string).collect();
    if more > 0 {
        shown.push(format!("  ... and {more} more difference(s)\n"));
    }
    shown
}

/// The result of testing one case file.
#[derive(Debug)]
pub struct Report {
    /// Per case, in file order.
    pub cases: Vec<CaseReport>,
    /// Whether the file was rewritten with the current behaviour (`--update`).
    pub updated: bool,
}

impl Report {
    /// Cases that differ from their expectation, or have none.
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| c.mismatches.as_ref().is_none_or(|m| !m.is_empty())).count()
    }

    /// Whether every case met its expectation (or the file was just updated).
    pub fn passed(&self) -> bool {
        self.updated || self.failed() == 0
    }
}

/// The most an updated case file may hold (`--update`): the whole file is kept in memory and
/// written at once, and a handler can make each case's expectation megabytes (16 MiB of kv,
/// outputs of 1 MiB), so a case file of a few lines could otherwise fill the memory and the disk.
pub const MAX_UPDATED_BYTES: usize = 64 << 20;

/// Runs every case of `cases` through `runner`; with `update`, rewrites the file with what the
/// component did as each case's expectation (refused, naming the case, past
/// [`MAX_UPDATED_BYTES`]).
pub async fn test_file(runner: &Runner, cases: &Path, update: bool) -> Result<Report, CaseError> {
    let mut file = CaseFile::read(cases)?;
    let mut reports = Vec::with_capacity(file.cases.len());
    // The updated file's text, each case's line made as it ran (its expectation's values are
    // not kept: as JSON values they took up to 20 times their text).
    let mut updated = String::new();
    for (i, case) in file.cases.iter_mut().enumerate() {
        if let Some(what) = runner.never_delivered(case) {
            return Err(CaseError::Line { file: cases.to_path_buf(), line: case.line, what });
        }
        let outcome = runner.run(case).await;
        if let Some(e) = failed_by_the_host(&outcome, cases, case.line) {
            return Err(e);
        }
        let mismatches = case.expect.as_ref().map(|e| shown(compare(e, &outcome)));
        if update {
            case.expect = Some(Expect::of(&outcome, case.expect.as_ref(), !case.kv.is_empty()));
            updated.push_str(&case.to_json().to_string());
            updated.push('\n');
            case.expect = None;
            if updated.len() > MAX_UPDATED_BYTES {
                return Err(CaseError::Line {
                    file: cases.to_path_buf(),
                    line: case.line,
                    what: format!(
                        "with this case's expectation the updated file would pass {} MiB: nothing was written \
                         (split the file, or make the handler's outputs and kv smaller)",
                        MAX_UPDATED_BYTES >> 20
                    ),
                });
            }
        }
        reports.push(CaseReport {
            number: i + 1,
            line: case.line,
            event_id: case.event.id.clone(),
            got: outcome.to_string(),
            mismatches,
        });
    }
    if update {
        file.write_text(&updated)?;
    }
    Ok(Report { cases: reports, updated: update })
}

/// The error of a run the host failed (an instance pool that stayed full, a host function's
/// panic, a kv that could not be set): it says nothing of the handler, so the case is neither
/// compared (it would pass or fail for the host's reason) nor, with `--update`, kept as the
/// case's expectation; the run stops naming the case, nothing written.
fn failed_by_the_host(outcome: &Outcome, file: &Path, line: usize) -> Option<CaseError> {
    outcome.by_the_host.then(|| CaseError::Line {
        file: file.to_path_buf(),
        line,
        what: format!(
            "the host failed the run, not the handler ({}): nothing was compared or written; run it again",
            outcome.message.as_deref().map(crate::event::cut).unwrap_or_default()
        ),
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.cases {
            let head = format!("case {} (line {}, event {})", c.number, c.line, c.event_id);
            match &c.mismatches {
                _ if self.updated => {}
                None => writeln!(f, "{head}: no expectation yet; got {} (run with --update to keep it)", c.got)?,
                Some(m) if m.is_empty() => {}
                Some(m) => {
                    writeln!(f, "{head}: differs")?;
                    for mismatch in m {
                        write!(f, "{mismatch}")?;
                    }
                }
            }
        }
        let n = self.cases.len();
        if self.updated {
            writeln!(f, "{n} case(s): expectations updated")
        } else {
            writeln!(f, "{n} case(s): {} passed, {} failed", n - self.failed(), self.failed())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Failure;

    fn case() -> Case {
        let event = crate::cloudevents::to_json(&crate::event::Event::new("orders.created", "{}"));
        Case::parse(3, serde_json::json!({ "event": event, "expect": { "result": "ok" } })).unwrap()
    }

    #[test]
    fn a_run_the_host_failed_stops_naming_the_case_and_one_the_handler_failed_is_its_verdict() {
        let file = Path::new("cases.jsonl");
        let handlers = runner::failed(Failure::Retry("busy".into()), &case(), Vec::new());
        assert_eq!(handlers.verdict, Verdict::Retry);
        assert!(failed_by_the_host(&handlers, file, 3).is_none(), "the handler's retry is its verdict");
        let trapped = runner::failed(Failure::Trap("wasm trap: unreachable".into()), &case(), Vec::new());
        assert!(failed_by_the_host(&trapped, file, 3).is_none());
        let hosts = runner::failed(Failure::Host("a host function panicked: boom".into()), &case(), Vec::new());
        let e = failed_by_the_host(&hosts, file, 3).expect("the host's failure is no verdict").to_string();
        assert!(e.starts_with("cases.jsonl:3: the host failed the run, not the handler"), "{e}");
        assert!(e.contains("a host function panicked: boom") && e.contains("nothing was compared or written"), "{e}");
    }

    /// What a report keeps of a case's differences is their text, cut, and at most
    /// [`MAX_SHOWN`] of them: it kept the values whole (review 61f F2: 20 cases of 16 MiB of kv
    /// took a run from 112 to 451 MB).
    #[test]
    fn a_report_keeps_a_bounded_text_of_each_cases_differences() {
        let big = serde_json::Value::String("x".repeat(1 << 20));
        let mismatches: Vec<Mismatch> =
            (0..100).map(|i| Mismatch::Kv { key: format!("k{i}"), expected: Some(big.clone()), got: None }).collect();
        let kept = shown(mismatches);
        assert_eq!(kept.len(), MAX_SHOWN + 1);
        assert_eq!(kept[MAX_SHOWN], "  ... and 68 more difference(s)\n");
        let bytes: usize = kept.iter().map(String::len).sum();
        assert!(bytes < MAX_SHOWN * (8 << 10), "{bytes} bytes kept");
    }
}
