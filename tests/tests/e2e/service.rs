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
