//! A headless Chromium driven over the Chrome DevTools Protocol (CDP), for the dashboard's
//! browser tests: launch, open a page, evaluate script, click like a user, collect every console
//! error and uncaught exception, take a screenshot. The websocket is `tokio-websockets`, the one
//! async-nats already builds (no second websocket stack to compile).
//!
//! Invariants:
//! - The browser runs in its own process group with a temp profile; dropping [`Browser`] kills
//!   the group and reaps it, so no test leaves a Chromium (or its renderers) behind.
//! - Every wait has a deadline: a command unanswered within [`COMMAND_TIMEOUT`] fails the test.

use anyhow::{Context, anyhow, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_websockets::{ClientBuilder, Message};

/// The longest one CDP command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// The browser binaries tried, in order (`CHROMIUM_BIN` first when set).
const CANDIDATES: &[&str] = &["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"];

/// The Chromium to run: `CHROMIUM_BIN`, else the first of [`CANDIDATES`] on `PATH`.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    CANDIDATES.iter().flat_map(|c| std::env::split_paths(&path).map(move |d| d.join(c))).find(|p| p.is_file())
}

/// Whether this run is CI (`CI=true`, as GitHub Actions and most CI systems set it).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The Chromium to run, or `None` (after a loud message) outside CI when there is none. In CI a
/// missing browser fails the test: the browser tests are never skipped there.
pub fn chromium_or_skip(test: &str) -> Option<PathBuf> {
    match find_chromium() {
        Some(p) => Some(p),
        None if in_ci() => panic!(
            "{test}: no Chromium found (tried $CHROMIUM_BIN, {CANDIDATES:?} on PATH) and CI=true: \
             the browser tests are required in CI (`apt-get install -y chromium`; scripts/test does it)"
        ),
        None => {
            eprintln!(
                "\n\
                 ************************************************************************\n\
                 * SKIPPED {test}: no Chromium found.\n\
                 * Install it (`apt-get install -y chromium`, as scripts/test does) or\n\
                 * point CHROMIUM_BIN at one. In CI (CI=true) this is a failure.\n\
                 ************************************************************************\n"
            );
            None
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A running headless Chromium and its DevTools connection.
pub struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<String>,
    pending: Pending,
    events: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
}

impl Browser {
    /// Starts `binary` headless with a fresh profile and connects to it.
    pub async fn launch(binary: &std::path::Path) -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir().context("a temp profile dir")?;
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--mute-audio",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Chromium's own chatter (D-Bus, GPU) goes to a file, shown when it fails to start.
        .stderr(std::fs::File::create(profile.path().join("stderr.log")).context("the browser's log file")?);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("starting {}", binary.display()))?;
        // From here on, dropping `browser` kills it (even if connecting fails).
        let mut browser = Browser {
            child,
            profile,
            out: mpsc::unbounded_channel().0,
            pending: Arc::default(),
            events: Arc::default(),
            next_id: AtomicU64::new(1),
        };
        let ws = browser.wait_for_endpoint().await?;
        let uri: http::Uri = ws.parse().with_context(|| format!("the DevTools endpoint {ws:?}"))?;
        let (socket, _) =
            ClientBuilder::from_uri(uri).connect().await.with_context(|| format!("connecting to {ws}"))?;
        let (mut sink, mut stream) = socket.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(text) = out_rx.recv().await {
                if sink.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
        });
        let (pending, events) = (browser.pending.clone(), browser.events.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Some(text) = msg.as_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else { continue };
                match v["id"].as_u64() {
                    Some(id) => {
                        if let Some(tx) = pending.lock().unwrap().remove(&id) {
                            let _ = tx.send(v);
                        }
                    }
                    None => events.lock().unwrap().push(v),
                }
            }
        });
        browser.out = out;
        Ok(browser)
    }

    /// Reads `DevToolsActivePort` (port, then browser path) from the profile once Chromium
    /// wrote it: the `ws://` URL of the browser target.
    async fn wait_for_endpoint(&mut self) -> anyhow::Result<String> {
        let file = self.profile.path().join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return Ok(format!("ws://127.0.0.1:{}{}", port.trim(), path.trim()));
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the browser exited ({status}) before it listened:\n{}", self.log());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the browser wrote no DevToolsActivePort within 30 s:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The end of the browser's stderr.
    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.profile.path().join("stderr.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends one CDP command (to a page's session when `session` is given) and waits for its
    /// answer; a CDP error is an error.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out.send(msg.to_string()).map_err(|_| anyhow!("the DevTools connection is closed"))?;
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .map_err(|_| anyhow!("{method}: no answer within {COMMAND_TIMEOUT:?}"))?
            .map_err(|_| anyhow!("{method}: the DevTools connection closed"))?;
        if let Some(e) = answer.get("error") {
            bail!("{method}: {e}");
        }
        Ok(answer["result"].clone())
    }

    /// A new tab with console, exception and log capture on, at `width` × `height`.
    pub async fn page(&self, width: u32, height: u32) -> anyhow::Result<Page<'_>> {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" })).await?;
        let target_id = target["targetId"].as_str().context("Target.createTarget gave no targetId")?.to_string();
        let attached =
            self.call(None, "Target.attachToTarget", json!({ "targetId": target_id, "flatten": true })).await?;
        let session = attached["sessionId"].as_str().context("Target.attachToTarget gave no sessionId")?.to_string();
        let page = Page { browser: self, session };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.call(domain, json!({})).await?;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        Ok(page)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser and the renderer, GPU and zygote processes it started.
        // SAFETY: kill(2) with the (negated) id of the process group this Browser created.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab.
pub struct Page<'b> {
    browser: &'b Browser,
    session: String,
}

impl Page<'_> {
    /// Sends a CDP command to this tab.
    pub async fn call(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Opens `url` and waits until the document and its deferred scripts loaded.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        let nav = self.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(e) = nav.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {e}");
        }
        // The new document, not the old one still answering while the navigation commits.
        let loaded = format!("location.href === {} && document.readyState === 'complete'", serde_json::to_string(url)?);
        self.wait_for(&format!("{url} loaded"), &loaded, Duration::from_secs(20)).await?;
        Ok(())
    }

    /// The value of `expression` (awaited when it is a promise); a thrown exception is an error.
    pub async fn eval(&self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }))
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!("{expression}: threw {}", ex["exception"]["description"].as_str().unwrap_or(&ex.to_string()));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expression` every 50 ms until it is truthy (returns that value); fails after
    /// `timeout`, naming `what` and the last value.
    pub async fn wait_for(&self, what: &str, expression: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting until {what} (`{expression}` was {v})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks the first element matching `selector` with the mouse, as a user does: scrolled into
    /// view, pressed and released at its centre (so a hidden or covered element is not clicked).
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        let sel = serde_json::to_string(selector)?;
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 const x = r.left + r.width / 2, y = r.top + r.height / 2; \
                 return document.elementFromPoint(x, y) === e ? [x, y] : 'covered by ' + \
                 (document.elementFromPoint(x, y) || {{}}).outerHTML; }})()"
            ))
            .await?;
        let [x, y] = match &at {
            Value::Array(xy) if xy.len() == 2 => [xy[0].clone(), xy[1].clone()],
            Value::Null => bail!("no element matches {selector}"),
            other => bail!("{selector} cannot be clicked: {other}"),
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "buttons": 1, "clickCount": 1 }),
            )
            .await?;
        }
        Ok(())
    }

    /// Types `text` into the element matching `selector` (focused first), as a keyboard would.
    pub async fn type_into(&self, selector: &str, text: &str) -> anyhow::Result<()> {
        let sel = serde_json::to_string(selector)?;
        let found = self
            .eval(&format!("(() => {{ const e = document.querySelector({sel}); e && e.focus(); return !!e; }})()"))
            .await?;
        if found != Value::Bool(true) {
            bail!("no element matches {selector}");
        }
        self.call("Input.insertText", json!({ "text": text })).await?;
        Ok(())
    }

    /// Every console error, uncaught exception and browser log error (a failed resource load,
    /// a Content-Security-Policy violation) this tab reported so far, one line each.
    pub fn errors(&self) -> Vec<String> {
        let events = self.browser.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e["sessionId"] == self.session.as_str())
            .filter_map(|e| {
                let p = &e["params"];
                match e["method"].as_str()? {
                    "Runtime.exceptionThrown" => {
                        let d = &p["exceptionDetails"];
                        Some(format!(
                            "uncaught exception: {} ({}:{})",
                            d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?"),
                            d["url"].as_str().unwrap_or(""),
                            d["lineNumber"]
                        ))
                    }
                    "Runtime.consoleAPICalled" if matches!(p["type"].as_str(), Some("error" | "assert")) => {
                        let args: Vec<String> = p["args"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| {
                                a["value"].as_str().map(str::to_string).unwrap_or_else(|| a["description"].to_string())
                            })
                            .collect();
                        Some(format!("console.error: {}", args.join(" ")))
                    }
                    "Log.entryAdded" if p["entry"]["level"] == "error" => Some(format!(
                        "browser log ({}): {} {}",
                        p["entry"]["source"].as_str().unwrap_or("?"),
                        p["entry"]["text"].as_str().unwrap_or("?"),
                        p["entry"]["url"].as_str().unwrap_or("")
                    )),
                    _ => None,
                }
            })
            .collect()
    }

    /// A PNG of the whole page (the viewport grown to the document's height).
    pub async fn screenshot(&self, width: u32) -> anyhow::Result<Vec<u8>> {
        let height = self.eval("Math.ceil(document.documentElement.scrollHeight)").await?.as_u64().unwrap_or(900);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" })).await?;
        let data = shot["data"].as_str().context("Page.captureScreenshot gave no data")?;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD.decode(data).context("the screenshot's base64")?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("the screenshot is not a PNG");
        }
        Ok(png)
    }
}
