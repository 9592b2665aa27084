//! What a store holds while one plugin instance runs: the locked-down WASI context, the
//! plugin's limits, and the per-attempt buffers the host imports write into (outputs, kv
//! transaction). Nothing here is shared between events.

use super::bindings::plugbus::handler::{bus, config, kv, logging, rpc, types};
use super::limits::{ENTRY_COST, Limits, MAX_RESOURCES, MAX_SUBJECT_BYTES, MemoryLimiter};
use super::outbound::{Outbound, OutboundPolicy};
use super::record::Seen;
use super::stdio::Capture;
use super::world::FixedWorld;
use crate::event::{Output, cut, is_reserved_header, quoted};
use crate::kv::{KvStore, Txn};
use crate::subject::{PatternSet, is_system_subject, validate_subject};
use crate::telemetry::plugin_line;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Per-plugin context shared by every store of that plugin.
pub struct PluginCtx {
    /// The plugin's name (its kv namespace and log tag).
    pub name: Arc<str>,
    /// Its limits.
    pub limits: Limits,
    /// Subjects it may publish to.
    pub publishes: PatternSet,
    /// Operator-set values for the `config` import.
    pub config: HashMap<String, String>,
    /// Where `kv` reads and commits.
    pub kv: Arc<dyn KvStore>,
    /// Where it may send HTTP requests (requested and granted).
    pub outbound: Arc<OutboundPolicy>,
    /// Where its requests (request/reply) go.
    pub requester: Arc<dyn crate::rpc::Requester>,
    /// Its attempts running guest code or ready to, within the host's (`cpu_wait`).
    pub runnable: super::cpu_wait::Runnable,
    /// Its share of the CPUs (`cpu_share`).
    pub share: Arc<super::cpu_share::PluginShare>,
}

/// The data of one store (one instance, one attempt).
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// The memory cap.
    pub limiter: MemoryLimiter,
    /// The plugin this store runs.
    pub plugin: Arc<PluginCtx>,
    /// The event being handled (empty while reading the manifest).
    pub event_id: String,
    /// Its subject.
    pub subject: String,
    /// Buffered outputs of this attempt.
    pub outputs: Vec<Output>,
    output_bytes: u64,
    /// Why a publish was refused, for the failure report.
    pub refused: Option<String>,
    /// This attempt's kv reads and writes.
    pub txn: Txn,
    /// stdout and stderr of this attempt.
    pub stdout: Capture,
    /// See `stdout`.
    pub stderr: Capture,
    log_bytes: u64,
    /// The plugin's lines this attempt gave its span ([`telemetry::SPAN_EVENTS_PER_ATTEMPT`]).
    spanned_lines: u32,
    /// When the call started (the deadline counts from here).
    pub started: Instant,
    /// Set when the deadline interrupted the call.
    pub deadline_hit: bool,
    /// Its waits for a CPU behind other plugins' attempts, which the deadline does not count.
    pub cpu_wait: Arc<super::cpu_wait::CpuWait>,
    /// Set (with what to say) when the wall-clock bound, not the deadline, ended the call: the
    /// host kept it waiting for a CPU that long (`cpu_wait::WALL_FACTOR`).
    pub starved: Option<String>,
    /// What the handler waits for in a host call that waits on the host's own store (a kv
    /// read), while it does: a call dropped at the deadline with this set failed for the host,
    /// and is reported so (`host error: …`), never as the handler's deadline.
    pub waiting_on_host: Option<String>,
    /// Why a host call the handler made failed for the host (the kv store failed a read): an
    /// attempt that then asks to retry or traps failed for the host, and is reported so
    /// (`host error: …`, counted in `plugbus_host_failures_total`), never as the handler's. The
    /// first such failure of the attempt.
    pub host_failed: Option<String>,
    http: wasmtime_wasi_http::WasiHttpCtx,
    /// The outbound HTTP policy of this attempt (`wasi:http` hooks).
    pub outbound: Outbound,
    /// What this attempt read and logged (bounded), for a dead letter's record.
    pub seen: Seen,
    /// The event's reply address (the host's: an inbox or a slot token), when it has one.
    reply_to: Option<String>,
    /// What the plugin sees as the event's `reply-to` (`rpc::reply_token` of `reply_to`).
    pub reply_token: Option<String>,
    /// The chain of requests the event (a request) belongs to ([`crate::rpc::ASKED_THROUGH`]).
    asked_through: Option<String>,
    /// The trace context this attempt's requests carry: what its outputs carry
    /// ([`crate::telemetry::output_context`]), so a host without export, or an unsampled
    /// delivery, passes the input's context (or its decision) on to the responder.
    request_context: Option<opentelemetry::trace::SpanContext>,
    /// This attempt's reply, released with its outputs only on Ok.
    pub reply: Option<Output>,
    /// Requests this attempt made.
    requests: u32,
    /// Host calls refused in this attempt (publish, request, reply): only the first
    /// [`MAX_LOGGED_REFUSALS`] are logged.
    refusals: u32,
    /// kv reads this attempt sent to the store (a key read again is read again: on NATS a
    /// round trip on the connection every plugin shares), bounded by `max_kv_reads`.
    kv_reads: u32,
}

/// Refused host calls logged per attempt. The handler gets every refusal as its call's error;
/// the host's log gets these and then one line saying the rest are not logged. Without a bound,
/// a handler looping on a refused call until its deadline wrote a warning of up to 4 KiB per
/// call (millions per event, beside `max_log_bytes`, which bounds only its own log lines), on
/// the runtime thread that writes the log.
pub const MAX_LOGGED_REFUSALS: u32 = 8;

/// The most random bytes one `wasi:random` call returns (`get-random-bytes`,
/// `get-insecure-random-bytes`): a larger request traps (`requested len … exceeds limit 65536`).
/// Rust's standard library and `getrandom` ask for 32 bytes or fewer at a time.
pub const MAX_RANDOM_BYTES: u64 = 64 << 10;

impl HostState {
    /// Fresh state for one attempt of `event_id` on `subject`.
    pub fn new(plugin: Arc<PluginCtx>, event_id: &str, subject: &str) -> Self {
        Self::in_world(plugin, event_id, subject, None)
    }

    /// Like [`HostState::new`]; with `world`, the handler's clocks and random are fixed by it
    /// (a repeatable run, `plugbus test`) instead of WASI's real ones.
    pub fn in_world(plugin: Arc<PluginCtx>, event_id: &str, subject: &str, world: Option<&FixedWorld>) -> Self {
        let log_cap = plugin.limits.max_log_bytes as usize;
        let stdout = Capture::new(log_cap);
        let stderr = Capture::new(log_cap);
        // Locked down: no preopened directories, no environment, no arguments, no network.
        // Stdio goes to capped captures; clocks and random are WASI's defaults (random capped per call).
        let mut builder = WasiCtx::builder();
        builder.stdout(stdout.clone()).stderr(stderr.clone());
        if let Some(world) = world {
            world.install(&mut builder);
        }
        // WASI's own cap (64 MiB) lets one call make the host build and fill a list that size,
        // outside the plugin's memory cap and without yielding: a larger request traps.
        builder.max_random_size(MAX_RANDOM_BYTES);
        let wasi = builder.build();
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let mut outbound = Outbound::new(plugin.outbound.clone(), plugin.name.clone(), &plugin.limits, event_id);
        // A repeatable run must not reach the outside world.
        outbound.offline = world.is_some();
        outbound.stubs = world.and_then(|w| w.http.clone());
        let txn = Txn::with_quota(plugin.limits.max_kv_bytes);
        Self {
            wasi,
            table,
            limiter: MemoryLimiter::new(plugin.limits.memory_bytes()),
            plugin,
            event_id: event_id.to_string(),
            subject: subject.to_string(),
            outputs: Vec::new(),
            output_bytes: 0,
            refused: None,
            txn,
            stdout,
            stderr,
            log_bytes: 0,
            spanned_lines: 0,
            started: Instant::now(),
            deadline_hit: false,
            cpu_wait: Arc::default(),
            starved: None,
            waiting_on_host: None,
            host_failed: None,
            http: http_ctx(),
            outbound,
            seen: Seen::default(),
            reply_to: None,
            reply_token: None,
            asked_through: None,
            request_context: None,
            reply: None,
            requests: 0,
            refusals: 0,
            kv_reads: 0,
        }
    }

    /// Sets what an attempt takes from `event` beyond its id and subject (each attempt, after
    /// [`HostState::new`] or [`HostState::reset_for`]): its source, part of the outbound calls'
    /// `Idempotency-Key`; and as a request, its reply address (the plugin sees only its token),
    /// and the chain of requests it belongs to, which this plugin's own requests carry on
    /// ([`crate::rpc::ASKED_THROUGH`]).
    pub fn set_from_event(&mut self, event: &crate::event::Event) {
        self.outbound.event_source.clone_from(&event.source);
        let reply_to = event.reply_to.as_deref();
        self.reply_token = reply_to.map(crate::rpc::reply_token);
        self.reply_to = reply_to.map(str::to_string);
        self.asked_through = reply_to.and(event.header(crate::rpc::ASKED_THROUGH)).map(str::to_string);
        // Read now, in the attempt's span, as the request's host call would.
        self.request_context = crate::telemetry::output_context(event);
    }

    /// When this attempt's deadline passes, as far as is known now: later by what it waited for
    /// a CPU behind other plugins' attempts (`cpu_wait`).
    pub(super) fn deadline_at(&self) -> Instant {
        super::cpu_wait::deadline_at(self.started, self.plugin.limits.deadline, self.cpu_wait.credited())
    }

    /// Readies a warm store for the next event: the per-attempt buffers start empty and the
    /// deadline counts from now. (stdout/stderr were drained when the last attempt ended.)
    pub fn reset_for(&mut self, event_id: &str, subject: &str) {
        self.event_id.clear();
        self.event_id.push_str(event_id);
        self.subject.clear();
        self.subject.push_str(subject);
        self.outputs.clear();
        self.output_bytes = 0;
        self.refused = None;
        self.txn = Txn::with_quota(self.plugin.limits.max_kv_bytes);
        self.log_bytes = 0;
        self.spanned_lines = 0;
        self.started = Instant::now();
        self.deadline_hit = false;
        self.cpu_wait.reset();
        self.starved = None;
        self.waiting_on_host = None;
        self.host_failed = None;
        self.outbound.event_id.clear();
        self.outbound.event_id.push_str(event_id);
        self.outbound.calls = 0;
        self.outbound.sent = 0;
        self.outbound.refusals = 0;
        self.outbound.circuit_open = None;
        self.seen = Seen::default();
        self.reply_to = None;
        self.reply_token = None;
        self.asked_through = None;
        self.reply = None;
        self.requests = 0;
        self.refusals = 0;
        self.kv_reads = 0;
    }

    /// Outbound HTTP calls that passed the policy and its breakers, and requests, the attempt
    /// made (see `Attempt::calls_out`).
    pub(super) fn calls_out(&self) -> u32 {
        self.outbound.sent.saturating_add(self.requests)
    }

    /// Requests the attempt sent.
    pub(super) fn requests_out(&self) -> u32 {
        self.requests
    }

    fn refuse(&mut self, err: types::PublishError) -> Result<(), types::PublishError> {
        let why = match &err {
            types::PublishError::Denied(m) | types::PublishError::Limit(m) | types::PublishError::Invalid(m) => m,
        };
        let why = why.clone();
        self.log_refusal("publish", &why);
        self.refused = Some(why);
        Err(err)
    }

    /// Logs a refused host call (`call`: publish, request, reply), as long as the attempt has
    /// refusals left to log ([`MAX_LOGGED_REFUSALS`]); the first one past says the rest are not.
    fn log_refusal(&mut self, call: &str, why: &str) {
        self.refusals = self.refusals.saturating_add(1);
        let (plugin, event_id, subject) = (&*self.plugin.name, &self.event_id, &self.subject);
        if self.refusals <= MAX_LOGGED_REFUSALS {
            tracing::warn!(plugin, event_id, subject, "{call} refused: {why}");
        } else if self.refusals == MAX_LOGGED_REFUSALS + 1 {
            tracing::warn!(
                plugin,
                event_id,
                subject,
                "{call} refused; this attempt's further refused host calls are not \
                logged (its handler gets each as its call's error; {MAX_LOGGED_REFUSALS} were logged)"
            );
        }
    }
}

/// Why a header name cannot go on an output: empty, not an HTTP/NATS header token (a name
/// carrying `:`, spaces or line breaks would corrupt a NATS header block), or reserved.
fn check_header_name(name: &str) -> Result<(), types::PublishError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > MAX_SUBJECT_BYTES || !name.bytes().all(token) {
        return Err(types::PublishError::Invalid(format!(
            "header name {} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~, at most \
             {MAX_SUBJECT_BYTES} bytes)",
            quoted(name)
        )));
    }
    if is_reserved_header(name) {
        return Err(types::PublishError::Denied(format!(
            "header {} is reserved: the host sets plugbus-*, nats-* and the CloudEvents attributes \
             (id, source, type, time, specversion, subject; datacontenttype only without a prefix; data \
             and data_base64 hold the data)",
            quoted(name)
        )));
    }
    Ok(())
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// `wasi:http`'s state for one store: header maps the guest builds hold at most
/// [`super::limits::HTTP_FIELDS_BYTES`] each.
fn http_ctx() -> wasmtime_wasi_http::WasiHttpCtx {
    let mut ctx = wasmtime_wasi_http::WasiHttpCtx::new();
    ctx.set_field_size_limit(super::limits::HTTP_FIELDS_BYTES);
    ctx
}

impl wasmtime_wasi_http::WasiHttpView for HostState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        // The deadline counts from when this attempt started (a warm store restarts it).
        self.outbound.deadline = tokio::time::Instant::from_std(self.deadline_at());
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl types::Host for HostState {}

impl bus::Host for HostState {
    fn publish(
        &mut self,
        subject: String,
        data: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), types::PublishError> {
        if let Err(e) = check_subject(self, &subject) {
            return self.refuse(e);
        }
        let limits = &self.plugin.limits;
        if self.outputs.len() as u64 >= u64::from(limits.max_publishes) {
            let msg = format!("publish limit of {} per event reached", limits.max_publishes);
            return self.refuse(types::PublishError::Limit(msg));
        }
        let header_bytes = match check_headers(limits, &headers) {
            Ok(bytes) => bytes,
            Err(e) => return self.refuse(e),
        };
        // Every output and every header costs ENTRY_COST on top of its bytes.
        let size = (subject.len() + data.len()) as u64 + ENTRY_COST + header_bytes;
        if self.output_bytes + size > limits.max_output_bytes {
            let msg = format!("output limit of {} bytes per event reached", limits.max_output_bytes);
            return self.refuse(types::PublishError::Limit(msg));
        }
        self.output_bytes += size;
        self.outputs.push(Output { subject, data: data.into(), headers });
        Ok(())
    }
}

impl logging::Host for HostState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        // Each line costs ENTRY_COST on top of its bytes: a million empty lines are a million
        // host log lines, not zero bytes. Charged as it comes first: a line over what is left
        // is never escaped (4 MiB of control characters escaped to 21 MiB, for nothing).
        self.log_bytes += message.len() as u64 + ENTRY_COST;
        if self.log_bytes > self.plugin.limits.max_log_bytes {
            self.seen.truncated = true;
            return;
        }
        // On one line (see `event::one_line`), and charged as written: an escaped control
        // character takes up to ten bytes.
        let escaped = crate::event::one_line(&message);
        self.log_bytes += (escaped.len() - message.len()) as u64;
        if self.log_bytes > self.plugin.limits.max_log_bytes {
            self.seen.truncated = true;
            return;
        }
        let message = escaped;
        let name = match level {
            types::LogLevel::Trace => "TRACE",
            types::LogLevel::Debug => "DEBUG",
            types::LogLevel::Info => "INFO",
            types::LogLevel::Warn => "WARN",
            types::LogLevel::Error => "ERROR",
        };
        self.seen.log(name, &message);
        // With tracing on, the line is an event of the attempt's span (its first
        // `SPAN_EVENTS_PER_ATTEMPT` lines) and names its trace.
        let trace_id = crate::telemetry::current_trace_id();
        let trace_id = trace_id.as_deref();
        let spanned = self.spans_line();
        let (plugin, event_id, subject) = (&*self.plugin.name, &self.event_id, &self.subject);
        match level {
            types::LogLevel::Trace => plugin_line!(spanned, trace, plugin, event_id, subject, trace_id, "{message}"),
            types::LogLevel::Debug => plugin_line!(spanned, debug, plugin, event_id, subject, trace_id, "{message}"),
            types::LogLevel::Info => plugin_line!(spanned, info, plugin, event_id, subject, trace_id, "{message}"),
            types::LogLevel::Warn => plugin_line!(spanned, warn, plugin, event_id, subject, trace_id, "{message}"),
            types::LogLevel::Error => plugin_line!(spanned, error, plugin, event_id, subject, trace_id, "{message}"),
        }
    }
}

impl HostState {
    /// Whether the plugin's next line is an event of the attempt's span (counted).
    pub fn spans_line(&mut self) -> bool {
        self.spanned_lines = self.spanned_lines.saturating_add(1);
        self.spanned_lines <= crate::telemetry::SPAN_EVENTS_PER_ATTEMPT
    }
}

/// The refusals `publish` and `request` share: the subject (length, validity, system and
/// dead-letter subjects, the manifest's `publishes`).
fn check_subject(state: &HostState, subject: &str) -> Result<(), types::PublishError> {
    // Checked before `validate_subject`, whose error would copy (and escape) all of it.
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(types::PublishError::Invalid(format!(
            "subject {} is longer than {MAX_SUBJECT_BYTES} bytes",
            quoted(subject)
        )));
    }
    if let Err(e) = validate_subject(subject) {
        return Err(types::PublishError::Invalid(cut(&e.to_string()).into_owned()));
    }
    if is_system_subject(subject) {
        return Err(types::PublishError::Denied(format!("{} is a system subject", quoted(subject))));
    }
    // The host alone publishes there, as at the HTTP ingress: a plugin's outputs on another's
    // dead-letter subject would pose as its dead letters (and on NATS fill `PLUGBUS_DLQ`, whose
    // listing stops after a thousand messages that are not the host's).
    if crate::subject::is_dead_letter_subject(subject) {
        return Err(types::PublishError::Denied(format!(
            "{} is a dead-letter subject: the host alone publishes under `plugbus.dlq.`",
            quoted(subject)
        )));
    }
    if !state.plugin.publishes.matches(subject) {
        let allowed = format!("{:?}", state.plugin.publishes.iter().map(|p| p.as_str()).collect::<Vec<_>>());
        return Err(types::PublishError::Denied(format!(
            "{} is not in the manifest's publishes {}",
            quoted(subject),
            cut(&allowed)
        )));
    }
    Ok(())
}

/// Why an output cannot have this content type: a CloudEvents envelope
/// ([`crate::cloudevents::is_envelope_type`]) would make the message that carries it the
/// envelope in its data, a forged event with the host's headers ignored.
fn check_content_type(name: &str, value: &str) -> Result<(), types::PublishError> {
    let content_type = name.eq_ignore_ascii_case("content-type") || name.eq_ignore_ascii_case("datacontenttype");
    // What every transport refuses in an event it reads (`cloudevents::check_event`): let out,
    // such an output reached each NATS subscriber as a malformed message, dead-lettered under
    // the subscriber's name, not the publisher's.
    let max = crate::cloudevents::MAX_ATTRIBUTE_BYTES;
    if content_type && (value.len() > max || value.chars().any(char::is_control)) {
        return Err(types::PublishError::Invalid(format!(
            "header {name} {} is not a content type an event may carry: at most {max} bytes, no control \
             characters",
            quoted(value)
        )));
    }
    if content_type && crate::cloudevents::is_envelope_type(value) {
        return Err(types::PublishError::Denied(format!(
            "header {name} {} is reserved: an output's data cannot be a CloudEvents envelope (its receivers \
             would read the data as the event)",
            quoted(value)
        )));
    }
    Ok(())
}

/// Checks `headers` for an output, a request or a reply; returns what they cost.
fn check_headers(limits: &super::limits::Limits, headers: &[(String, String)]) -> Result<u64, types::PublishError> {
    if headers.len() as u64 > u64::from(limits.max_headers) {
        let msg = format!("header limit of {} per output reached ({} given)", limits.max_headers, headers.len());
        return Err(types::PublishError::Limit(msg));
    }
    for (name, value) in headers {
        check_header_name(name)?;
        check_content_type(name, value)?;
        // NATS cannot carry a line break in a header value: it was left out there and kept on
        // the embedded bus (an ordering key lost on one backend only).
        if value.contains(['\r', '\n', '\0']) {
            return Err(types::PublishError::Invalid(format!(
                "header {} has a value with a line break or NUL: {} (a header value is one line)",
                quoted(name),
                quoted(value)
            )));
        }
    }
    Ok(headers.iter().map(|(k, v)| (k.len() + v.len()) as u64 + ENTRY_COST).sum())
}

fn request_err(e: types::PublishError) -> rpc::RequestError {
    match e {
        types::PublishError::Denied(m) => rpc::RequestError::Denied(m),
        types::PublishError::Limit(m) => rpc::RequestError::Limit(m),
        types::PublishError::Invalid(m) => rpc::RequestError::Invalid(m),
    }
}

fn reply_err(e: types::PublishError) -> rpc::ReplyError {
    match e {
        types::PublishError::Denied(m) => rpc::ReplyError::Denied(m),
        types::PublishError::Limit(m) => rpc::ReplyError::Limit(m),
        types::PublishError::Invalid(m) => rpc::ReplyError::Invalid(m),
    }
}

impl HostState {
    fn refuse_request(&mut self, err: rpc::RequestError) -> Result<types::EventResult, rpc::RequestError> {
        let why = match &err {
            rpc::RequestError::Denied(m)
            | rpc::RequestError::Limit(m)
            | rpc::RequestError::Invalid(m)
            | rpc::RequestError::Timeout(m)
            | rpc::RequestError::NoResponders(m)
            | rpc::RequestError::Unavailable(m) => m,
        };
        self.log_refusal("request", &why.clone());
        Err(err)
    }

    fn refuse_reply(&mut self, err: rpc::ReplyError) -> Result<(), rpc::ReplyError> {
        let (rpc::ReplyError::Denied(why) | rpc::ReplyError::Limit(why) | rpc::ReplyError::Invalid(why)) = &err;
        self.log_refusal("reply", &why.clone());
        Err(err)
    }
}

impl rpc::Host for HostState {
    async fn request(
        &mut self,
        subject: String,
        data: Vec<u8>,
        headers: Vec<(String, String)>,
        timeout_ms: u64,
    ) -> Result<types::EventResult, rpc::RequestError> {
        if self.outbound.offline {
            return self.refuse_request(rpc::RequestError::Unavailable(
                "requests are off in a repeatable run (plugbus test, dlq debug): nothing leaves the sandbox".into(),
            ));
        }
        if let Err(e) = check_subject(self, &subject) {
            return self.refuse_request(request_err(e));
        }
        let limits = &self.plugin.limits;
        if self.requests >= limits.max_requests {
            let msg = format!("request limit of {} per event reached", limits.max_requests);
            return self.refuse_request(rpc::RequestError::Limit(msg));
        }
        let header_bytes = match check_headers(limits, &headers) {
            Ok(bytes) => bytes,
            Err(e) => return self.refuse_request(request_err(e)),
        };
        // A request's bytes count in the event's output budget, as a publish's do (the host's
        // mark of its chain too).
        let chain = crate::rpc::asked_through(self.asked_through.as_deref(), &self.plugin.name);
        let chain_bytes = (crate::rpc::ASKED_THROUGH.len() + chain.len()) as u64 + ENTRY_COST;
        let size = (subject.len() + data.len()) as u64 + ENTRY_COST + header_bytes + chain_bytes;
        if self.output_bytes + size > limits.max_output_bytes {
            let msg =
                format!("output limit of {} bytes per event reached (requests count in it)", limits.max_output_bytes);
            return self.refuse_request(rpc::RequestError::Limit(msg));
        }
        self.output_bytes += size;
        self.requests += 1;
        let asked = std::time::Duration::from_millis(timeout_ms);
        let left = self.deadline_at().saturating_duration_since(Instant::now());
        let timeout = asked.min(left);
        let max_reply = limits.max_reply_bytes;
        let mut event = Output { subject: subject.clone(), data: data.into(), headers }
            .into_request(&self.event_id, &self.plugin.name);
        event.extensions.push((crate::rpc::ASKED_THROUGH.into(), chain));
        // The attempt's context, as its outputs carry it (the input's passed on when tracing is
        // off or the delivery unsampled), so the responder's spans join the requester's trace;
        // the plugin's own was dropped.
        crate::telemetry::set_context(&mut event, self.request_context.as_ref());
        let request_id = event.id.clone();
        tracing::debug!(plugin = %self.plugin.name, event_id = %self.event_id, request = %subject, request_id = %request_id,
            timeout_ms = timeout.as_millis() as u64, "request sent");
        let requester = self.plugin.requester.clone();
        let answer = if timeout.is_zero() {
            Err(crate::rpc::RequestError::Timeout { subject: subject.clone(), after: timeout })
        } else {
            requester.request(event, timeout).await
        };
        let reply = match answer {
            Ok(reply) => reply,
            Err(e) => {
                let text = match (&e, timeout < asked) {
                    (crate::rpc::RequestError::Timeout { .. }, true) => format!(
                        "{e} (the timeout asked, {}, was cut to what was left of the event's deadline of {})",
                        humantime::format_duration(asked),
                        humantime::format_duration(self.plugin.limits.deadline)
                    ),
                    _ => e.to_string(),
                };
                let err = match e {
                    crate::rpc::RequestError::Timeout { .. } => rpc::RequestError::Timeout(text),
                    crate::rpc::RequestError::NoResponders(_) => rpc::RequestError::NoResponders(text),
                    // Not marked as the host's failure: a request the bus does not carry may be
                    // the handler's doing (over the server's max_payload, its own share of the
                    // target's buffer full, a responder's invalid reply).
                    crate::rpc::RequestError::Unavailable(_) => rpc::RequestError::Unavailable(cut(&text).into_owned()),
                    // The broker's failure: the attempt's, should it fail, is the host's (as a
                    // kv read the store failed).
                    crate::rpc::RequestError::Broker(_) => {
                        if self.host_failed.is_none() {
                            let why = format!("the broker failed a request: {text}");
                            tracing::warn!(plugin = %self.plugin.name, event_id = %self.event_id, subject = %self.subject, "{why}");
                            self.host_failed = Some(cut(&why).into_owned());
                        }
                        rpc::RequestError::Unavailable(cut(&text).into_owned())
                    }
                };
                return self.refuse_request(err);
            }
        };
        let reply_bytes =
            reply.data.len() as u64 + reply.extensions.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
        if reply_bytes > max_reply {
            return self.refuse_request(rpc::RequestError::Limit(format!(
                "the reply on {} is {reply_bytes} bytes, over max_reply_bytes ({max_reply})",
                quoted(&subject)
            )));
        }
        Ok(types::EventResult {
            id: reply.id,
            source: reply.source,
            type_: reply.ty,
            subject,
            time: reply.time,
            datacontenttype: reply.datacontenttype,
            extensions: reply.extensions,
            data: reply.data.to_vec(),
            attempt: 1,
            reply_to: None,
        })
    }

    fn reply(
        &mut self,
        reply_to: String,
        data: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), rpc::ReplyError> {
        match &self.reply_token {
            None => {
                return self.refuse_reply(rpc::ReplyError::Denied(
                    "the event being handled has no reply-to: nobody asked for a reply".into(),
                ));
            }
            Some(token) if *token != reply_to => {
                return self.refuse_reply(rpc::ReplyError::Denied(format!(
                    "{} is not the reply-to of the event being handled (a reply goes only to the request \
                     this attempt handles)",
                    quoted(&reply_to)
                )));
            }
            Some(_) => {}
        }
        if self.reply.is_some() {
            return self
                .refuse_reply(rpc::ReplyError::Limit("this attempt already replied (one reply per event)".into()));
        }
        let header_bytes = match check_headers(&self.plugin.limits, &headers) {
            Ok(bytes) => bytes,
            Err(e) => return self.refuse_reply(reply_err(e)),
        };
        let size = data.len() as u64 + ENTRY_COST + header_bytes;
        let limit = self.plugin.limits.max_output_bytes;
        if self.output_bytes + size > limit {
            let msg = format!("output limit of {limit} bytes per event reached (the reply counts in it)");
            return self.refuse_reply(rpc::ReplyError::Limit(msg));
        }
        self.output_bytes += size;
        self.reply = Some(Output { subject: self.subject.clone(), data: data.into(), headers });
        Ok(())
    }
}

impl HostState {
    fn check_kv_size(&self, key: &str, value: usize) -> Result<(), types::KvError> {
        if key.len() > super::limits::MAX_KV_KEY_BYTES {
            return Err(types::KvError::TooLarge(format!(
                "kv key {:?}: {} bytes over the {}-byte cap on keys",
                crate::event::cut_to(key, 64),
                key.len(),
                super::limits::MAX_KV_KEY_BYTES
            )));
        }
        let cap = self.plugin.limits.max_kv_value_bytes;
        if key.len() as u64 > cap || value as u64 > cap {
            return Err(types::KvError::TooLarge(format!(
                "key {}: {} bytes over the {cap}-byte cap",
                quoted(key),
                key.len().max(value)
            )));
        }
        Ok(())
    }

    /// Refuses a write (`value`: `None` for a delete) that would take this attempt's
    /// transaction past `max_kv_writes` keys or `max_kv_write_bytes`.
    fn check_kv_write(&self, key: &str, value: Option<usize>) -> Result<(), types::KvError> {
        self.check_kv_size(key, value.unwrap_or(0))?;
        let limits = &self.plugin.limits;
        if !self.txn.writes.contains_key(key) && self.txn.writes.len() as u64 >= u64::from(limits.max_kv_writes) {
            return Err(types::KvError::TooLarge(format!(
                "kv write limit of {} keys per event reached (key {})",
                limits.max_kv_writes,
                quoted(key)
            )));
        }
        self.check_kv_held(self.txn.held_after_write(key, value))
    }

    fn check_kv_held(&self, held: u64) -> Result<(), types::KvError> {
        let cap = self.plugin.limits.max_kv_write_bytes;
        if held > cap {
            return Err(types::KvError::TooLarge(format!(
                "kv limit of {cap} bytes per event reached (keys and values written and keys read, \
                 {ENTRY_COST} bytes more per key)"
            )));
        }
        Ok(())
    }
}

/// What the guest is told when the kv store fails one of its reads: not the store's own words
/// (they name the host's files, buckets and servers); those go to the host's log and the
/// attempt's failure ([`HostState::host_failed`]).
const KV_UNAVAILABLE: &str = "the kv store is unavailable (the host's log says why)";

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, types::KvError> {
        self.check_kv_size(&key, 0)?;
        // Every read the store answers counts, a key read again too: counting keys only let a
        // handler read one large value in a loop until its deadline.
        let read_bytes_cap = self.plugin.limits.max_kv_read_bytes;
        let read_bytes_reached = |key: &str| {
            types::KvError::TooLarge(format!(
                "kv read limit of {read_bytes_cap} bytes per event reached (key {}; values read from the store, \
                 a key read again is read again)",
                quoted(key)
            ))
        };
        let from_store = !self.txn.writes.contains_key(&key);
        if from_store {
            let limits = &self.plugin.limits;
            if self.kv_reads >= limits.max_kv_reads {
                return Err(types::KvError::TooLarge(format!(
                    "kv read limit of {} reads per event reached (key {}; a key read again is read again)",
                    limits.max_kv_reads,
                    quoted(&key)
                )));
            }
            // Counted as the store answers: one read may take it past the cap (by at most
            // `max_kv_value_bytes`), and that read's value is refused; none is read after it.
            if self.txn.read_bytes() > read_bytes_cap {
                return Err(read_bytes_reached(&key));
            }
            self.kv_reads += 1;
        }
        if self.txn.would_read(&key) {
            self.check_kv_held(self.txn.held_bytes() + key.len() as u64 + ENTRY_COST)?;
        }
        let fresh = self.txn.would_read(&key);
        let store = self.plugin.kv.clone();
        // The store's wait is the host's, never the handler's: a read still waiting when the
        // call is dropped at the deadline fails the attempt as a host error.
        self.waiting_on_host = Some(format!("the kv store did not answer a read of key {}", quoted(&key)));
        let value = self.txn.get(&*store, &self.plugin.name, &key).await;
        self.waiting_on_host = None;
        let value = match value {
            Ok(value) => value,
            Err(e) => {
                // Logged once per attempt (the first failure is the attempt's): a handler that
                // reads on through a failing store makes up to `max_kv_reads` of them.
                if self.host_failed.is_none() {
                    let why = format!("the kv store failed a read of key {}: {e}", quoted(&key));
                    tracing::warn!(plugin = %self.plugin.name, event_id = %self.event_id, subject = %self.subject, "{why}");
                    self.host_failed = Some(cut(&why).into_owned());
                }
                return Err(types::KvError::Unavailable(KV_UNAVAILABLE.into()));
            }
        };
        if from_store && self.txn.read_bytes() > read_bytes_cap {
            return Err(read_bytes_reached(&key));
        }
        if fresh {
            let version = self.txn.reads.get(&key).copied().unwrap_or(0);
            self.seen.kv_read(&key, value.as_deref(), version);
        }
        Ok(value)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), types::KvError> {
        self.check_kv_write(&key, Some(value.len()))?;
        self.txn.set(&key, value);
        Ok(())
    }

    fn delete(&mut self, key: String) -> Result<(), types::KvError> {
        self.check_kv_write(&key, None)?;
        self.txn.delete(&key);
        Ok(())
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        let value = self.plugin.config.get(&key).cloned();
        self.seen.config_read(&key, value.as_deref());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::rpc::ASKED_THROUGH;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Keeps the requests a plugin sends, and answers each with an empty reply.
    #[derive(Default)]
    struct Recording(Mutex<Vec<Event>>);

    #[async_trait::async_trait]
    impl crate::rpc::Requester for Recording {
        async fn request(&self, event: Event, _timeout: Duration) -> Result<Event, crate::rpc::RequestError> {
            self.0.lock().unwrap().push(event);
            Ok(Event::new("a.back", ""))
        }
    }

    /// Plugin `q`, publishing to `a.>`, whose requests go to `requester`.
    fn asking_through(requester: Arc<dyn crate::rpc::Requester>) -> Arc<PluginCtx> {
        Arc::new(PluginCtx {
            name: "q".into(),
            limits: Limits::default(),
            publishes: PatternSet::parse(&["a.>"]).unwrap(),
            config: Default::default(),
            kv: Arc::new(crate::kv::MemoryKv::new()),
            outbound: Arc::new(OutboundPolicy::none()),
            requester,
            runnable: Default::default(),
            share: super::super::cpu_share::CpuShares::new(1).plugin("q"),
        })
    }

    /// A plugin's request carries on the chain of the request it runs, itself last (so a chain
    /// that comes back through a plugin is known there); run on an event that is not a request,
    /// its request starts a chain, whatever header the event carries.
    #[tokio::test]
    async fn a_request_carries_on_the_chain_of_the_request_the_plugin_runs() {
        let sent = Arc::new(Recording::default());
        let ctx = asking_through(sent.clone());
        let ask_back = async |event: &Event| {
            let mut state = HostState::new(ctx.clone(), &event.id, &event.subject);
            state.set_from_event(event);
            rpc::Host::request(&mut state, "a.back".into(), Vec::new(), Vec::new(), 1000).await.unwrap();
        };
        let mut asked = Event::new("q.run", "");
        asked.reply_to = Some("slot-1".into());
        asked.extensions.push((ASKED_THROUGH.into(), "p".into()));
        ask_back(&asked).await;
        asked.reply_to = None;
        ask_back(&asked).await;
        let sent = sent.0.lock().unwrap();
        assert_eq!(sent[0].header(ASKED_THROUGH), Some("p,q"));
        assert_eq!(sent[1].header(ASKED_THROUGH), Some("q"));
    }

    /// Fails every request as the broker does when it is not connected.
    struct Disconnected;

    #[async_trait::async_trait]
    impl crate::rpc::Requester for Disconnected {
        async fn request(&self, event: Event, _timeout: Duration) -> Result<Event, crate::rpc::RequestError> {
            Err(crate::rpc::RequestError::Broker(format!(
                "not connected to NATS: a request on {} cannot go out",
                event.subject
            )))
        }
    }

    /// Review 60d M2: a request the broker failed (disconnected) was the handler's failure: the
    /// guest still sees `unavailable`, and the attempt, should it fail, is the host's.
    #[tokio::test]
    async fn a_request_the_broker_failed_makes_a_failed_attempt_the_hosts() {
        let ctx = asking_through(Arc::new(Disconnected));
        let mut state = HostState::new(ctx, "e1", "q.run");
        let answer = rpc::Host::request(&mut state, "a.back".into(), Vec::new(), Vec::new(), 1000).await;
        let Err(rpc::RequestError::Unavailable(seen)) = answer else { panic!("not unavailable to the guest") };
        assert!(seen.contains("not connected"), "{seen}");
        let why = state.host_failed.as_deref().unwrap_or_default();
        assert!(why.contains("the broker failed a request"), "{why:?}");
    }

    #[test]
    fn a_chain_names_each_plugin_once_and_a_bounded_number() {
        assert_eq!(crate::rpc::asked_through(None, "a"), "a");
        assert_eq!(crate::rpc::asked_through(Some("a,b"), "c"), "a,b,c");
        // A chain that comes back through a plugin names it once, last.
        assert_eq!(crate::rpc::asked_through(Some("a,b,a"), "a"), "b,a");
        // What is not a plugin name (a request from NATS carries what its publisher wrote).
        let forged = format!("a,,b c,{},é,b", "x".repeat(65));
        assert_eq!(crate::rpc::asked_through(Some(&forged), "q"), "a,b,q");
        let long: Vec<String> = (0..100).map(|i| format!("p{i}")).collect();
        let chain = crate::rpc::asked_through(Some(&long.join(",")), "q");
        assert_eq!(chain.split(',').count(), 64);
        assert!(chain.starts_with("p0,p1,") && chain.ends_with(",p62,q"), "{chain}");
    }
}
