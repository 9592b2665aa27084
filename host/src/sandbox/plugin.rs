//! A loaded plugin: its pre-linked component and manifest; runs one attempt per call.

use super::bindings::{self, types as wit};
use super::code_budget::CodeCharge;
use super::guest_stack::{self, GuestStack};
use super::limits::{InstanceMode, Limits, MAX_RESOURCES};
use super::pool::{POOL_WAIT_MAX, SharedPool, SlotWait, Warm, WarmList};
use super::record::Seen;
use super::state::{HostState, PluginCtx};
use super::world::FixedWorld;
use crate::event::{ECHO_BYTES, Event, Output, cut, cut_to, one_line_cut};
use crate::kv::{KvError, KvStore, Txn};
use crate::manifest::Manifest;
use crate::telemetry;
use futures::FutureExt;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};

/// What the operator set for one plugin.
pub struct PluginSettings {
    /// Its limits.
    pub limits: Limits,
    /// Values for the `config` import.
    pub config: HashMap<String, String>,
    /// Its kv store.
    pub kv: Arc<dyn KvStore>,
    /// The outbound HTTP destinations the operator grants it (`allowed_outbound`).
    pub allowed_outbound: Vec<String>,
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The handler asked to be retried.
    Retry(String),
    /// The handler rejected the event (poison).
    Reject(String),
    /// The instance trapped, panicked, ran out of time or memory: retried like `Retry`.
    Trap(String),
    /// The host failed the attempt, not the handler: a host function panicked, every slot of
    /// the instance pool plugins share stayed taken, or a host call the handler waited in did
    /// not answer within its deadline. Retried like `Trap`; its message reads `host error: …`.
    Host(String),
}

impl Failure {
    /// The message for logs and dead letters.
    pub fn message(&self) -> &str {
        match self {
            Failure::Retry(m) | Failure::Reject(m) | Failure::Trap(m) | Failure::Host(m) => m,
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Failure::Reject(_))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Retry(m) => write!(f, "handler asked to retry: {m}"),
            Failure::Reject(m) => write!(f, "handler rejected the event: {m}"),
            Failure::Trap(m) => write!(f, "{m}"),
            Failure::Host(m) => write!(f, "host error: {m}"),
        }
    }
}

/// The result of one attempt.
pub struct Attempt {
    /// Ok, or why not.
    pub result: Result<(), Failure>,
    /// What the handler published (to release only on Ok).
    pub outputs: Vec<Output>,
    /// Its kv reads and writes (to commit only on Ok).
    pub txn: Txn,
    /// How long the attempt took, instantiation included.
    pub elapsed: Duration,
    /// What it read and logged (bounded): kept when it failed, or ran in a fixed world.
    pub seen: Option<Box<Seen>>,
    /// Its reply to the event (a request), to release with the outputs only on Ok.
    pub reply: Option<Output>,
    /// The longest `retry_after` of the calls an open circuit breaker refused during the
    /// attempt (`None`: no call was refused for an open circuit).
    pub circuit_open: Option<Duration>,
    /// Calls it made that leave the sandbox outside its kv transaction: outbound HTTP calls
    /// (those the policy or an open breaker refused aside) and requests. An attempt that made
    /// any is not re-run in place after a kv conflict (each run would make them again, under
    /// fresh per-attempt limits).
    pub calls_out: u32,
    /// The requests among them (an open breaker's wait runs again uncharged only an attempt
    /// that sent none: `fate::Circuit::requests_out`).
    pub requests_out: u32,
}

/// A validated, pre-linked plugin, ready to run events.
pub struct Plugin {
    engine: Engine,
    /// Keeps the epoch ticker running while any plugin lives (deadlines depend on it).
    _ticker: Arc<dyn std::any::Any + Send + Sync>,
    pre: bindings::PluginPre<HostState>,
    manifest: Manifest,
    hash: String,
    ctx: Arc<PluginCtx>,
    /// Idle instances (`instance = "reuse"` only), known to `pool`.
    warm: Arc<WarmList>,
    /// The instance pool all plugins share: every plugin's idle instances (one is dropped when
    /// the pool is full) and its waits.
    pool: Arc<SharedPool>,
    /// Where the guest keeps its own stack, when known (to name its overflow).
    stack: Option<GuestStack>,
    /// Its compiled code's share of `sandbox.max_code_mib`, given back when the last handle
    /// of this version (a rebound one's too) goes.
    code: Arc<CodeCharge>,
}

/// The longest failure text the sandbox reports: a message built around at most two echoed
/// pieces, each cut at [`crate::event::ECHO_BYTES`].
const MAX_FAILURE_BYTES: usize = crate::deadletter::MAX_ERROR_BYTES - 128;

/// How long past its deadline an attempt may still be in a call before the call is dropped. The
/// epoch tick interrupts running wasm at the deadline; this catches a guest waiting in a host
/// call (a sleep, a pollable that never fires), which no tick reaches.
pub(super) const DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// Runs `call` (which uses `store`) until it ends or the attempt's deadline, plus the grace,
/// has passed (the deadline later by what the attempt waited for a CPU behind other plugins'
/// attempts, up to `cpu_wait::WALL_FACTOR` times it: see `cpu_wait`). Then the call is dropped
/// mid-way, `store` is marked as having hit its deadline, and the answer is that trap: the store
/// must not run anything again. With `handle_follows` (an instantiation), a turn of the plugin's
/// share of the CPUs held at the end is kept for the handler's call (`cpu_share`): the attempt
/// does not wait in line twice.
async fn within_deadline<T>(
    store: &mut Store<HostState>,
    handle_follows: bool,
    call: impl AsyncFnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
) -> wasmtime::Result<T> {
    let state = store.data();
    let (started, deadline, wait, plugin) =
        (state.started, state.plugin.limits.deadline, state.cpu_wait.clone(), state.plugin.clone());
    let limit = || super::cpu_wait::deadline_at(started, deadline, wait.credited()) + DEADLINE_GRACE;
    let ended = {
        let mut call = std::pin::pin!(call(store));
        let mut running = super::cpu_wait::Running::new(&wait, &plugin.runnable, &plugin.share);
        if handle_follows {
            running.keep_turn_at_end();
        }
        let mut run = std::pin::pin!(std::future::poll_fn(|cx| running.poll(call.as_mut(), cx)));
        loop {
            match tokio::time::timeout_at(limit().into(), run.as_mut()).await {
                Ok(done) => break Ok(done),
                // credited more while it ran: the deadline moved
                Err(_) if Instant::now() < limit() => continue,
                Err(_) => break Err(wait.in_line()),
            }
        }
    };
    match ended {
        Ok(done) => done,
        Err(in_line) => {
            let elapsed = started.elapsed();
            let state = store.data_mut();
            state.deadline_hit = true;
            if in_line {
                // past a host call that answered, it waited for a turn of its plugin's share of
                // the CPUs, not for the host (review 58c H2)
                state.waiting_on_host = None;
            }
            if super::cpu_wait::over(elapsed, deadline, wait.credited()) == Some(false) {
                state.starved = Some(starved(elapsed, deadline, wait.credited()));
            }
            Err(wasmtime::Error::msg("the deadline passed while the handler waited in a host call"))
        }
    }
}

/// What an attempt the wall-clock bound ended says (`cpu_wait`).
fn starved(elapsed: Duration, deadline: Duration, credited: Duration) -> String {
    let ms = |d: Duration| format!("{} ms", d.as_millis());
    format!(
        "{}: it ran {} of its deadline of {} in {} of wall time, the most an attempt may take ({} times its deadline)",
        super::cpu_wait::STARVED,
        ms(elapsed.saturating_sub(credited)),
        humantime::format_duration(deadline),
        ms(elapsed),
        super::cpu_wait::WALL_FACTOR
    )
}

/// Installs the memory limiter, the per-call copy limit (hostcall fuel), the handle cap and the
/// deadline on a fresh store.
pub(super) fn arm_store(store: &mut Store<HostState>) {
    store.limiter(|s| &mut s.limiter);
    let fuel = store.data().plugin.limits.hostcall_bytes();
    store.set_hostcall_fuel(fuel);
    store.set_max_component_handles(MAX_RESOURCES);
    // Every epoch tick (see `engine::EPOCH_TICK`) the running guest yields to the async runtime,
    // so a looping plugin never starves others, and traps once its deadline has passed.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut cx| {
        let state = cx.data_mut();
        let deadline = state.plugin.limits.deadline;
        let (elapsed, credited) = (state.started.elapsed(), state.cpu_wait.credited());
        if let Some(handlers) = super::cpu_wait::over(elapsed, deadline, credited) {
            state.deadline_hit = true;
            if !handlers {
                state.starved = Some(starved(elapsed, deadline, credited));
            }
            return Err(wasmtime::Error::msg(format!("deadline of {} exceeded", humantime::format_duration(deadline))));
        }
        // From its first tick on it runs guest code only holding a turn of its plugin's share of
        // the CPUs (`cpu_share`, asked for in `within_deadline`'s `Running`); one held over its
        // quota while others want the CPUs is given back here, and it yields.
        if state.cpu_wait.just_polled() && state.cpu_wait.turn().holds() {
            // its slice started less than `cpu_wait::FRESH_SLICE` ago (a tick that passed while
            // it waited, or one of the ticks of a millisecond since): it runs on, its turn kept
            // (review 62e: giving it back first cut slices to a millisecond); without a turn it
            // yields, to ask for one before it runs on
            return Ok(UpdateDeadline::Continue(1));
        }
        state.plugin.share.at_tick(state.cpu_wait.turn());
        state.cpu_wait.yielded(state.plugin.runnable.others_share());
        Ok(UpdateDeadline::Yield(1))
    });
}

impl Plugin {
    pub(super) fn new(
        ticker: Arc<dyn std::any::Any + Send + Sync>,
        pre: bindings::PluginPre<HostState>,
        code: CodeCharge,
        manifest: Manifest,
        hash: String,
        ctx: Arc<PluginCtx>,
        pool: Arc<SharedPool>,
    ) -> Self {
        let warm = pool.register();
        let engine = pre.engine().clone();
        Self { engine, _ticker: ticker, pre, code: Arc::new(code), manifest, hash, ctx, warm, pool, stack: None }
    }

    /// Records where the guest keeps its stack (read from its bytes at load).
    pub(super) fn with_guest_stack(mut self, stack: Option<GuestStack>) -> Self {
        self.stack = stack;
        self
    }

    /// The plugin's name (its identity).
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// The bytes of its compiled code held in memory (counted in `sandbox.max_code_mib`).
    pub fn code_bytes(&self) -> u64 {
        self.code.bytes()
    }

    /// Its validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether its manifest's `publishes` matches `subject` (the patterns parsed at load).
    pub fn publishes_to(&self, subject: &str) -> bool {
        self.ctx.publishes.matches(subject)
    }

    /// SHA-256 of the component bytes, hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// What it may call over HTTP: requested by its manifest and granted by the operator.
    pub fn outbound(&self) -> &super::outbound::OutboundPolicy {
        &self.ctx.outbound
    }

    /// Its effective limits.
    pub fn limits(&self) -> &Limits {
        &self.ctx.limits
    }

    /// The same compiled version with other `config` values and another kv store, running
    /// every event in a fresh instance (a dead letter's debug run: recorded reads fed back,
    /// nothing reaching the plugin's real kv).
    pub fn rebound(&self, config: HashMap<String, String>, kv: Arc<dyn KvStore>) -> Plugin {
        let ctx = PluginCtx {
            name: self.ctx.name.clone(),
            limits: Limits { instance: InstanceMode::Fresh, ..self.ctx.limits.clone() },
            publishes: self.ctx.publishes.clone(),
            config,
            kv,
            // The same grants; a repeatable (fixed-world) run refuses every call anyway.
            outbound: self.ctx.outbound.clone(),
            requester: self.ctx.requester.clone(),
            runnable: super::cpu_wait::Runnable::within(self.ctx.runnable.host()),
            share: self.ctx.share.another(),
        };
        Plugin {
            // Fresh instances only: it keeps none idle.
            warm: Arc::default(),
            pool: self.pool.clone(),
            ctx: Arc::new(ctx),
            pre: self.pre.clone(),
            manifest: self.manifest.clone(),
            hash: self.hash.clone(),
            engine: self.engine.clone(),
            _ticker: self._ticker.clone(),
            code: self.code.clone(),
            stack: self.stack,
        }
    }

    /// Commits an attempt's kv writes; a conflict means the attempt must run again.
    pub async fn commit(&self, txn: &Txn) -> Result<(), KvError> {
        self.commit_settling(txn, None).await
    }

    /// Like [`Plugin::commit`], with the attempt's outbox in the same transaction where the kv
    /// store can keep it.
    pub async fn commit_settling(&self, txn: &Txn, outbox: Option<crate::kv::Outbox>) -> Result<(), KvError> {
        if txn.is_empty() {
            // Nothing to write, but what it read must still be current (see `check_reads`).
            if txn.reads.is_empty() {
                return Ok(());
            }
            return self.ctx.kv.check_reads(&self.ctx.name, txn).await;
        }
        self.ctx.kv.commit_settling(&self.ctx.name, txn, outbox).await
    }

    /// Runs one attempt of `event`: in a fresh instance, or with `instance = "reuse"` in a warm one.
    ///
    /// Never unwinds: a host function that panics (a bug in the host, or in a kv store) fails
    /// the attempt as a trap would (`host error: …`, retried), its store and instance dropped
    /// (a warm one is not put back), so an ordered lane or a worker is never wedged by it.
    ///
    /// (A plain function returning `handle_in`'s future: an `async fn` here would be one more
    /// level, whose kilobytes are copied whole at every attempt.)
    pub fn handle<'a>(&'a self, event: &'a Event, attempt: u32) -> impl Future<Output = Attempt> + 'a {
        self.handle_in(event, attempt, None)
    }

    /// Runs one attempt of `event` in a fresh instance whose clocks and random are fixed by
    /// `world` (whatever the plugin's instance mode): the same event gives the same attempt.
    pub fn handle_fixed<'a>(
        &'a self,
        event: &'a Event,
        attempt: u32,
        world: &'a FixedWorld,
    ) -> impl Future<Output = Attempt> + 'a {
        self.handle_in(event, attempt, Some(world))
    }

    async fn handle_in(&self, event: &Event, attempt: u32, world: Option<&FixedWorld>) -> Attempt {
        let started = Instant::now();
        let run = async {
            if self.ctx.limits.instance == InstanceMode::Reuse && world.is_none() {
                self.handle_warm(event, attempt).await
            } else {
                self.handle_fresh(event, attempt, world).await
            }
        };
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(attempt) => attempt,
            Err(panic) => {
                let what = crate::event::panic_text(&*panic, ECHO_BYTES);
                tracing::error!(plugin = %self.ctx.name, event_id = %event.id, subject = %event.subject, attempt,
                    "a host function panicked during the attempt; it fails as a trap would (not the handler's fault): {what}");
                Attempt {
                    result: Err(Failure::Host(format!("a host function panicked: {what}"))),
                    outputs: Vec::new(),
                    txn: Txn::default(),
                    elapsed: started.elapsed(),
                    seen: None,
                    reply: None,
                    circuit_open: None,
                    calls_out: 0,
                    requests_out: 0,
                }
            }
        }
    }

    /// A new armed store (its state from `state`) and an instance of the plugin in it. While
    /// every slot of the pool all plugins share is taken, it waits, with a new store each try (a
    /// failed instantiation keeps what it allocated until its store is dropped), up to
    /// [`POOL_WAIT_MAX`] or the plugin's deadline if longer; then it answers a host error. A
    /// full pool is the host's limit, reached by other plugins (say, one whose handlers sleep
    /// until their deadline in every slot): it must not fail this plugin's event as its
    /// handler's, nor eat its handler's time (its deadline counts from the store of the try that
    /// got a slot).
    async fn instantiate(
        &self,
        state: impl Fn() -> HostState,
    ) -> (Store<HostState>, wasmtime::Result<bindings::Plugin>) {
        let bound = self.ctx.limits.deadline.max(POOL_WAIT_MAX);
        let mut wait = SlotWait::until(super::limits::instant_after(Instant::now(), bound));
        loop {
            let mut store = Store::new(&self.engine, state());
            arm_store(&mut store);
            let made = within_deadline(&mut store, true, async |store| {
                self.pre.instantiate_async(store).instrument(telemetry::step_span("instantiate")).await
            })
            .await;
            match made {
                Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() => {
                    drop(store);
                    if !wait.again(&self.pool, || self.pool.count_wait(&self.ctx.name)).await {
                        let e = e.context(format!(
                            "every instance slot of the pool plugins share (sandbox.max_instances) stayed taken for {}",
                            humantime::format_duration(bound)
                        ));
                        return (Store::new(&self.engine, state()), Err(e));
                    }
                }
                // The handler's deadline counts from this try's store: a wait is not its time.
                made => return (store, made),
            }
        }
    }

    async fn handle_fresh(&self, event: &Event, attempt: u32, world: Option<&FixedWorld>) -> Attempt {
        let started = Instant::now();
        let (mut store, instance) = self
            .instantiate(|| {
                let mut state = HostState::in_world(self.ctx.clone(), &event.id, &event.subject, world);
                state.set_from_event(event);
                state
            })
            .await;
        let token = store.data().reply_token.clone();
        let call = match instance {
            Ok(instance) => {
                within_deadline(&mut store, false, async |store| {
                    let headers = header_refs(event);
                    let wit_event = to_wit(event, &headers, attempt, token.as_deref());
                    instance.plugbus_handler_handler().call_handle(store, wit_event).await
                })
                .await
            }
            Err(e) => Err(e),
        };
        let result = self.outcome(call, &mut store);
        let mut state = store.into_data();
        self.forward_stdio(&mut state);
        let ok = result.is_ok();
        let seen = (!ok || world.is_some()).then(|| Box::new(std::mem::take(&mut state.seen)));
        let (calls_out, requests_out) = (state.calls_out(), state.requests_out());
        Attempt {
            calls_out,
            requests_out,
            result,
            outputs: if ok { state.outputs } else { Vec::new() },
            txn: if ok { state.txn } else { Txn::default() },
            elapsed: started.elapsed(),
            seen,
            reply: if ok { state.reply } else { None },
            circuit_open: state.outbound.circuit_open,
        }
    }

    /// One attempt in a warm instance: taken from the idle list (or made), put back after the
    /// call unless it trapped or has served `recycle_after` events.
    async fn handle_warm(&self, event: &Event, attempt: u32) -> Attempt {
        let started = Instant::now();
        let idle = self.warm.take();
        let mut warm = match idle {
            Some(mut w) => {
                w.store.data_mut().reset_for(&event.id, &event.subject);
                w.store.set_epoch_deadline(1);
                w
            }
            None => {
                let (mut store, instantiated) =
                    self.instantiate(|| HostState::new(self.ctx.clone(), &event.id, &event.subject)).await;
                match instantiated {
                    Ok(instance) => Warm { store, instance, uses: 0 },
                    Err(e) => {
                        let failure = failure_of(&e, store.data(), None);
                        self.forward_stdio(store.data_mut());
                        return Attempt {
                            result: Err(failure),
                            outputs: Vec::new(),
                            txn: Txn::default(),
                            elapsed: started.elapsed(),
                            seen: Some(Box::new(std::mem::take(&mut store.data_mut().seen))),
                            reply: None,
                            circuit_open: None,
                            calls_out: 0,
                            requests_out: 0,
                        };
                    }
                }
            }
        };
        warm.store.data_mut().set_from_event(event);
        let token = warm.store.data().reply_token.clone();
        let headers = header_refs(event);
        let wit_event = to_wit(event, &headers, attempt, token.as_deref());
        let handler = warm.instance.plugbus_handler_handler();
        let call =
            within_deadline(&mut warm.store, false, async |store| handler.call_handle(store, wit_event).await).await;
        // A trap (or a call dropped at the deadline) leaves the instance unfit to run again.
        let trapped = call.is_err();
        let result = self.outcome(call, &mut warm.store);
        let state = warm.store.data_mut();
        self.forward_stdio(state);
        let ok = result.is_ok();
        let outputs = if ok { std::mem::take(&mut state.outputs) } else { Vec::new() };
        let txn = if ok { std::mem::take(&mut state.txn) } else { Txn::default() };
        let reply = if ok { state.reply.take() } else { None };
        // Taken either way: an idle warm instance holds no record.
        let seen = std::mem::take(&mut state.seen);
        let seen = (!ok).then(|| Box::new(seen));
        let circuit_open = state.outbound.circuit_open.take();
        let (calls_out, requests_out) = (state.calls_out(), state.requests_out());
        warm.uses += 1;
        if !trapped && warm.uses < self.ctx.limits.recycle_after {
            self.warm.put(warm);
        }
        Attempt { result, outputs, txn, elapsed: started.elapsed(), seen, reply, circuit_open, calls_out, requests_out }
    }

    fn outcome(
        &self,
        call: wasmtime::Result<Result<(), wit::HandlerError>>,
        store: &mut Store<HostState>,
    ) -> Result<(), Failure> {
        let overflow = match &call {
            Err(e) => self.guest_stack_overflowed(e, store),
            Ok(_) => None,
        };
        let state = store.data();
        match call {
            Ok(Ok(())) => match &state.refused {
                // A refused publish that the handler swallowed still fails the event: its
                // outputs are incomplete.
                Some(why) => Err(Failure::Reject(format!("publish refused: {}", cut_to(why, MAX_FAILURE_BYTES)))),
                None => Ok(()),
            },
            // A retry or a trap after a host call failed for the host (the SDK asks to retry when
            // the kv store fails; a handler may unwrap): the host's failure. A reject is the
            // handler's own choice.
            Ok(Err(wit::HandlerError::Retry(m))) if state.host_failed.is_some() => {
                Err(host_failed(state, &format!("asked to retry: {}", one_line_cut(&m, 512))))
            }
            Err(e) if state.host_failed.is_some() && !state.deadline_hit => {
                Err(host_failed(state, &format!("trapped: {}", cut_to(&describe_trap(&e, state, overflow), 512))))
            }
            // The handler's own words, cut to a few KiB: they go to logs and dead letters.
            Ok(Err(wit::HandlerError::Retry(m))) => Err(Failure::Retry(one_line_cut(&m, ECHO_BYTES))),
            Ok(Err(wit::HandlerError::Reject(m))) => Err(Failure::Reject(one_line_cut(&m, ECHO_BYTES))),
            Err(e) => Err(failure_of(&e, state, overflow)),
        }
    }

    /// The guest's own stack, when an out-of-bounds trap is it overflowing (see `guest_stack`):
    /// the faulting address, when wasmtime has one, is a pointer that went below 0; or the
    /// guest's stack pointer, read from the core dump wasmtime attaches to the trap, did.
    fn guest_stack_overflowed(&self, err: &wasmtime::Error, store: &mut Store<HostState>) -> Option<GuestStack> {
        let stack = self.stack?;
        if !matches!(err.downcast_ref::<Trap>(), Some(Trap::MemoryOutOfBounds)) {
            return None;
        }
        if guest_stack::fault_address(err).is_some_and(|a| stack.overflowed_at(a)) {
            return Some(stack);
        }
        let dump = err.downcast_ref::<wasmtime::WasmCoreDump>()?;
        let overflowed = dump.globals().iter().any(|g| {
            let ty = g.ty(&*store);
            ty.mutability() == wasmtime::Mutability::Var
                && matches!(ty.content(), wasmtime::ValType::I32)
                && g.get(&mut *store).i32().is_some_and(|sp| stack.pointer_overflowed(sp as u32))
        });
        overflowed.then_some(stack)
    }

    /// Writes the guest's stdout and stderr to the host log, and moves the lines into the
    /// attempt's record (`state.seen`).
    fn forward_stdio(&self, state: &mut HostState) {
        for (stream, capture) in [("stdout", state.stdout.clone()), ("stderr", state.stderr.clone())] {
            let (lines, dropped) = capture.take_lines();
            for line in &lines {
                let spanned = state.spans_line();
                crate::telemetry::plugin_line!(spanned, info, plugin = %self.ctx.name, event_id = %state.event_id,
                    subject = %state.subject, stream, "{line}");
            }
            if dropped > 0 {
                tracing::warn!(plugin = %self.ctx.name, event_id = %state.event_id, stream, dropped, "plugin output over the per-event cap was cut");
            }
            state.seen.output(stream == "stderr", lines, dropped);
        }
    }
}

/// The WIT view of `event`, borrowing its fields (`headers` is `event.extensions` as pairs of
/// `&str`, from [`header_refs`]); the canonical ABI copies them into guest memory once. Its
/// `reply-to` is `reply_token`, never the host's reply address.
fn to_wit<'a>(
    event: &'a Event,
    headers: &'a [(&'a str, &'a str)],
    attempt: u32,
    reply_token: Option<&'a str>,
) -> wit::EventParam<'a> {
    wit::EventParam {
        id: &event.id,
        source: &event.source,
        type_: &event.ty,
        subject: &event.subject,
        time: &event.time,
        datacontenttype: event.datacontenttype.as_deref(),
        extensions: headers,
        data: &event.data,
        attempt,
        reply_to: reply_token,
    }
}

/// `event.extensions` as borrowed pairs, for [`to_wit`].
fn header_refs(event: &Event) -> Vec<(&str, &str)> {
    event.extensions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Whose failure a failed instantiation or call is, and its cause in the words a user would
/// search for. `overflow`: the guest's own stack, when the trap is it overflowing.
/// The failure of an attempt whose handler `then` did something after a host call failed for
/// the host ([`HostState::host_failed`]).
fn host_failed(state: &HostState, then: &str) -> Failure {
    let why = state.host_failed.as_deref().unwrap_or_default();
    Failure::Host(cut(&format!("{why} (the handler then {then})")).into_owned())
}

fn failure_of(err: &wasmtime::Error, state: &HostState, overflow: Option<GuestStack>) -> Failure {
    // Ended by the wall-clock bound, other plugins' attempts holding the CPUs: the host's failure.
    if let Some(why) = &state.starved {
        return Failure::Host(why.clone());
    }
    // Dropped at the deadline while the host kept it waiting: the host's failure.
    if let (true, Some(why)) = (state.deadline_hit, &state.waiting_on_host) {
        let deadline = humantime::format_duration(state.plugin.limits.deadline);
        return Failure::Host(cut(&format!("{why} within the attempt's deadline of {deadline}")).into_owned());
    }
    // Other plugins held every slot of the shared pool past the wait (see `instantiate`).
    if err.is::<wasmtime::PoolConcurrencyLimitError>() {
        return Failure::Host(cut_to(&error_text(err), MAX_FAILURE_BYTES).into_owned());
    }
    Failure::Trap(describe_trap(err, state, overflow))
}

/// Names the cause of a trap in the words a user would search for.
fn describe_trap(err: &wasmtime::Error, state: &HostState, overflow: Option<GuestStack>) -> String {
    let limits = &state.plugin.limits;
    if state.deadline_hit {
        return format!("deadline of {} exceeded", humantime::format_duration(limits.deadline));
    }
    if state.limiter.breached {
        return format!("memory limit {} MiB reached", limits.memory_mib);
    }
    // wasmtime's `HostcallFuelExhausted` is private: known by its words, at the root of the chain.
    if err.chain().last().is_some_and(|e| e.to_string().contains("fuel allocated for hostcalls has been exhausted")) {
        return format!(
            "the handler passed more than {} bytes to the host in one call (the per-call copy limit, \
             from max_output_bytes / max_kv_value_bytes / max_log_bytes)",
            limits.hostcall_bytes()
        );
    }
    let table_full = |e: &(dyn std::error::Error + 'static)| {
        matches!(
            e.downcast_ref::<wasmtime::component::ResourceTableError>(),
            Some(wasmtime::component::ResourceTableError::Full)
        )
    };
    if err.chain().any(table_full) {
        return format!("the handler holds more than {MAX_RESOURCES} WASI resources (streams, pollables) at once");
    }
    // Rust's panic hook writes "thread '...' panicked at FILE:LINE:COL:" then the message.
    let lines = state.stderr.peek_lines();
    let panic = lines
        .iter()
        .position(|l| l.contains("panicked at"))
        .map(|i| {
            let at = lines[i].split("panicked at ").nth(1).unwrap_or_default().trim_end_matches(':');
            let msg = lines.get(i + 1).map(String::as_str).unwrap_or_default();
            format!(": {} (at {})", one_line_cut(msg, ECHO_BYTES), one_line_cut(at, ECHO_BYTES))
        })
        .unwrap_or_default();
    let text = match err.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => "stack overflow (wasm stack limit reached)".to_string(),
        Some(Trap::MemoryOutOfBounds) if overflow.is_some() => {
            let kib = overflow.map_or(0, |s| s.bytes / 1024);
            format!("stack overflow in the handler (its stack is {kib} KiB)")
        }
        Some(Trap::UnreachableCodeReached) if !panic.is_empty() => {
            format!("handler panicked{panic}")
        }
        Some(trap) => format!("trap: {trap}{panic}"),
        None => error_text(err),
    };
    cut_to(&text, MAX_FAILURE_BYTES).into_owned()
}

/// `err` and its causes, `: `-separated, without the wasm backtrace and core dump wasmtime
/// attaches to traps (they name no cause, and a core dump lists every module and global).
pub(super) fn error_text(err: &wasmtime::Error) -> String {
    // Context layers do not downcast as chain elements: known by their first words.
    const ATTACHMENTS: [&str; 2] = ["error while executing at wasm backtrace:", "wasm coredump generated while"];
    err.chain()
        .map(|e| e.to_string())
        .filter(|t| !ATTACHMENTS.iter().any(|a| t.starts_with(a)))
        .collect::<Vec<_>>()
        .join(": ")
}
