//! Expected vs got, per field. Bytes are compared by what they stand for ([`bytes_to_value`]):
//! `{"a": 1}` and `{"a":1}` are the same output.

use super::case::{Expect, Verdict, bytes_to_value, value_to_bytes};
use super::runner::Outcome;
use serde_json::Value;

/// One field that differs.
#[derive(Debug, Clone, PartialEq)]
pub enum Mismatch {
    /// The verdict differs (`message`: why the attempt failed, when it did).
    Result {
        /// Expected.
        expected: Verdict,
        /// Got.
        got: Verdict,
        /// The failure text.
        message: Option<String>,
    },
    /// Output `index` went elsewhere.
    Subject {
        /// Which output.
        index: usize,
        /// Expected.
        expected: String,
        /// Got.
        got: String,
    },
    /// Output `index` carried other data.
    Data {
        /// Which output.
        index: usize,
        /// Expected.
        expected: Value,
        /// Got.
        got: Value,
    },
    /// Output `index` was expected and not published.
    Missing {
        /// Which output.
        index: usize,
        /// Its subject.
        subject: String,
        /// Its data.
        data: Value,
    },
    /// Output `index` was published and not expected.
    Extra {
        /// Which output.
        index: usize,
        /// Its subject.
        subject: String,
        /// Its data.
        data: Value,
    },
    /// Outbound call `index` differs (`None`: not made, or not expected).
    Http {
        /// Which call.
        index: usize,
        /// Expected: `"METHOD url"` and the body.
        expected: Option<(String, Value)>,
        /// Got.
        got: Option<(String, Value)>,
    },
    /// A kv key ends up with another value (`None`: absent).
    Kv {
        /// The key.
        key: String,
        /// Expected.
        expected: Option<Value>,
        /// Got.
        got: Option<Value>,
    },
}

/// What `v` stands for, in its canonical form (`{"a": 1}` and `{"a":1}` alike).
fn canonical(v: &Value) -> Value {
    value_to_bytes(v).map(|b| bytes_to_value(&b)).unwrap_or_else(|_| v.clone())
}

/// The fields of `outcome` that differ from `expect` (only those `expect` names).
pub fn compare(expect: &Expect, outcome: &Outcome) -> Vec<Mismatch> {
    let mut out = Vec::new();
    if expect.result != outcome.verdict {
        out.push(Mismatch::Result { expected: expect.result, got: outcome.verdict, message: outcome.message.clone() });
    }
    if let Some(expected) = &expect.outputs {
        for index in 0..expected.len().max(outcome.outputs.len()) {
            match (expected.get(index), outcome.outputs.get(index)) {
                (Some((subject, data)), Some(got)) => {
                    if *subject != got.subject {
                        out.push(Mismatch::Subject { index, expected: subject.clone(), got: got.subject.clone() });
                    }
                    let (expected, got) = (canonical(data), bytes_to_value(&got.data));
                    if expected != got {
                        out.push(Mismatch::Data { index, expected, got });
                    }
                }
                (Some((subject, data)), None) => {
                    out.push(Mismatch::Missing { index, subject: subject.clone(), data: data.clone() })
                }
                (None, Some(got)) => {
                    out.push(Mismatch::Extra { index, subject: got.subject.clone(), data: bytes_to_value(&got.data) })
                }
                (None, None) => {}
            }
        }
    }
    if let Some(expected) = &expect.http {
        for index in 0..expected.len().max(outcome.calls.len()) {
            let e = expected.get(index).map(|(call, body)| (call.clone(), canonical(body)));
            let g = outcome.calls.get(index).map(|c| (super::case::call_line(c), bytes_to_value(&c.body)));
            if e != g {
                out.push(Mismatch::Http { index, expected: e, got: g });
            }
        }
    }
    if let Some(expected) = &expect.kv {
        let keys: std::collections::BTreeSet<&String> = expected.keys().chain(outcome.kv.keys()).collect();
        for key in keys {
            let e = expected.get(key).map(canonical);
            let g = outcome.kv.get(key).map(|b| bytes_to_value(b));
            if e != g {
                out.push(Mismatch::Kv { key: key.clone(), expected: e, got: g });
            }
        }
    }
    out
}

/// A value for a diff line: compact JSON, cut to a few KiB.
fn show(v: &Value) -> String {
    crate::event::cut(&v.to_string()).into_owned()
}

fn show_opt(v: &Option<Value>) -> String {
    v.as_ref().map_or_else(|| "(absent)".to_string(), show)
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Result { expected, got, message } => {
                write!(f, "  result: expected {expected}, got {got}")?;
                match message {
                    Some(m) => writeln!(f, " ({})", crate::event::cut(m)),
                    None => writeln!(f),
                }
            }
            Mismatch::Subject { index, expected, got } => {
                writeln!(f, "  outputs[{index}].subject:\n    expected {expected:?}\n    got      {got:?}")
            }
            Mismatch::Data { index, expected, got } => {
                writeln!(f, "  outputs[{index}].data:\n    expected {}\n    got      {}", show(expected), show(got))
            }
            Mismatch::Missing { index, subject, data } => {
                writeln!(f, "  outputs[{index}]: expected {subject:?} {}, got no output", show(data))
            }
            Mismatch::Extra { index, subject, data } => {
                writeln!(f, "  outputs[{index}]: not expected, got {subject:?} {}", show(data))
            }
            Mismatch::Http { index, expected, got } => {
                let call = |c: &Option<(String, Value)>| {
                    c.as_ref().map_or_else(|| "(no call)".to_string(), |(call, body)| format!("{call} {}", show(body)))
                };
                writeln!(f, "  http[{index}]:\n    expected {}\n    got      {}", call(expected), call(got))
            }
            Mismatch::Kv { key, expected, got } => {
                writeln!(f, "  kv[{key:?}]:\n    expected {}\n    got      {}", show_opt(expected), show_opt(got))
            }
        }
    }
}
