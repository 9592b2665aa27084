//! Under systemd (`Type=notify`): the host says READY=1 once its plugins are loaded and the
//! transport is connected, with a status line; pings the watchdog when `WATCHDOG_USEC` asks;
//! says STOPPING=1 at SIGTERM. The test plays systemd's part with a datagram socket.

use plugbus_tests::Running;
use plugbus_tests::{plugbus_bin, wasm};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// The next message from the host that contains `what`, within 60 s.
fn next_with(socket: &UnixDatagram, what: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            seen.push(msg.clone());
            if msg.contains(what) {
                return msg;
            }
        }
    }
    panic!("no message with {what} within 60 s; got {seen:?}");
}

#[test]
fn the_host_tells_systemd_it_is_ready_pings_the_watchdog_and_says_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(wasm("echo"), plugins.join("echo.wasm")).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    // systemd names the pid the watchdog is for: the shell's pid is the host's after `exec`.
    let child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(plugbus_bin())
        .args(["run", "--http", "127.0.0.1:0", "--plugins"])
        .arg(&plugins)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Running(child);
    let mut seen = Vec::new();
    let ready = next_with(&socket, "READY=1", &mut seen);
    assert!(ready.contains("STATUS=serving 1 plugins on the embedded bus (connected)"), "{ready}");
    let ping = next_with(&socket, "WATCHDOG=1", &mut seen);
    assert!(ping.contains("STATUS=serving 1 plugins"), "{ping}");
    next_with(&socket, "WATCHDOG=1", &mut seen);
    unsafe { libc_kill(child.0.id() as i32, 15) };
    next_with(&socket, "STOPPING=1", &mut seen);
}

/// A plugins folder that takes long to load (a file whose compile runs to
/// `sandbox.compile_timeout` of CPU, up to 120 s, past systemd's default 90 s to start): while it
/// loads, the host asks systemd for more time every 5 s (`EXTEND_TIMEOUT_USEC`), so the start is
/// not killed as one that hangs, then says READY=1.
#[test]
fn a_slow_start_asks_systemd_for_more_time_until_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(wasm("echo"), plugins.join("echo.wasm")).unwrap();
    // 23 s to compile in the debug build, stopped at 12 s: at least 12 s of loading.
    std::fs::write(plugins.join("slow.wasm"), plugbus_tests::slow_to_compile(100_000)).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let child = Command::new(plugbus_bin())
        .args(["run", "--http", "127.0.0.1:0", "--plugins"])
        .arg(&plugins)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("PLUGBUS_SANDBOX__COMPILE_TIMEOUT", "12s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Running(child);
    let mut seen = Vec::new();
    let ready = next_with(&socket, "READY=1", &mut seen);
    assert!(ready.contains("STATUS=serving 1 plugins"), "{ready}");
    let extends: Vec<&String> = seen.iter().filter(|m| m.contains("EXTEND_TIMEOUT_USEC=30000000")).collect();
    assert!(extends.len() >= 3, "asked for more time {} times in 12 s or more of loading: {seen:?}", extends.len());
    assert!(extends.iter().all(|m| m.contains("STATUS=loading plugins")), "{seen:?}");
}
