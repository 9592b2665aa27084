//! A guest's timers (`wasi:clocks/monotonic-clock`'s `subscribe-duration` and
//! `subscribe-instant`, what a sleep or a poll with a timeout is made of) know when they are due,
//! so the time an attempt waited past that for the runtime to notice the timer and give it a CPU
//! again is credited to it like a wait for a CPU (`cpu_wait::CpuWait::timer_was_due`), not
//! counted against its deadline (review 61a F2). With other plugins' attempts running guest code
//! on every worker, the runtime looks at its timers only every few of their slices: a handler
//! making 300 naps of 1 ms missed a 1 s deadline behind 16 spinning attempts of another plugin
//! (with them, and epoch ticks of a millisecond, each took 3.7 ms: `engine::EPOCH_TICK`).
//! wasmtime-wasi's own subscriptions are shadowed here by ones that behave the same (a zero
//! duration yields once, one too far to represent never ends).

use super::state::{HostState, PluginCtx};
use std::sync::Arc;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host as _;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

/// The `wasi:clocks/monotonic-clock` instance wasmtime-wasi defines (a guest's older 0.2 import
/// is linked to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Shadows the monotonic clock's subscriptions in `linker` (which has WASI) with timers that
/// credit their attempt the wait past their due time.
pub(super) fn credit_late_timers(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |mut store, (nanos,): (u64,)| {
        Ok((nap(store.data_mut(), std::time::Duration::from_nanos(nanos))?,))
    })?;
    clock.func_wrap("subscribe-instant", |mut store, (when,): (u64,)| {
        let state = store.data_mut();
        // the attempt's own clock: a fixed one in `plugbus test` (`world`)
        let now = state.clocks().now()?;
        Ok((nap(state, std::time::Duration::from_nanos(when.saturating_sub(now)))?,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// A timer of the attempt in `state`, `wait` from now, as a pollable.
fn nap(state: &mut HostState, wait: std::time::Duration) -> wasmtime::Result<Resource<DynPollable>> {
    let timer = if wait.is_zero() {
        Timer::Past { yielded: false }
    } else if let Some(due) = tokio::time::Instant::now().checked_add(wait) {
        Timer::Due { due, credit_to: state.cpu_wait.clone(), plugin: state.plugin.clone() }
    } else {
        // too far to represent: wait forever rather than trap (as wasmtime-wasi does)
        Timer::Never
    };
    let table = state.ctx().table;
    let timer = table.push(timer)?;
    subscribe(table, timer)
}

enum Timer {
    /// Due at once: the first wait yields to the runtime once (a guest polling in a loop with
    /// a zero timeout must not keep the runtime from its sockets), later ones do not.
    Past {
        yielded: bool,
    },
    Due {
        due: tokio::time::Instant,
        credit_to: Arc<super::cpu_wait::CpuWait>,
        plugin: Arc<PluginCtx>,
    },
    Never,
}

#[async_trait::async_trait]
impl Pollable for Timer {
    async fn ready(&mut self) {
        match self {
            Timer::Past { yielded: true } => {}
            Timer::Past { yielded } => {
                *yielded = true;
                tokio::task::yield_now().await
            }
            Timer::Due { due, credit_to, plugin } => {
                let asked = std::time::Instant::now();
                tokio::time::sleep_until(*due).await;
                credit_to.timer_was_due(due.into_std(), asked, plugin.runnable.others_share());
            }
            Timer::Never => std::future::pending().await,
        }
    }
}
