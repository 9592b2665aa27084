//! The pretty log's fields, each on one line ([`OneLineFields`]). tracing-subscriber's default
//! field formatter escapes a few terminal controls in the `message` field only, and none of them
//! in any other field: a subject, an event id or a header name written with `%` went out raw,
//! so a NATS publisher (subjects arrive unchecked) or an HTTP client could break a line, move
//! the cursor, or reorder the rest of a line with a bidirectional override, and forge lines that
//! pose as the host's (review 61d L2, L3). The JSON format escapes through serde already.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Writes each field as the default formatter does (`message` bare, others `name=value`, a
/// space between), its text through [`crate::event::one_line`]: every control character and
/// bidirectional mark escaped.
#[derive(Debug, Default, Clone, Copy)]
pub struct OneLineFields;

impl<'writer> FormatFields<'writer> for OneLineFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = OneLine { writer, first: true, text: String::new(), result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// The visitor of [`OneLineFields`].
struct OneLine<'writer> {
    writer: Writer<'writer>,
    first: bool,
    /// The field's text as written before escaping (kept between fields: one allocation a line).
    text: String,
    result: fmt::Result,
}

impl Visit for OneLine<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.text.clear();
        // (A `%` field's `Debug` is its `Display`; `message` is `fmt::Arguments`, written bare.)
        let _ = write!(self.text, "{value:?}");
        let gap = if self.first { "" } else { " " };
        self.first = false;
        let text = crate::event::one_line(&self.text);
        self.result = match field.name() {
            "message" => write!(self.writer, "{gap}{text}"),
            name => write!(self.writer, "{gap}{name}={text}"),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the pretty log writes for one event, with these fields.
    fn logged(emit: impl FnOnce()) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .compact()
            .fmt_fields(OneLineFields)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()));
        let subscriber = tracing_subscriber::layer::SubscriberExt::with(tracing_subscriber::registry(), layer);
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_field_is_written_on_one_line() {
        let subject = "orders.\u{1b}[1A\u{1b}[2Kx\rFORGED\u{202e}dcba";
        let header = "x\n2026-12-07T10:11:12Z ERROR plugbus::dispatch: event dead-lettered";
        let line = logged(|| {
            tracing::error!(subject = %subject, header = %header, id = ?"a\u{2028}b", "event \u{7} {}", "dead-lettered\n");
        });
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.ends_with('\n'), "{line:?}");
        for raw in ['\u{1b}', '\r', '\u{202e}', '\u{7}', '\u{2028}'] {
            assert!(!line.contains(raw), "{raw:?} written raw: {line:?}");
        }
        assert!(line.contains(r"subject=orders.\u{1b}[1A\u{1b}[2Kx\rFORGED\u{202e}dcba"), "{line:?}");
        assert!(line.contains(r"header=x\n2026"), "{line:?}");
        assert!(line.contains(r"event \u{7} dead-lettered\n"), "{line:?}");
    }

    #[test]
    fn plain_fields_are_written_as_the_default_formatter_writes_them() {
        let line = logged(|| tracing::info!(plugin = %"echo", attempts = 3, key = "k", "plugin serving"));
        assert!(line.ends_with("plugin serving plugin=echo attempts=3 key=\"k\"\n"), "{line:?}");
    }
}
