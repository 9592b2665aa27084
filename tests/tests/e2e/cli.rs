//! The `plugbus` binary as a user runs it: `plugbus run` in one terminal, `plugbus publish` in
//! another.

use plugbus_tests::Running;
use plugbus_tests::{free_port, output_within, plugbus_bin, wasm};
use std::process::Command;
use std::time::{Duration, Instant};

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
    // Its own data_dir: the default (`.plugbus` in the working directory) keeps kv across runs,
    // and the widget stock ran out after ten.
    let data = tempfile::tempdir().unwrap();
    for c in ["inventory", "payments", "shipping", "notify"] {
        std::fs::copy(wasm(c), dir.path().join(format!("{c}.wasm"))).unwrap();
    }
    std::fs::write(dir.path().join("broken.wasm"), b"garbage").unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("host.log");
    let host = Running(
        plugbus_tests::plugbus_cached()
            .args(["run", "--plugins"])
            .arg(dir.path())
            .arg("--data-dir")
            .arg(data.path())
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

/// A host run by the binary on these components, with its API on a free port.
fn run_host(dir: &std::path::Path, components: &[&str], extra: &[&str]) -> (Running, String) {
    for c in components {
        std::fs::copy(wasm(c), dir.join(format!("{c}.wasm"))).unwrap();
    }
    // A port picked free can be taken by another test before the host binds it: then the host
    // exits at once, and the next free port is tried.
    for _ in 0..3 {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut host = Running(
            plugbus_tests::plugbus_cached()
                .args(["run", "--plugins"])
                .arg(dir)
                .arg("--data-dir")
                .arg(dir.join(".data"))
                .args(["--http", &format!("127.0.0.1:{port}")])
                .args(extra)
                .stderr(std::fs::File::create(dir.join("host.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        if wait_healthy_or_exit(&url, &mut host.0) {
            return (host, url);
        }
        let log = std::fs::read_to_string(dir.join("host.log")).unwrap_or_default();
        eprintln!("plugbus run exited before serving on {url}; trying another port. Its log:\n{log}");
    }
    panic!("plugbus run did not come up on three ports in a row");
}

/// Waits until something answers `/healthz` on `url` while the child still runs (`true`), or
/// the child exited (`false`).
fn wait_healthy_or_exit(url: &str, child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = url.trim_start_matches("http://").to_string();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if std::net::TcpStream::connect(&addr).is_ok() {
            // Still ours a moment later (a host that lost the port exits as it starts serving).
            std::thread::sleep(Duration::from_millis(200));
            return child.try_wait().unwrap().is_none();
        }
        assert!(Instant::now() < deadline, "plugbus run did not come up on {url}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    output_within(Command::new(plugbus_bin()).args(args).env("RUST_BACKTRACE", "1"), Duration::from_secs(30))
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Waits until `args` prints something containing `want`.
fn wait_output(args: &[&str], want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = stdout(&cli(args));
        if text.contains(want) {
            return text;
        }
        assert!(Instant::now() < deadline, "{args:?} never showed {want:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn user_errors_are_one_line_without_a_backtrace_even_with_rust_backtrace() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["publish", "--url", &url, "a.b", "x"],
        vec!["plugins", "--url", "not a url"],
        vec!["dlq", "list", "--url", &url],
    ] {
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line:\n{err}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(!err.contains("backtrace") && !err.contains("Backtrace") && !err.contains("\x1b["), "{err}");
    }
    // The causes are on that line: what failed, then why.
    let err = String::from_utf8_lossy(&cli(&["publish", "--url", &url, "a.b", "x"]).stderr).to_string();
    assert!(err.contains("no plugbus host answering") && err.matches(": ").count() >= 2, "{err}");
}

#[test]
fn listings_are_aligned_tables_with_json_for_machines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.wasm"), b"garbage").unwrap();
    let (host, url) = run_host(dir.path(), &["inventory", "faulty"], &["--max-attempts", "1"]);
    let out = cli(&["publish", "--url", &url, "faulty.retry", "boom"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let table = wait_output(&["dlq", "list", "--url", &url], "faulty");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("ID") && lines[0].contains("PLUGIN") && lines[0].contains("ERROR"), "{table}");
    let col = lines[0].find("PLUGIN").unwrap();
    assert_eq!(&lines[1][col..col + "faulty".len()], "faulty", "not under its header:\n{table}");
    assert!(lines[1].contains("faulty.retry"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&cli(&["dlq", "list", "--json", "--url", &url]))).unwrap();
    assert_eq!(json["dead_letters"][0]["plugin"], "faulty");
    let id = json["dead_letters"][0]["event"]["id"].as_str().unwrap().to_string();
    let table = stdout(&cli(&["plugins", "--url", &url]));
    let lines: Vec<&str> = table.lines().collect();
    let end = lines[0].find("RECEIVED").unwrap() + "RECEIVED".len();
    let faulty = lines.iter().find(|l| l.trim_start().starts_with("faulty")).unwrap_or_else(|| panic!("{table}"));
    // numbers are right-aligned under their header
    assert_eq!(&faulty[end - 1..end], "1", "{table}");
    assert_eq!(faulty.as_bytes()[end], b' ', "{table}");
    assert!(table.contains("broken.wasm"), "the rejected file is listed:\n{table}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&cli(&["plugins", "--json", "--url", &url]))).unwrap();
    assert_eq!(json["plugins"].as_array().unwrap().len(), 2);

    let replayed = stdout(&cli(&["dlq", "replay", "--id", &id, "--url", &url]));
    assert!(replayed.starts_with("replayed 1 dead letter"), "{replayed}");
    let again = cli(&["dlq", "replay", "--id", &id, "--url", &url]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains(&id) && err.trim_end().lines().count() == 1, "{err}");
    // The issue's example: a bad subject is one line naming why, with RUST_BACKTRACE=1.
    let bad = cli(&["publish", "--url", &url, "bad subject", "x"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("whitespace") && err.trim_end().lines().count() == 1, "{err}");
    drop(host);
}

#[test]
fn tail_prints_one_readable_line_per_event_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = run_host(dir.path(), &["audit"], &[]);
    for (json, expect_json) in [(false, false), (true, true)] {
        let mut args = vec!["tail", "--url", url.as_str(), "orders.>"];
        if json {
            args.push("--json");
        }
        let mut tail =
            Running(Command::new(plugbus_bin()).args(&args).stdout(std::process::Stdio::piped()).spawn().unwrap());
        let out = tail.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // The tail subscribes once connected: publish until a line comes.
        let deadline = Instant::now() + Duration::from_secs(30);
        let line = loop {
            let out = cli(&["publish", "--url", &url, "orders.created", r#"{"order_id":"t-1"}"#]);
            assert!(out.status.success());
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
                break line;
            }
            assert!(Instant::now() < deadline, "plugbus tail printed nothing");
        };
        if expect_json {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert_eq!(v["subject"], "orders.created");
        } else {
            assert!(line.contains("orders.created") && line.contains(r#"{"order_id":"t-1"}"#), "{line}");
            assert!(!line.starts_with('{') && !line.contains('\x1b'), "{line}");
            assert!(line.as_bytes()[2] == b':' && line.as_bytes()[5] == b':', "starts with the time: {line}");
        }
        drop(tail);
    }
    drop(host);
}

#[test]
fn completions_and_the_man_page_come_from_the_clap_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let text = stdout(&cli(&["completions", shell]));
        assert!(text.contains("plugbus") && text.contains("dlq") && text.contains("replay"), "{shell}");
    }
    let man = stdout(&cli(&["man"]));
    assert!(man.starts_with(".ie") || man.contains(".TH plugbus"), "{}", &man[..200.min(man.len())]);
    assert!(man.contains("completions") && man.contains("tail"));
    let bad = cli(&["completions", "cmd.exe"]);
    assert!(!bad.status.success());
}

/// What a progress bar leaves in a pipe or a file when it should not be there: carriage-return
/// redraws, escapes, the bar itself.
fn assert_no_progress(what: &str, text: &str) {
    assert!(
        !text.contains('\r') && !text.contains('\x1b') && !text.contains("[=="),
        "{what}: progress in a pipe:\n{text:?}"
    );
}

#[test]
fn progress_bars_never_reach_a_pipe_or_a_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = ["inventory", "payments", "shipping", "notify", "audit", "faulty"];
    for c in plugins {
        std::fs::copy(wasm(c), dir.path().join(format!("{c}.wasm"))).unwrap();
    }
    std::fs::write(dir.path().join("broken.wasm"), b"garbage").unwrap();

    // `inspect DIR`: every file, one verdict each; exit 1 for the broken one.
    let out = cli(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    for c in plugins.iter().chain(&["broken"]) {
        assert!(text.contains(&format!("{c}.wasm")), "{c} missing:\n{text}");
    }
    assert_no_progress("inspect DIR stdout", &text);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "inspect DIR wrote to a piped stderr");
    let out = cli(&["inspect", "--json", dir.path().to_str().unwrap()]);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdicts: Vec<(String, bool)> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["file"].as_str().unwrap().rsplit('/').next().unwrap().to_string(), r["loadable"] == true))
        .collect();
    assert_eq!(verdicts.len(), 7, "{verdicts:?}");
    assert!(verdicts.iter().all(|(f, ok)| *ok == (f != "broken.wasm")), "{verdicts:?}");

    // `run` loading the folder: its log file has lines, no bar and no colour.
    let (host, url) = run_host(dir.path(), &[], &["--max-attempts", "1"]);
    for i in 0..3 {
        let out = cli(&["publish", "--url", &url, "faulty.retry", &format!("boom {i}")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let json: serde_json::Value =
            serde_json::from_str(&stdout(&cli(&["dlq", "list", "--json", "--url", &url]))).unwrap();
        if json["total"] == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "three dead letters never showed: {json}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // `dlq replay` of them all: the summary on stdout, nothing on stderr.
    let out = cli(&["dlq", "replay", "--url", &url]);
    let text = stdout(&out);
    assert!(text.starts_with("replayed 3 dead letter(s)"), "{text}");
    assert_no_progress("dlq replay stdout", &text);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "dlq replay wrote to a piped stderr");
    drop(host);
    let log = std::fs::read_to_string(dir.path().join("host.log")).unwrap();
    assert!(log.contains("plugin loaded") && log.contains("broken.wasm"), "{log}");
    assert_no_progress("plugbus run's log file", &log);
}

/// On a terminal (a pseudo-terminal from util-linux `script`), `inspect DIR` draws its bar, in
/// colour unless `NO_COLOR` is set.
#[test]
fn on_a_terminal_the_bar_shows_and_no_color_takes_its_colour_away() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no `script` (util-linux) to make a pseudo-terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for c in ["inventory", "payments", "shipping", "notify", "audit"] {
        std::fs::copy(wasm(c), dir.path().join(format!("{c}.wasm"))).unwrap();
    }
    let run = |no_color: bool| {
        let line = format!("{} inspect {} >/dev/null", plugbus_bin().display(), dir.path().display());
        let mut cmd = Command::new("script");
        cmd.args(["-qefc", &line, "/dev/null"]).env("TERM", "xterm");
        if no_color {
            cmd.env("NO_COLOR", "1");
        } else {
            cmd.env_remove("NO_COLOR");
        }
        let out = output_within(&mut cmd, Duration::from_secs(60));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let coloured = run(false);
    assert!(coloured.contains("inspecting") && coloured.contains("/5"), "no bar on a terminal: {coloured:?}");
    assert!(coloured.contains("\x1b[36m") || coloured.contains("\x1b[1m"), "no colour on a terminal: {coloured:?}");
    let plain = run(true);
    assert!(plain.contains("inspecting") && plain.contains("/5"), "no bar with NO_COLOR: {plain:?}");
    assert!(!plain.contains("\x1b[36m") && !plain.contains("\x1b[1m"), "colour with NO_COLOR: {plain:?}");
}
