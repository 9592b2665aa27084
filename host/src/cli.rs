//! How the `plugbus` binary shows things to people: aligned tables (comfy-table), one-line
//! errors, the readable tail, colour only on a terminal and never with `NO_COLOR`.
//!
//! Invariants: nothing here decides anything (it formats what the API answered); `--json`
//! output never goes through here; no ANSI escape reaches a pipe or a file.

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde_json::Value;
use std::io::IsTerminal;

/// Whether to colour what goes to this stream: a terminal, and `NO_COLOR` unset or empty
/// (<https://no-color.org>).
pub fn colour(is_terminal: bool) -> bool {
    colour_with(is_terminal, std::env::var_os("NO_COLOR").as_deref())
}

fn colour_with(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn paint(on: bool, code: &str, text: &str) -> String {
    if on { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() }
}

/// Prints a user error as one line: the error and its causes, `: `-separated, no backtrace.
pub fn report_error(e: &anyhow::Error) {
    let on = colour(std::io::stderr().is_terminal());
    eprintln!("{} {e:#}", paint(on, "1;31", "error:"));
}

fn table(header: &[&str], right: &[usize]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(header.to_vec());
    for &i in right {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// A table's lines without the padding comfy-table leaves after the last column.
fn render(t: &Table) -> String {
    t.to_string().lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

/// A table cell: [`printable`], on one line (a file named `a\nPLUGIN …` would draw rows of its own).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => printable(s).replace('\n', "\\n"),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `text` as it may reach a terminal: every control character but the line break (an escape
/// sequence's ESC among them) and every bidirectional override is shown escaped (`\u{1b}`),
/// never sent. What a table or a report shows comes from plugin files and plugins themselves: a
/// file named `a\x1b]0;…` or a manifest version with escapes would otherwise drive the reader's
/// terminal (retitle it, hide text, move the cursor).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let shown = |c: char| {
        c == '\n'
            || !(c.is_control()
                || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
    };
    if text.chars().all(shown) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars().map(|c| if shown(c) { c.to_string() } else { c.escape_unicode().to_string() }).collect(),
    )
}

fn short(s: &str, max: usize) -> String {
    let one_line: String = printable(s).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `plugbus plugins`: the answer of `GET /v1/plugins` as a table, then the rejected files.
pub fn plugins_table(body: &Value) -> String {
    let mut t = table(
        &["PLUGIN", "VERSION", "STATE", "RECEIVED", "OK", "RETRIED", "DEAD", "IN FLIGHT", "QUEUED", "SUBSCRIPTIONS"],
        &[3, 4, 5, 6, 7, 8],
    );
    for p in body["plugins"].as_array().into_iter().flatten() {
        let c = &p["counters"];
        let subs: Vec<String> = p["subscriptions"].as_array().into_iter().flatten().map(text).collect();
        t.add_row(vec![
            text(&p["name"]),
            text(&p["version"]),
            text(&p["state"]),
            text(&c["received"]),
            text(&c["ok"]),
            text(&c["retried"]),
            text(&c["dead_lettered"]),
            text(&c["in_flight"]),
            text(&c["queued"]),
            subs.join(", "),
        ]);
    }
    let mut out = render(&t);
    let rejected: Vec<&Value> = body["rejected"].as_array().into_iter().flatten().collect();
    if !rejected.is_empty() {
        let mut r = table(&["REJECTED FILE", "REASON"], &[]);
        for f in rejected {
            let reason = text(&f["state"]);
            r.add_row(vec![text(&f["file"]), reason.strip_prefix("rejected: ").unwrap_or(&reason).to_string()]);
        }
        out.push_str("\n\n");
        out.push_str(&render(&r));
    }
    out
}

fn header<'a>(event: &'a Value, name: &str) -> &'a str {
    event["headers"].as_array().into_iter().flatten().find(|h| h[0] == name).and_then(|h| h[1].as_str()).unwrap_or("-")
}

/// `plugbus dlq list`: the answer of `GET /v1/dlq` as a table (the error cut to one short line).
pub fn dlq_table(body: &Value) -> String {
    let mut t = table(&["ID", "PLUGIN", "SUBJECT", "ATTEMPTS", "FAILED AT", "ERROR"], &[3]);
    let letters: Vec<&Value> = body["dead_letters"].as_array().into_iter().flatten().collect();
    for d in &letters {
        let ev = &d["event"];
        t.add_row(vec![
            text(&ev["id"]),
            text(&d["plugin"]),
            // (Header values are whatever the broker's copy carries: on NATS anyone who may publish
            // under `plugbus.dlq.>` writes them. Review 56h: an OSC 52 escape wrote the operator's
            // clipboard, a cursor-up erased the row above.)
            text(&Value::from(header(ev, "plugbus-original-subject"))),
            text(&Value::from(header(ev, "plugbus-attempts"))),
            text(&Value::from(header(ev, "plugbus-failed-at"))),
            short(header(ev, "plugbus-error"), 80),
        ]);
    }
    let left_out = body["left_out"].as_u64().unwrap_or(0);
    if letters.is_empty() && left_out == 0 {
        return "no dead letters kept".into();
    }
    let mut shown = render(&t);
    if left_out > 0 {
        shown.push_str(&format!("\n{left_out} more kept, left out of this listing (over 16 MiB): list per plugin"));
    }
    shown
}

/// `plugbus dlq debug`: the answer of `POST /v1/dlq/{id}/debug`, the failed version and the
/// candidate side by side (one row per aspect; lists one item a line).
pub fn debug_report(body: &Value) -> String {
    let failed = &body["failed"];
    let candidate = &body["candidate"];
    let with_candidate = !candidate.is_null();
    let mut head = vec!["", "FAILED VERSION"];
    if with_candidate {
        head.push("CANDIDATE");
    }
    let mut t = table(&head, &[]);
    let version = |v: &Value| {
        let hash: String = text(&v["version"]).chars().take(12).collect();
        match v["plugin_version"].as_str() {
            Some(pv) => format!("{hash} ({})", printable(pv)),
            None => hash,
        }
    };
    let result = |v: &Value| {
        if v["ran"] == false {
            return format!("not run: {}", text(&v["why"]));
        }
        match v["error"].as_str() {
            Some(e) => format!("{}: {}", text(&v["result"]), short(e, 100)),
            None => text(&v["result"]),
        }
    };
    let lines = |v: &Value, f: &dyn Fn(&Value) -> String| -> String {
        let items: Vec<String> = v.as_array().into_iter().flatten().map(|i| short(&f(i), 100)).collect();
        if items.is_empty() { "-".into() } else { items.join("\n") }
    };
    let outputs = |v: &Value| lines(&v["outputs"], &|o| format!("{} {}", text(&o["subject"]), text(&o["data"])));
    let kv_writes = |v: &Value| {
        let items: Vec<String> = v["kv_writes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, val)| short(&format!("{k} = {}", text(val)), 100))
            .collect();
        if items.is_empty() { "-".into() } else { items.join("\n") }
    };
    let plain = |v: &Value, key: &str| lines(&v[key], &text);
    type Row<'a> = (&'a str, Box<dyn Fn(&Value) -> String + 'a>);
    let rows: Vec<Row> = vec![
        ("version", Box::new(version)),
        ("result", Box::new(result)),
        ("outputs", Box::new(outputs)),
        ("kv writes", Box::new(kv_writes)),
        ("logs", Box::new(move |v| plain(v, "logs"))),
        ("stdout", Box::new(move |v| plain(v, "stdout"))),
        ("stderr", Box::new(move |v| plain(v, "stderr"))),
    ];
    for (name, f) in &rows {
        let mut row = vec![name.to_string(), f(failed)];
        if with_candidate {
            row.push(f(candidate));
        }
        t.add_row(row);
    }
    let mut out = format!(
        "dead letter {} of {}: event {} on {}, attempt {}, run again with the kv and config it read\n",
        text(&body["dead_letter"]),
        text(&body["plugin"]),
        text(&body["event_id"]),
        text(&body["subject"]),
        text(&body["attempt"]),
    );
    if body["record_truncated"] == true {
        out.push_str(&format!("warning: {}\n", text(&body["note"])));
    }
    out.push('\n');
    out.push_str(&render(&t));
    out
}

/// `plugbus dlq replay`: what was replayed, what the bus did not take (and, of those, what was
/// not tried once a plugin's replays were not taken, with why), and what can never be replayed
/// (each with why); or why the replay did not start.
pub fn replay_summary(body: &Value) -> String {
    if let Some(error) = body["error"].as_str() {
        return format!("no dead letter replayed: {}", printable(error));
    }
    let replayed = body["replayed"].as_array().map_or(0, Vec::len);
    let mut out =
        format!("replayed {replayed} dead letter(s); {} kept (the bus did not take them)", text(&body["failed"]));
    let gave_up = body["gave_up"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !gave_up.is_empty() {
        out.push_str(&format!(", {} of them not tried:", text(&body["untried"])));
        for g in gave_up {
            let target = match g["plugin"].as_str() {
                Some(p) => format!("plugin {}", printable(p)),
                None => format!("subject {}", text(&g["subject"])),
            };
            out.push_str(&format!(
                "\n  {}: {target}'s replays were not taken ({})",
                text(&g["untried"]),
                text(&g["why"])
            ));
        }
    }
    let elsewhere = body["replayed_elsewhere"].as_array().map_or(0, Vec::len);
    if elsewhere > 0 {
        out.push_str(&format!("; {elsewhere} left to another replay holding them"));
    }
    if let Some(unclaimed) = body["unclaimed"].as_u64().filter(|n| *n > 0) {
        out.push_str(&format!("; {unclaimed} tried without a claim (see the host's log)"));
    }
    let refused = body["refused"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !refused.is_empty() {
        out.push_str(&format!("; {} kept, never replayable:", refused.len()));
        for r in refused {
            out.push_str(&format!("\n  {}: {}", text(&r["dead_letter"]), text(&r["why"])));
        }
    }
    out
}

/// The longest line of a tail's stream kept while it waits for its end (an event's JSON is at
/// most a few times `max_event_bytes`; a server that never ends a line is refused past it).
pub const MAX_TAIL_LINE_BYTES: usize = 64 << 20;

/// The lines `buf` (bytes of a tail's stream as they came) completes, taken out of it, each
/// decoded whole: a character split between two chunks of the stream is decoded once both
/// came (review 56h: each chunk was decoded alone, and such a character was recorded as two
/// U+FFFD, so `--record` differed from what was on the bus). `Err` once what waits for its line
/// end passes [`MAX_TAIL_LINE_BYTES`].
pub fn complete_lines(buf: &mut Vec<u8>) -> anyhow::Result<Vec<String>> {
    let Some(last) = buf.iter().rposition(|&b| b == b'\n') else {
        anyhow::ensure!(
            buf.len() <= MAX_TAIL_LINE_BYTES,
            "the server sent a line of over {MAX_TAIL_LINE_BYTES} bytes without its end"
        );
        return Ok(Vec::new());
    };
    let rest = buf.split_off(last + 1);
    let done = std::mem::replace(buf, rest);
    Ok(done.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(|l| String::from_utf8_lossy(l).into_owned()).collect())
}

/// `plugbus tail`: one event as `time  subject  id  data…` on one line.
pub fn tail_line(record: &Value, on: bool) -> String {
    let time = record["time"].as_str().unwrap_or("");
    // RFC 3339: the time of day is enough on a live tail.
    let clock = time.split_once('T').map_or(time, |(_, t)| t.trim_end_matches('Z'));
    let clock: String = printable(clock).chars().take(12).collect();
    let subject = record["subject"].as_str().unwrap_or("?");
    format!(
        "{} {} {} {}",
        paint(on, "2", &format!("{clock:<12}")),
        paint(on, "36", &format!("{:<24}", printable(subject))),
        paint(on, "2", &text(&record["id"])),
        short(record["data"].as_str().unwrap_or(""), 100)
    )
}

/// Whether to draw a progress bar on stderr: only on a terminal, and not between JSON log
/// lines (whatever reads those would get the bar's redraws mixed in).
pub fn progress_shown(stderr_is_terminal: bool, json_logs: bool) -> bool {
    stderr_is_terminal && !json_logs
}

/// The progress bar being drawn, if any: log lines are written above it ([`LogWriter`]).
static BAR: std::sync::Mutex<Option<indicatif::ProgressBar>> = std::sync::Mutex::new(None);

/// Progress on stderr for work that takes seconds (compiling a folder of plugins, replaying
/// many dead letters): an indicatif bar when [`progress_shown`], in colour only when
/// [`colour`] allows; nothing at all otherwise (a pipe or a file gets no `\r` redraws and no
/// escapes). Cleared from the screen when dropped.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar for `what` ("compiling plugins"); drawn from the first [`Progress::update`].
    pub fn new(what: &str, json_logs: bool) -> Progress {
        let stderr = std::io::stderr().is_terminal();
        if !progress_shown(stderr, json_logs) {
            return Progress(None);
        }
        let template = if colour(stderr) {
            "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} {elapsed} {wide_msg:.dim}"
        } else {
            "{prefix} [{bar:30}] {pos}/{len} {elapsed} {wide_msg}"
        };
        let style = indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr())
            .with_style(style)
            .with_prefix(what.to_string());
        *BAR.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
        Progress(Some(bar))
    }

    /// `done` of `total` finished, `now` in progress.
    pub fn update(&self, done: usize, total: usize, now: &str) {
        if let Some(bar) = &self.0 {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(now.to_string());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
            *BAR.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// Log lines for `tracing_subscriber`'s fmt layer (one `write` per formatted line).
pub enum LogLines {
    /// Handed to the host's log thread ([`plugbus::log_queue`]; straight to stderr if it was
    /// not started).
    Queued,
    /// Straight to stderr ([`LogWriter`]): the short-lived commands, whose lines must be out
    /// when they exit.
    Direct,
}

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LogLines::Queued if plugbus::log_queue::push(buf) => Ok(buf.len()),
            _ => LogWriter.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogLines::Queued => Ok(()),
            LogLines::Direct => LogWriter.flush(),
        }
    }
}

/// stderr for log lines: written above the progress bar while one is drawn, so neither
/// garbles the other.
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match bar {
            Some(bar) => bar.suspend(|| std::io::stderr().write_all(buf))?,
            None => std::io::stderr().write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Review 56h: a character split between two chunks of a tail's stream is decoded whole,
    /// and a line without its end is bounded.
    #[test]
    fn a_tails_lines_are_decoded_whole_across_chunks() {
        let line = "data: {\"data\":\"é€😀\"}\n";
        let bytes = line.as_bytes();
        for cut in 1..bytes.len() {
            let mut buf = Vec::new();
            buf.extend_from_slice(&bytes[..cut]);
            let mut got = complete_lines(&mut buf).unwrap();
            buf.extend_from_slice(&bytes[cut..]);
            got.extend(complete_lines(&mut buf).unwrap());
            assert_eq!(got, [line.trim_end()], "cut at byte {cut}");
            assert!(buf.is_empty());
        }
        let mut buf = b"a\nb\n\nc".to_vec();
        assert_eq!(complete_lines(&mut buf).unwrap(), ["a", "b"]);
        assert_eq!(buf, b"c");
        let mut endless = vec![b'x'; MAX_TAIL_LINE_BYTES + 1];
        assert!(complete_lines(&mut endless).is_err());
    }

    /// Review 56h: on NATS anyone who may publish under `plugbus.dlq.>` writes a listed dead
    /// letter's headers, and `plugbus dlq list` printed three of them raw: an OSC 52 escape wrote
    /// the operator's clipboard, a cursor-up and erase hid the row above, a bidi override
    /// reordered the line. Every cell is shown escaped.
    #[test]
    fn a_dead_letters_headers_reach_the_terminal_escaped() {
        let hostile = ["\u{1b}]52;c;ZXZpbA==\u{7}", "\u{1b}[1A\u{1b}[2K", "a\u{202e}b"];
        let headers: Vec<Value> = ["plugbus-original-subject", "plugbus-attempts", "plugbus-failed-at"]
            .iter()
            .zip(hostile)
            .map(|(name, value)| json!([name, value]))
            .collect();
        let body = json!({ "dead_letters": [
            { "plugin": "p", "event": { "id": "x", "headers": headers } },
        ] });
        let out = dlq_table(&body);
        assert!(!out.chars().any(|c| c == '\u{1b}' || c == '\u{7}' || c == '\u{202e}'), "{out:?}");
        assert!(out.contains("\\u{1b}]52;c;ZXZpbA==") && out.contains("a\\u{202e}b"), "{out}");
        // The tail's time and the debug report's version go through the same.
        let line = tail_line(&json!({ "time": "2026-01-01T1\u{202e}2:00:00Z", "subject": "s", "id": "i" }), false);
        assert!(!line.contains('\u{202e}'), "{line:?}");
    }

    #[test]
    fn the_plugins_table_is_aligned_under_its_header() {
        let body = json!({ "plugins": [
            { "name": "inventory", "version": "0.1.0", "state": "serving 0.1.0", "subscriptions": ["orders.created"],
              "counters": { "received": 1234, "ok": 1234, "retried": 0, "dead_lettered": 0, "in_flight": 0, "queued": 0 } },
            { "name": "x", "version": "2", "state": "serving 2", "subscriptions": ["a", "b"],
              "counters": { "received": 4, "ok": 3, "retried": 17, "dead_lettered": 1, "in_flight": 1, "queued": 9 } },
        ], "rejected": [{ "file": "/p/broken.wasm", "state": "rejected: not a component" }] });
        let out = plugins_table(&body);
        let lines: Vec<&str> = out.lines().collect();
        let end = lines[0].find("RECEIVED").unwrap() + "RECEIVED".len();
        assert_eq!(&lines[1][end - 4..end], "1234", "{out}");
        assert_eq!(&lines[2][end - 1..end], "4", "{out}");
        assert!(out.contains("broken.wasm") && out.contains("not a component") && !out.contains("rejected: "));
        // A file name with a line break stays in its cell, on one line.
        let body =
            json!({ "plugins": [], "rejected": [{ "file": "/p/a\nPLUGIN  forged.wasm", "state": "rejected: x" }] });
        let out = plugins_table(&body);
        assert!(out.contains("/p/a\\nPLUGIN  forged.wasm"), "{out}");
        assert!(!out.lines().any(|l| l.trim_start().starts_with("PLUGIN  forged")), "{out}");
    }

    #[test]
    fn a_replay_summary_tells_what_the_bus_did_not_take_from_what_is_never_replayable() {
        let body = json!({ "replayed": [{ "dead_letter": "a", "id": "b" }], "failed": 2,
            "refused": [{ "dead_letter": "d1", "why": "its original subject \"$KV.x\" is a system subject" }] });
        let out = replay_summary(&body);
        assert!(
            out.starts_with("replayed 1 dead letter(s); 2 kept (the bus did not take them); 1 kept, never replayable:"),
            "{out}"
        );
        assert!(out.contains("\n  d1: its original subject"), "{out}");
        let plain = replay_summary(&json!({ "replayed": [], "failed": 0 }));
        assert_eq!(plain, "replayed 0 dead letter(s); 0 kept (the bus did not take them)");
        let stopped = replay_summary(&json!({ "replayed": [], "failed": 4, "untried": 2, "refused": [],
            "gave_up": [{ "plugin": "faulty", "why": "not within 5s", "untried": 2 }] }));
        assert_eq!(
            stopped,
            "replayed 0 dead letter(s); 4 kept (the bus did not take them), 2 of them not tried:\n  \
             2: plugin faulty's replays were not taken (not within 5s)"
        );
        let elsewhere = replay_summary(&json!({ "replayed": [{ "dead_letter": "a", "id": "b" }], "failed": 0,
            "replayed_elsewhere": ["x", "y"], "unclaimed": 1 }));
        assert_eq!(
            elsewhere,
            "replayed 1 dead letter(s); 0 kept (the bus did not take them); 2 left to another replay holding them; \
             1 tried without a claim (see the host's log)"
        );
        let error = replay_summary(&json!({ "replayed": [], "failed": 0, "error": "reading the broker's: down" }));
        assert_eq!(error, "no dead letter replayed: reading the broker's: down");
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use std::ffi::OsStr;
        assert!(colour_with(true, None));
        assert!(colour_with(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!colour_with(true, Some(OsStr::new("1"))));
        assert!(!colour_with(false, None));
    }

    #[test]
    fn progress_only_on_a_terminal_and_never_between_json_logs() {
        assert!(progress_shown(true, false));
        assert!(!progress_shown(false, false));
        assert!(!progress_shown(true, true));
        // Off a terminal a bar is nothing at all: updates and drop draw nothing.
        let p = Progress(None);
        p.update(1, 2, "x.wasm");
        drop(p);
        assert!(BAR.lock().unwrap().is_none());
    }

    #[test]
    fn a_tailed_subject_with_escapes_is_shown_not_sent_to_the_terminal() {
        // A NATS publisher names any subject: `x.ESC]0;PWNED BEL` retitled the terminal.
        for subject in ["x.\u{1b}]0;PWNED\u{7}.\u{1b}[31mRED", "y.\u{202e}desrever"] {
            let line = tail_line(
                &json!({ "time": "2026-12-05T06:00:00.000Z", "subject": subject, "id": "1", "data": "" }),
                true,
            );
            assert!(!line.contains(['\u{7}', '\u{202e}']), "{line:?}");
            assert!(!line.replace("\u{1b}[", "").contains('\u{1b}'), "a raw escape beside the colours: {line:?}");
        }
    }

    #[test]
    fn a_file_name_with_escapes_is_shown_not_sent_to_the_terminal() {
        let body = json!({ "plugins": [], "rejected": [
            { "file": "evil\u{1b}]0;owned\u{7}\u{202e}gpj.wasm", "state": "rejected: bad\u{1b}[2Jname" }
        ] });
        let table = plugins_table(&body);
        assert!(!table.contains('\x1b') && !table.contains('\u{7}') && !table.contains('\u{202e}'), "{table:?}");
        assert!(table.contains("evil\\u{1b}]0;owned\\u{7}\\u{202e}gpj.wasm"), "{table}");
        assert!(table.contains("bad\\u{1b}[2Jname"), "{table}");
        assert_eq!(printable("line one\nline two"), "line one\nline two", "a line break is kept");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn a_tail_line_is_short_and_plain_off_a_terminal() {
        let rec = json!({ "time": "2026-11-30T07:00:01.123456Z", "subject": "orders.created", "id": "abc",
            "data": format!("{{\"a\":\"{}\"}}\n", "x".repeat(500)) });
        let line = tail_line(&rec, false);
        assert!(line.starts_with("07:00:01.123 "), "{line}");
        assert!(line.contains("orders.created") && line.contains("abc") && line.ends_with('…'), "{line}");
        assert!(!line.contains('\x1b') && !line.contains('\n') && line.chars().count() < 160, "{line}");
        assert!(tail_line(&rec, true).contains('\x1b'));
    }
}
