//! Running under systemd (`Type=notify`): the host says when it is ready (plugins loaded, the
//! transport connected), keeps a status line current, pings the watchdog from the async runtime
//! (a wedged runtime stops pinging and systemd restarts the host) and says when it stops.
//! Without `NOTIFY_SOCKET` every call does nothing.

use crate::host::Host;
use sd_notify::NotifyState;
use std::time::Duration;

/// The status line: what serves and on which transport.
pub fn status(host: &Host) -> String {
    let plugins = host.router().names().len();
    let rejected = host.rejected().len();
    let transport = host.transport();
    let link = if transport.is_connected() { "connected" } else { "disconnected" };
    let mut line = format!("serving {plugins} plugins on the {} bus ({link})", transport.name());
    if rejected > 0 {
        line.push_str(&format!("; {rejected} files rejected"));
    }
    line
}

/// Tells systemd the host is ready (plugins loaded, transport connected), with its status.
pub fn ready(host: &Host) {
    let status = status(host);
    if let Err(e) = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(&status)]) {
        tracing::warn!("telling systemd the host is ready failed: {e}");
    }
}

/// How often [`loading`] asks for more start-up time, and how much each time.
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY: Duration = Duration::from_secs(30);

/// While the host loads its plugins (compiling one file may take up to
/// `sandbox.compile_timeout` of CPU, 120 s, and 4 times that of wall time, past systemd's
/// default 90 s to start), asks systemd every
/// 5 s for 30 s more (`EXTEND_TIMEOUT_USEC`), with the status `loading plugins`, for at most
/// `budget` (what loading can take: a start that hangs elsewhere is still killed). Until the
/// returned task is aborted; nothing without `NOTIFY_SOCKET`.
pub fn loading(budget: Duration) -> Option<tokio::task::JoinHandle<()>> {
    std::env::var_os("NOTIFY_SOCKET")?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXTEND_EVERY);
        let usec = u32::try_from(EXTEND_BY.as_micros()).unwrap_or(u32::MAX);
        let until = tokio::time::Instant::now() + budget;
        loop {
            tick.tick().await;
            if tokio::time::Instant::now() >= until {
                return;
            }
            let state = [NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status("loading plugins")];
            if let Err(e) = sd_notify::notify(false, &state) {
                tracing::warn!("asking systemd for more time to start failed: {e}");
            }
        }
    }))
}

/// Tells systemd the host is stopping (draining).
pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// When systemd asks for watchdog pings (`WatchdogSec=`), pings at half the interval from a task
/// on the runtime, with the status line; runs until the returned guard is dropped.
pub fn watchdog(host: &std::sync::Arc<Host>) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    let host = std::sync::Arc::downgrade(host);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(host) = host.upgrade() else { return };
            let status = status(&host);
            drop(host);
            if let Err(e) = sd_notify::notify(false, &[NotifyState::Watchdog, NotifyState::Status(&status)]) {
                tracing::warn!("the systemd watchdog ping failed: {e}");
            }
        }
    }))
}
