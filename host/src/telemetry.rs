//! OpenTelemetry traces: the W3C trace context events carry, the spans of the host's work, and
//! their export over OTLP/HTTP (protobuf).
//!
//! **Where the context lives.** In the event itself, as the CloudEvents distributed-tracing
//! extension: the `traceparent` and `tracestate` extension attributes (`ce-traceparent` on
//! NATS in binary mode, a plain `traceparent` header on HTTP or a plain NATS message). So it
//! crosses the durable embedded log (extensions are stored with the event) and NATS JetStream
//! (extensions are headers) with nothing else to carry.
//!
//! **Who sets it.** The host, never a plugin: the ingress replaces an incoming context with its
//! own span's (a child of it when it was valid); each output of a handler gets the context of
//! the attempt that produced it ([`set_context`]), whatever the handler put in its headers
//! ([`crate::event::Output::into_event`] drops a plugin's `traceparent`/`tracestate`). A context
//! that does not parse (forged, garbage, over [`MAX_TRACEPARENT_BYTES`]) is ignored: a new trace
//! starts, a debug line says so, and the event is delivered as any other.
//!
//! **Off and free.** Without an endpoint ([`TelemetrySettings::otlp_endpoint`] or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) no exporter and no layer
//! are installed, [`enabled`] is false, and dispatch creates no span (one relaxed load per
//! delivery). A valid incoming context is still passed on to outputs unchanged (a host without
//! export is a transparent hop); none is started.
//!
//! **Spans** (target [`TARGET`], seen only by the OpenTelemetry layer): `publish <subject>` at
//! the ingress; per delivery `process <subject>` (plugin, plugin.version, subject, event_id,
//! queue_wait_ms, outcome, attempts, outputs) with one `attempt` child per attempt (attempt,
//! outcome, kv_conflicts, outputs) whose children are `instantiate`, `kv commit` and one
//! `publish <subject>` per output (the transport's ack). Handler logs are events of the attempt
//! span and carry `trace_id` in the log line.

use crate::event::Event;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of the host's trace spans. Only the OpenTelemetry layer enables it; the
/// log output never shows these spans (`plugbus::trace=off` in its filter).
pub const TARGET: &str = "plugbus::trace";

/// The most lines of a plugin's (its `log` calls, stdout and stderr) an attempt's span takes as
/// events: the SDK keeps no more (`max_events_per_span`), and until the span ends the layer
/// holds every one it is given (review 56c M2: ~3,000 lines of an attempt, each a copy of a
/// subject of up to 1 KiB and six more fields, ~5 MiB in the host per attempt, 25 times what
/// `max_log_bytes` charges, then thrown away). The lines after go to the log only
/// ([`plugin_line!`]: as events of no span).
pub const SPAN_EVENTS_PER_ATTEMPT: u32 = 128;

/// A line of a plugin's, at `$level` with target `plugin`: an event of the current span when
/// `$spanned`, else of no span (the log writes it alike; the OpenTelemetry layer takes only an
/// event of a span). See [`SPAN_EVENTS_PER_ATTEMPT`].
macro_rules! plugin_line {
    ($spanned:expr, $level:ident, $($rest:tt)+) => {
        if $spanned {
            tracing::$level!(target: "plugin", $($rest)+)
        } else {
            tracing::$level!(target: "plugin", parent: None, $($rest)+)
        }
    };
}
pub(crate) use plugin_line;

/// The extension attribute holding the W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// The extension attribute holding the W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";

/// The longest `traceparent` read (version `00` is 55 bytes; a future version may be longer):
/// anything longer is not a trace context, it is ignored.
pub const MAX_TRACEPARENT_BYTES: usize = 512;
/// The longest `tracestate` carried (W3C: at least 512 characters should be propagated); a
/// longer one is dropped whole, the `traceparent` kept.
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// W3C: at most 32 list members in a `tracestate`.
const MAX_TRACESTATE_MEMBERS: usize = 32;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The sampler in force (see [`Sampling`]): the ratio as a threshold on 63 random bits
/// (`u64::MAX`: all), and whether a parent's decision is followed.
static SAMPLE_BELOW: AtomicU64 = AtomicU64::new(u64::MAX);
static FOLLOW_PARENT: AtomicBool = AtomicBool::new(true);

/// Whether spans are being made and exported (an exporter is installed).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns span making on or off while the layer stays installed (the bench measures both in one
/// process; the host never calls it).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// `[telemetry]`: where traces go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP endpoint's base URL (like `OTEL_EXPORTER_OTLP_ENDPOINT`:
    /// `http://127.0.0.1:4318`; `/v1/traces` is appended unless the path already ends with it).
    /// Unset: the standard variables decide (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); none set: tracing is off.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces made and exported, 0.0 to 1.0 (`parentbased_traceidratio`: a
    /// trace that arrives with a context keeps its sampled flag). Unset: `OTEL_TRACES_SAMPLER`
    /// / `OTEL_TRACES_SAMPLER_ARG` decide; neither set: every trace (`parentbased_always_on`).
    pub sample_ratio: Option<f64>,
}

/// Which traces are made: a share of new traces (`ratio`), and whether a trace that arrives with
/// a context follows its sampled flag (`follow_parent`, the `parentbased_*` samplers) or is
/// decided again (`always_on`, `always_off`, `traceidratio`). An unsampled trace makes no span
/// at all (not just exports none), and carries its context on with the sampled flag off, so the
/// next hop makes none either.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// The share of traces made, 0.0 to 1.0.
    pub ratio: f64,
    /// Whether a parent's decision is followed.
    pub follow_parent: bool,
}

impl Sampling {
    /// What `[telemetry] sample_ratio`, else `OTEL_TRACES_SAMPLER` (`sampler`) and
    /// `OTEL_TRACES_SAMPLER_ARG` (`arg`), ask for; an error names the value it cannot use.
    pub fn from(ratio: Option<f64>, sampler: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let share = |what: &str, r: f64| {
            if (0.0..=1.0).contains(&r) { Ok(r) } else { Err(format!("{what} {r} is not between 0.0 and 1.0")) }
        };
        if let Some(r) = ratio {
            return Ok(Self { ratio: share("telemetry.sample_ratio", r)?, follow_parent: true });
        }
        let arg_ratio = || -> Result<f64, String> {
            match arg.map(str::trim).filter(|a| !a.is_empty()) {
                None => Ok(1.0),
                Some(a) => share(
                    "OTEL_TRACES_SAMPLER_ARG",
                    a.parse().map_err(|_| format!("OTEL_TRACES_SAMPLER_ARG={a:?} is not a number"))?,
                ),
            }
        };
        let (ratio, follow_parent) = match sampler.map(str::trim).unwrap_or("") {
            "" | "parentbased_always_on" => (1.0, true),
            "parentbased_always_off" => (0.0, true),
            "parentbased_traceidratio" => (arg_ratio()?, true),
            "always_on" => (1.0, false),
            "always_off" => (0.0, false),
            "traceidratio" => (arg_ratio()?, false),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not a sampler plugbus has: use always_on, always_off, \
                     traceidratio or their parentbased_ forms (or [telemetry] sample_ratio)"
                ));
            }
        };
        Ok(Self { ratio, follow_parent })
    }

    /// The sampler `settings` and the standard variables ask for.
    pub fn of(settings: &TelemetrySettings) -> Result<Self, String> {
        let var = |name| std::env::var(name).ok();
        Self::from(
            settings.sample_ratio,
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
    }

    /// The ratio as a bound on 63 random bits (as OpenTelemetry's `TraceIdRatioBased` compares
    /// them); `u64::MAX`: every trace.
    fn below(&self) -> u64 {
        if self.ratio >= 1.0 { u64::MAX } else { (self.ratio.max(0.0) * (1u64 << 63) as f64) as u64 }
    }

    /// Makes it the sampler in force.
    pub fn install(self) {
        SAMPLE_BELOW.store(self.below(), Ordering::Relaxed);
        FOLLOW_PARENT.store(self.follow_parent, Ordering::Relaxed);
    }
}

/// Whether a trace arriving with `parent` (or starting here, with none) is made, by the sampler
/// in force.
fn sampled(parent: Option<&SpanContext>) -> bool {
    decide(SAMPLE_BELOW.load(Ordering::Relaxed), FOLLOW_PARENT.load(Ordering::Relaxed), parent, fastrand::u64(..))
}

/// The sampling decision: a followed parent's flag; else `draw` (a root's random bits) or the
/// parent's trace id (so every host decides a trace the same) within the share `below`.
fn decide(below: u64, follow_parent: bool, parent: Option<&SpanContext>, draw: u64) -> bool {
    let bits = match parent {
        Some(p) if follow_parent => return p.is_sampled(),
        Some(p) => u128::from_be_bytes(p.trace_id().to_bytes()) as u64,
        None => draw,
    };
    below == u64::MAX || (bits >> 1) < below
}

/// A context for a trace started here and not sampled: random ids, the sampled flag off.
fn unsampled_root() -> SpanContext {
    unsampled(fastrand::u128(1..), fastrand::u64(1..))
}

/// A context with these (non-zero) ids and the sampled flag off.
fn unsampled(trace: u128, span: u64) -> SpanContext {
    let (trace, span) = (TraceId::from_bytes(trace.to_be_bytes()), SpanId::from_bytes(span.to_be_bytes()));
    SpanContext::new(trace, span, TraceFlags::default(), false, TraceState::NONE)
}

impl TelemetrySettings {
    /// The traces URL to export to, when export is on: this setting, else the standard
    /// variables; `None` when none is set or `OTEL_SDK_DISABLED=true`.
    pub fn traces_endpoint(&self) -> Option<String> {
        if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        let nonempty = |v: String| (!v.trim().is_empty()).then(|| v.trim().to_string());
        if let Some(base) = self.otlp_endpoint.clone().and_then(nonempty) {
            return Some(traces_url(&base));
        }
        if let Some(url) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok().and_then(nonempty) {
            return Some(url);
        }
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().and_then(nonempty).map(|b| traces_url(&b))
    }

    /// Checks the endpoint names an `http://` or `https://` URL.
    pub fn validate(&self) -> Result<(), String> {
        // The ratio's one check is `Sampling`'s (no variable is read for a ratio set here).
        Sampling::from(self.sample_ratio, None, None)?;
        if let Some(url) = &self.otlp_endpoint
            && !url.trim().is_empty()
        {
            let u: http::Uri = url.trim().parse().map_err(|e| format!("telemetry.otlp_endpoint {url:?}: {e}"))?;
            if !matches!(u.scheme_str(), Some("http" | "https")) || u.host().is_none() {
                return Err(format!(
                    "telemetry.otlp_endpoint {url:?}: expected an http:// or https:// URL such as http://127.0.0.1:4318"
                ));
            }
        }
        Ok(())
    }
}

/// `base` with the OTLP traces path appended (as the OpenTelemetry SDKs do with
/// `OTEL_EXPORTER_OTLP_ENDPOINT`), unless it is there already.
fn traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") }
}

// ---------------------------------------------------------------------------------------------
// W3C trace context in events

/// Whether `name` is a trace-context header in any spelling a binding uses (`traceparent`,
/// `ce-traceparent`, `ce_tracestate`, …): what only the host sets on an output.
/// Allocates nothing: it runs for every header of every output.
pub fn is_trace_header(name: &str) -> bool {
    let base = match name.get(..3) {
        Some(p) if p.eq_ignore_ascii_case("ce-") || p.eq_ignore_ascii_case("ce_") => &name[3..],
        _ => name,
    };
    base.eq_ignore_ascii_case(TRACEPARENT) || base.eq_ignore_ascii_case(TRACESTATE)
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a W3C `traceparent` (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`); `None`
/// when it is not one: wrong length or version (`ff`, or `00` with anything after), upper-case
/// or non-hex digits, an all-zero id, or over [`MAX_TRACEPARENT_BYTES`].
pub fn parse_traceparent(text: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let text = text.trim();
    if text.len() < 55 || text.len() > MAX_TRACEPARENT_BYTES || !text.is_ascii() {
        return None;
    }
    let (version, rest) = (&text[..2], &text[2..]);
    if !lower_hex(version) || version == "ff" || (version == "00" && text.len() != 55) {
        return None;
    }
    // A later version may append fields, after a `-`.
    if text.len() > 55 && text.as_bytes()[55] != b'-' {
        return None;
    }
    let b = rest.as_bytes();
    if b[0] != b'-' || b[33] != b'-' || b[50] != b'-' {
        return None;
    }
    let (trace, span, flags) = (&rest[1..33], &rest[34..50], &rest[51..53]);
    if !(lower_hex(trace) && lower_hex(span) && lower_hex(flags)) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    // Only the sampled bit has a meaning today; the others are not passed on.
    Some((trace, span, TraceFlags::new(flags & 1)))
}

/// Parses a W3C `tracestate`; `None` when it is over [`MAX_TRACESTATE_BYTES`], has more than 32
/// members, or a member is not `key=value` by the W3C grammar.
pub fn parse_tracestate(text: &str) -> Option<TraceState> {
    let text = text.trim();
    if text.is_empty() {
        return Some(TraceState::NONE);
    }
    if text.len() > MAX_TRACESTATE_BYTES || text.split(',').count() > MAX_TRACESTATE_MEMBERS {
        return None;
    }
    text.parse::<TraceState>().ok()
}

/// The valid trace context `ev` carries (its first `traceparent` and `tracestate`), as a remote
/// parent; `None` when it has none, or when it does not parse (logged at debug: the event is
/// delivered, under a new trace). A bad `tracestate` alone is dropped, the parent kept.
pub fn context_of(ev: &Event) -> Option<SpanContext> {
    let traceparent = ev.header(TRACEPARENT)?;
    let Some((trace, span, flags)) = parse_traceparent(traceparent) else {
        tracing::debug!(subject = %ev.subject, event_id = %ev.id, traceparent = %crate::event::quoted(traceparent),
            "the event's traceparent is not a W3C trace context: ignored, a new trace starts");
        return None;
    };
    let state = match ev.header(TRACESTATE) {
        None => TraceState::NONE,
        Some(text) => parse_tracestate(text).unwrap_or_else(|| {
            tracing::debug!(subject = %ev.subject, event_id = %ev.id, bytes = text.len(),
                "the event's tracestate is not a valid W3C tracestate: dropped, the traceparent kept");
            TraceState::NONE
        }),
    };
    Some(SpanContext::new(trace, span, flags, true, state))
}

/// The `traceparent` text of `cx`.
pub fn traceparent_of(cx: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", cx.trace_id(), cx.span_id(), cx.trace_flags().to_u8())
}

/// Replaces every trace-context extension of `ev` with `cx` (none when `cx` is `None` or
/// invalid): the one place an event's trace context is written.
pub fn set_context(ev: &mut Event, cx: Option<&SpanContext>) {
    ev.extensions.retain(|(k, _)| !is_trace_header(k));
    if let Some(cx) = cx.filter(|cx| cx.is_valid()) {
        ev.extensions.push((TRACEPARENT.into(), traceparent_of(cx)));
        let state = cx.trace_state().header();
        if !state.is_empty() {
            ev.extensions.push((TRACESTATE.into(), state));
        }
    }
}

/// Whether `ev` carries any trace-context extension (cheap: no parsing).
fn has_trace_headers(ev: &Event) -> bool {
    ev.extensions.iter().any(|(k, _)| is_trace_header(k))
}

// ---------------------------------------------------------------------------------------------
// Spans

/// The OpenTelemetry context of `span` (its span context valid once the OpenTelemetry layer
/// saw it).
pub fn span_context(span: &Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// Makes `parent` (a remote span context) the parent of `span`.
fn adopt(span: &Span, parent: SpanContext) {
    let cx = opentelemetry::Context::new().with_remote_span_context(parent);
    let _ = span.set_parent(cx);
}

/// The trace id of the span being run now, hex, when tracing is on (for the handler's log lines).
pub fn current_trace_id() -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span_context(&Span::current());
    cx.is_valid().then(|| cx.trace_id().to_string())
}

/// The ingress's span for `ev` (a `publish <subject>` producer span, child of the context the
/// client sent when it is valid), with `ev`'s context set to it. Off: no span; a valid incoming
/// context is kept, an invalid one removed.
pub fn ingress(ev: &mut Event) -> Span {
    if !enabled() {
        if has_trace_headers(ev) {
            let cx = context_of(ev);
            set_context(ev, cx.as_ref());
        }
        return Span::none();
    }
    let parent = context_of(ev);
    if !sampled(parent.as_ref()) {
        // Not made: the event carries the decision on (its own unsampled root when it had no
        // context), so no hop after this one makes a span either.
        let cx = parent.unwrap_or_else(unsampled_root);
        set_context(ev, Some(&cx));
        return Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "publish",
        otel.name = %format_args!("publish {}", ev.subject), otel.kind = "producer",
        subject = %ev.subject, event_id = %ev.id, otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty);
    if let Some(parent) = parent {
        adopt(&span, parent);
    }
    let cx = span_context(&span);
    set_context(ev, Some(&cx));
    span
}

/// The span of one delivery of `ev` to `plugin` (a `process <subject>` consumer span, child of
/// the context the event carries, else the root of a new trace); `Span::none()` when off or
/// not sampled (the attempt's spans are then none too, and its outputs carry the input's
/// context on).
pub fn delivery_span(plugin: &str, version: &str, ev: &Event, queued: Option<std::time::Instant>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let parent = context_of(ev);
    if !sampled(parent.as_ref()) {
        return Span::none();
    }
    let span = tracing::info_span!(target: TARGET, "process",
        otel.name = %format_args!("process {}", ev.subject), otel.kind = "consumer",
        plugin = %plugin, plugin.version = %version, subject = %ev.subject, event_id = %ev.id,
        queue_wait_ms = tracing::field::Empty, outcome = tracing::field::Empty, attempts = tracing::field::Empty,
        outputs = tracing::field::Empty, otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty);
    if let Some(parent) = parent {
        adopt(&span, parent);
    }
    if let Some(queued) = queued {
        span.record("queue_wait_ms", queued.elapsed().as_secs_f64() * 1e3);
    }
    span
}

/// Whether tracing is on and the span being run now was made (a sampled delivery): a child of
/// an unsampled delivery is not made either (it would start a trace of its own).
fn in_made_span() -> bool {
    enabled() && !Span::current().is_disabled()
}

/// The span of one attempt (a child of the current delivery span); `Span::none()` when off.
pub fn attempt_span(attempt: u32) -> Span {
    if !in_made_span() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, "attempt", attempt, outcome = tracing::field::Empty,
        kv_conflicts = tracing::field::Empty, outputs = tracing::field::Empty,
        otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty)
}

/// A child span of the current one for one of the host's own steps (`instantiate`,
/// `kv commit`); `Span::none()` when off.
pub fn step_span(step: &'static str) -> Span {
    if !in_made_span() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, "step", otel.name = step)
}

/// The span of publishing one output (a producer span, its transport's ack included);
/// `Span::none()` when off.
pub fn output_span(out: &Event) -> Span {
    if !in_made_span() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, "publish",
        otel.name = %format_args!("publish {}", out.subject), otel.kind = "producer",
        subject = %out.subject, event_id = %out.id, tries = tracing::field::Empty,
        otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty)
}

/// The most spans one export request carries, and the most waiting for export (unless
/// `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` / `OTEL_BSP_MAX_QUEUE_SIZE` say otherwise). An attempt's span
/// carries its plugin's log lines and output as events, up to about 200 KB: at the SDK's 512 a
/// request reached 27 MB, which a collector refuses (20 MiB by default), losing every other
/// plugin's spans in it, and 2,048 waiting held 400 MB.
const EXPORT_BATCH_SPANS: usize = 64;
const QUEUED_SPANS: usize = 512;

fn batch_config() -> opentelemetry_sdk::trace::BatchConfig {
    let mut config = opentelemetry_sdk::trace::BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        config = config.with_max_queue_size(QUEUED_SPANS);
    }
    if std::env::var_os("OTEL_BSP_MAX_EXPORT_BATCH_SIZE").is_none() {
        config = config.with_max_export_batch_size(EXPORT_BATCH_SPANS);
    }
    config.build()
}

/// Marks `span` failed with `why` (cut to [`crate::event::ECHO_BYTES`]); formats nothing when
/// the span is off.
pub fn fail(span: &Span, why: &dyn std::fmt::Display) {
    if span.is_none() {
        return;
    }
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", &*crate::event::cut(&why.to_string()));
}

/// The context the outputs of the attempt running now carry: the attempt span's when tracing is
/// on and the delivery was made; else the valid context the input carried (passed on
/// unchanged). A delivery not made whose input carried no context (a NATS message from a
/// publisher without tracing) passes on an unsampled root of its own, so the next hop follows
/// the decision instead of starting a trace mid-pipeline; off, none.
pub fn output_context(input: &Event) -> Option<SpanContext> {
    if !enabled() {
        return if has_trace_headers(input) { context_of(input) } else { None };
    }
    let cx = span_context(&Span::current());
    if cx.is_valid() {
        return Some(cx);
    }
    Some(context_of(input).unwrap_or_else(|| unsampled_root_of(input)))
}

/// The unsampled root a delivery of `input` passes on when `input` carried no context: made
/// from its (source, id), so every output of the delivery (and of a redelivery) shares one
/// trace id.
fn unsampled_root_of(input: &Event) -> SpanContext {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for field in [input.source.as_str(), input.id.as_str()] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    let digest: [u8; 32] = h.finalize().into();
    let trace = u128::from_be_bytes(digest[..16].try_into().expect("16 bytes")).max(1);
    let span = u64::from_be_bytes(digest[16..24].try_into().expect("8 bytes")).max(1);
    unsampled(trace, span)
}

// ---------------------------------------------------------------------------------------------
// Export

/// Whether an `OTEL_EXPORTER_OTLP_*PROTOCOL` value is one the exporter speaks: unset or
/// `http/protobuf`. Anything else (`grpc`, `http/json`) is refused at start with what to do,
/// rather than sending protobuf over HTTP to a port that expects something else and losing
/// every span.
fn check_protocol(value: Option<&str>) -> Result<(), String> {
    match value.map(str::trim) {
        None | Some("") | Some("http/protobuf") => Ok(()),
        Some(_) => Err("plugbus exports OTLP over HTTP with protobuf only (`http/protobuf`); point \
            `[telemetry] otlp_endpoint` at the collector's OTLP/HTTP port (4318 by default) and \
            unset the variable or set it to http/protobuf"
            .into()),
    }
}

/// A running exporter: flush and stop it with [`Exporter::shutdown`] before the process ends.
pub struct Exporter {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
    /// Where spans go.
    pub endpoint: String,
}

impl Exporter {
    /// Starts the OTLP/HTTP (protobuf) exporter to `settings`' endpoint with a batch processor
    /// (its own thread; the HTTP requests run on the current Tokio runtime, through the
    /// `reqwest` client the host already builds); sampling as [`Sampling::of`] says (default:
    /// parent-based always-on). `None` when tracing is off.
    /// Must be called within a Tokio runtime.
    pub fn start(settings: &TelemetrySettings) -> anyhow::Result<Option<Self>> {
        use anyhow::Context as _;
        use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
        settings.validate().map_err(anyhow::Error::msg)?;
        let Some(endpoint) = settings.traces_endpoint() else { return Ok(None) };
        // The signal-specific variable wins over the general one (OpenTelemetry's rule).
        let protocol = ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]
            .into_iter()
            .find_map(|var| std::env::var(var).ok().map(|value| (var, value)));
        if let Some((var, value)) = protocol {
            check_protocol(Some(&value)).map_err(|why| anyhow::anyhow!("{var}={value}: {why}"))?;
        }
        let client = RuntimeHttpClient {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .context("building the OTLP HTTP client")?,
            runtime: tokio::runtime::Handle::try_current().context("the OTLP exporter needs a Tokio runtime")?,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .with_http_client(client)
            .build()
            .with_context(|| format!("starting the OTLP exporter to {endpoint}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("plugbus");
        }
        let resource =
            resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
        let sampling = Sampling::of(settings).map_err(anyhow::Error::msg)?;
        sampling.install();
        // The host decides which traces are made (an unsampled one makes no span); the SDK
        // exports every span it is given.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_span_processor(
                opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch_config())
                    .build(),
            )
            .with_resource(resource)
            .build();
        Ok(Some(Self { provider, endpoint }))
    }

    /// The `tracing` layer that turns the host's spans (target [`TARGET`]) into OpenTelemetry
    /// spans, and handler logs (target `plugin`) and the host's warnings inside them into span
    /// events. Installing it turns [`enabled`] on.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
    {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::filter::{LevelFilter, Targets};
        ENABLED.store(true, Ordering::Relaxed);
        let tracer = self.provider.tracer("plugbus");
        let filter = Targets::new()
            .with_target(TARGET, LevelFilter::TRACE)
            .with_target("plugin", LevelFilter::TRACE)
            .with_target("plugbus", LevelFilter::WARN);
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(filter)
    }

    /// Exports what is buffered and stops the exporter (blocking: call from a blocking thread
    /// or outside the runtime's workers).
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("stopping the OTLP exporter: {e}");
        }
    }
}

/// `opentelemetry-http`'s client over the host's `reqwest` client: the batch processor calls it
/// from its own thread; the request runs on the Tokio runtime the exporter was started in.
#[derive(Debug)]
struct RuntimeHttpClient {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeHttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let http = self.http.clone();
        let task = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let res =
                http.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
            let mut out = http::Response::builder().status(res.status());
            if let Some(h) = out.headers_mut() {
                *h = res.headers().clone();
            }
            let body = res.bytes().await?;
            Ok::<_, opentelemetry_http::HttpError>(out.body(body)?)
        });
        task.await.map_err(|e| -> opentelemetry_http::HttpError { Box::new(e) })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn only_otlp_over_http_protobuf_is_accepted_and_grpc_is_refused_naming_what_to_do() {
        for ok in [None, Some(""), Some("http/protobuf"), Some(" http/protobuf ")] {
            assert_eq!(check_protocol(ok), Ok(()), "{ok:?}");
        }
        for refused in ["grpc", "http/json", "GRPC"] {
            let why = check_protocol(Some(refused)).unwrap_err();
            assert!(why.contains("http/protobuf") && why.contains("4318"), "{refused}: {why}");
        }
    }

    #[test]
    fn samplers_are_read_from_the_setting_or_the_standard_variables_and_bad_ones_are_named() {
        let s = |ratio, sampler, arg| Sampling::from(ratio, sampler, arg);
        let on = Sampling { ratio: 1.0, follow_parent: true };
        assert_eq!(s(None, None, None), Ok(on), "default: parentbased_always_on");
        assert_eq!(s(None, Some("parentbased_always_on"), None), Ok(on));
        assert_eq!(s(None, Some("always_off"), None), Ok(Sampling { ratio: 0.0, follow_parent: false }));
        assert_eq!(
            s(None, Some("parentbased_traceidratio"), Some("0.25")),
            Ok(Sampling { ratio: 0.25, follow_parent: true })
        );
        assert_eq!(s(None, Some("traceidratio"), Some(" 0.5 ")), Ok(Sampling { ratio: 0.5, follow_parent: false }));
        assert_eq!(
            s(Some(0.1), Some("always_off"), None),
            Ok(Sampling { ratio: 0.1, follow_parent: true }),
            "the setting wins"
        );
        assert!(s(None, Some("jaeger_remote"), None).unwrap_err().contains("\"jaeger_remote\""));
        assert!(s(None, Some("traceidratio"), Some("half")).unwrap_err().contains("OTEL_TRACES_SAMPLER_ARG=\"half\""));
        assert!(s(None, Some("traceidratio"), Some("1.5")).unwrap_err().contains("not between"));
        assert!(s(Some(-0.1), None, None).unwrap_err().contains("telemetry.sample_ratio"));
        let settings = TelemetrySettings { sample_ratio: Some(2.0), ..Default::default() };
        assert!(settings.validate().unwrap_err().contains("telemetry.sample_ratio 2"));
    }

    #[test]
    fn a_share_of_new_traces_is_made_and_a_parent_decides_for_its_children() {
        let half = Sampling { ratio: 0.5, follow_parent: true }.below();
        let made = (0..10_000).filter(|_| decide(half, true, None, fastrand::u64(..))).count();
        assert!((4_000..6_000).contains(&made), "{made} of 10,000 at 0.5");
        let none = Sampling { ratio: 0.0, follow_parent: true }.below();
        assert!(!(0..1_000).any(|_| decide(none, true, None, fastrand::u64(..))));
        let all = Sampling { ratio: 1.0, follow_parent: true }.below();
        assert!((0..1_000).all(|_| decide(all, true, None, fastrand::u64(..))));
        let flagged = |sampled: bool| {
            let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
            SpanContext::new(TraceId::from_bytes([7; 16]), SpanId::from_bytes([1; 8]), flags, true, TraceState::NONE)
        };
        // Parent-based: the parent's flag, whatever the share.
        assert!(decide(none, true, Some(&flagged(true)), 0));
        assert!(!decide(all, true, Some(&flagged(false)), 0));
        // Not parent-based: the trace id decides, the same way every time.
        let by_id = decide(half, false, Some(&flagged(false)), 0);
        assert!((0..100).all(|_| decide(half, false, Some(&flagged(false)), fastrand::u64(..)) == by_id));
        // An unsampled root is a valid context with the sampled flag off.
        let root = unsampled_root();
        assert!(root.is_valid() && !root.is_sampled());
    }

    #[test]
    fn traceparent_parses_only_w3c_contexts() {
        let (t, s, f) = parse_traceparent(GOOD).unwrap();
        assert_eq!(t.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.to_string(), "00f067aa0ba902b7");
        assert!(f.is_sampled());
        // a later version may append fields after a dash
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra").is_some());
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4é36-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} parsed");
        }
        let huge = format!("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-{}", "a".repeat(1 << 20));
        assert!(parse_traceparent(&huge).is_none());
    }

    #[test]
    fn tracestate_is_bounded_and_checked() {
        assert_eq!(
            parse_tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7").unwrap().get("rojo"),
            Some("00f067aa0ba902b7")
        );
        assert!(parse_tracestate(&format!("k={}", "v".repeat(600))).is_none());
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(parse_tracestate(&many.join(",")).is_none());
        assert!(parse_tracestate("not a tracestate").is_none());
    }

    #[test]
    fn set_context_replaces_every_spelling() {
        let mut ev = Event::new("a", "x")
            .with_header("traceparent", "forged")
            .with_header("ce-traceparent", "forged")
            .with_header("CE_TraceState", "x=y")
            .with_header("tenant", "t");
        let (t, s, f) = parse_traceparent(GOOD).unwrap();
        let cx = SpanContext::new(t, s, f, true, TraceState::NONE);
        set_context(&mut ev, Some(&cx));
        let trace: Vec<_> = ev.extensions.iter().filter(|(k, _)| is_trace_header(k)).collect();
        assert_eq!(trace, [&("traceparent".to_string(), GOOD.to_string())]);
        assert_eq!(ev.header("tenant"), Some("t"));
        set_context(&mut ev, None);
        assert!(ev.header("traceparent").is_none());
    }

    #[test]
    fn context_of_reads_a_valid_context_and_ignores_garbage() {
        let ev = Event::new("a", "x").with_header("traceparent", GOOD).with_header("tracestate", "a=b");
        let cx = context_of(&ev).unwrap();
        assert!(cx.is_remote() && cx.is_valid());
        assert_eq!(traceparent_of(&cx), GOOD);
        assert_eq!(cx.trace_state().header(), "a=b");
        let ev = Event::new("a", "x").with_header("traceparent", "00-zz").with_header("tracestate", "a=b");
        assert!(context_of(&ev).is_none());
        // a bad tracestate alone is dropped
        let ev = Event::new("a", "x").with_header("traceparent", GOOD).with_header("tracestate", "%%%");
        assert_eq!(context_of(&ev).unwrap().trace_state().header(), "");
    }

    #[test]
    fn off_the_ingress_keeps_a_valid_context_and_drops_a_bad_one() {
        let mut ev = Event::new("a", "x").with_header("traceparent", GOOD).with_header("ce-traceparent", "junk");
        assert!(ingress(&mut ev).is_none());
        assert_eq!(ev.header("traceparent"), Some(GOOD));
        assert_eq!(ev.extensions.iter().filter(|(k, _)| is_trace_header(k)).count(), 1);
        let mut ev = Event::new("a", "x").with_header("traceparent", "z".repeat(4096));
        ingress(&mut ev);
        assert!(ev.header("traceparent").is_none());
    }

    #[test]
    fn endpoints_get_the_traces_path() {
        assert_eq!(traces_url("http://127.0.0.1:4318"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        let s = TelemetrySettings { otlp_endpoint: Some("ftp://x".into()), ..Default::default() };
        assert!(s.validate().unwrap_err().contains("telemetry.otlp_endpoint"));
        assert!(
            TelemetrySettings { otlp_endpoint: Some("http://127.0.0.1:4318".into()), ..Default::default() }
                .validate()
                .is_ok()
        );
    }
}
