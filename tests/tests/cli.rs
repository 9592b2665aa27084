//! The `plugbus` binary as a user runs it: `plugbus run` in one terminal, `plugbus publish` in
//! another.

use plugbus_tests::{output_within, plugbus_bin, wasm};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = url.trim_start_matches("http://").to_string();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "plugbus run did not come up on {url}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn publish_reaches_a_running_host_and_prints_the_event_id() {
    let dir = tempfile::tempdir().unwrap();
    for c in ["inventory", "payments", "shipping", "notify"] {
        std::fs::copy(wasm(c), dir.path().join(format!("{c}.wasm"))).unwrap();
    }
    std::fs::write(dir.path().join("broken.wasm"), b"garbage").unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("host.log");
    let host = Running(
        Command::new(plugbus_bin())
            .args(["run", "--plugins"])
            .arg(dir.path())
            .args(["--http", &format!("127.0.0.1:{port}"), "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&url);

    let out = output_within(
        Command::new(plugbus_bin())
            .args(["publish", "--url", &url, "--json", "orders.created"])
            .arg(plugbus_tests::order("cli-1", "widget", 1)),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!id.is_empty());

    // the log shows the chain reaching notify, tagged with the plugin
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("is on its way") {
            let line = text.lines().find(|l| l.contains("is on its way")).unwrap();
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
            assert_eq!(v["fields"]["plugin"], "notify", "{line}");
            assert!(text.contains("broken.wasm"), "the bad file is not named in the log");
            break;
        }
        assert!(Instant::now() < deadline, "the chain never reached notify:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // a bad subject from the CLI is refused with the reason, and a non-zero exit
    let out = output_within(
        Command::new(plugbus_bin()).args(["publish", "--url", &url, "orders created", "x"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("whitespace"));
    drop(host);
}

#[test]
fn publish_without_a_host_says_so() {
    let port = free_port();
    let out = output_within(
        Command::new(plugbus_bin()).args(["publish", "--url", &format!("http://127.0.0.1:{port}"), "a.b", "x"]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plugbus host answering"));
}
