// The plugbus dashboard: polls /v1/stats and /v1/dlq, streams the live tail, replays dead
// letters. Everything from the host is shown with textContent (never as HTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "plugbus-api-token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";

function headers() {
  return token ? { Authorization: "Bearer " + token } : {};
}

// Set while the API answers 401: polling pauses until the user gives a token.
let needToken = false;

// Calls the API; a 401 asks for the token (kept for this tab; a refused one is forgotten).
async function api(path, init = {}) {
  const resp = await fetch(path, { ...init, headers: { ...headers(), ...(init.headers || {}) } });
  if (resp.status === 401) {
    const refused = token !== "";
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    needToken = true;
    $("#token-form").hidden = false;
    $("#token").focus();
    throw new Error(refused ? "the API refused the token: enter the right one" : "the API needs a token");
  }
  if (!resp.ok) {
    let why = resp.statusText;
    try { why = (await resp.json()).error || why; } catch (_) { /* not JSON */ }
    throw new Error(why);
  }
  return resp;
}

function show(where, text, bad) {
  const s = $(where);
  s.textContent = text;
  s.className = bad ? "bad" : "";
}
const status = (text, bad) => show("#status", text, bad);
const notice = (text, bad) => show("#notice", text, bad);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs = {}, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function health(rate, errorRate) {
  if (!rate) return "idle";
  if (errorRate >= 0.1) return "bad";
  if (errorRate > 0) return "warn";
  return "ok";
}

const fmt = (n, digits = 1) => (n === null || n === undefined ? "–" : Number(n).toFixed(digits));
const ms = (n) => (n === null || n === undefined ? "–" : n < 1 ? fmt(n, 2) + " ms" : fmt(n, 0) + " ms");

// Subjects only subscribed to on the left, plugins in the middle, published subjects right.
function drawGraph(graph) {
  const g = $("#graph");
  g.replaceChildren();
  const cols = [[], [], []];
  for (const n of graph.nodes) {
    const col = n.kind === "plugin" ? 1 : n.published ? 2 : 0;
    cols[col].push(n);
  }
  const width = Math.max(g.clientWidth || 900, 600);
  const colX = [10, width / 2 - 80, width - 190];
  const pos = {};
  cols.forEach((nodes, c) => nodes.forEach((n, i) => { pos[n.id] = { x: colX[c], y: 20 + i * 34 }; }));
  const height = 30 + 34 * Math.max(1, ...cols.map((c) => c.length));
  g.setAttribute("viewBox", `0 0 ${width} ${height}`);
  g.style.height = height + "px";
  const boxW = 180, boxH = 24;
  for (const e of graph.edges) {
    const a = pos[e.from], b = pos[e.to];
    if (!a || !b) continue;
    const forward = b.x > a.x;
    const x1 = forward ? a.x + boxW : a.x, x2 = forward ? b.x : b.x + boxW;
    const y1 = a.y + boxH / 2, y2 = b.y + boxH / 2, mid = (x1 + x2) / 2;
    const path = svg("path", {
      d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`,
      class: "edge " + e.kind,
      "data-from": e.from, "data-to": e.to, "data-kind": e.kind,
      "stroke-width": 1 + Math.min(5, Math.log10(1 + e.rate * 10)),
    });
    if (e.kind === "subscribe" && e.rate) path.classList.add(health(e.rate, e.error_rate));
    path.append(svg("title", {}, `${e.kind}: ${fmt(e.rate, 2)}/s, errors ${fmt(e.error_rate * 100, 0)}%`));
    g.append(path);
  }
  for (const n of graph.nodes) {
    const p = pos[n.id];
    const group = svg("g", { class: n.kind, "data-id": n.id, transform: `translate(${p.x},${p.y})` });
    const rect = svg("rect", { width: boxW, height: boxH, rx: 4 });
    let label = n.label;
    if (n.kind === "plugin") {
      rect.setAttribute("class", health(n.rate, n.error_rate));
      label += `  ${fmt(n.rate, 2)}/s`;
    }
    group.append(rect, svg("text", { x: 8, y: boxH / 2 }, label), svg("title", {}, n.label));
    g.append(group);
  }
}

function drawPlugins(stats) {
  const rows = stats.plugins.map((p) => {
    const limits = `${p.limits.memory_mib} MiB, ${p.limits.deadline}, ${p.limits.max_publishes} pub`;
    const num = (col, v) => el("td", { class: "num", "data-col": col }, v);
    const tr = el("tr", { "data-plugin": p.name },
      el("td", { "data-col": "name" }, p.name), el("td", { "data-col": "version" }, p.version),
      num("received", p.last_minute.received),
      num("rate", fmt(p.events_per_second, 2)),
      num("errors", fmt(p.error_rate * 100, 0) + "%"),
      num("p50", ms(p.p50_ms)), num("p99", ms(p.p99_ms)),
      num("retries", p.retries), num("dead", p.dead_letters),
      num("queue", p.queue_depth), num("in-flight", p.in_flight),
      el("td", { "data-col": "limits" }, limits));
    return tr;
  });
  $("#plugins tbody").replaceChildren(...rows);
  $("#rejected").replaceChildren(...stats.rejected.map((r) =>
    el("p", { class: "rejected" }, `rejected ${r.file}: ${r.reason}`)));
}

function header(ev, name) {
  const h = (ev.headers || []).find(([k]) => k === name);
  return h ? h[1] : "";
}

async function replay(path) {
  try {
    const report = await (await api(path, { method: "POST" })).json();
    notice(`replayed ${report.replayed.length}, ${report.failed} kept`);
  } catch (e) {
    notice("replay failed: " + e.message, true);
  }
  refresh();
}

function drawDlq(entries, total) {
  $("#dlq-count").textContent = total > entries.length ? `(${total} kept, newest ${entries.length} shown)` : `(${total} kept)`;
  const plugins = [...new Set(entries.map((d) => d.plugin))];
  $("#dlq-plugins").replaceChildren(...plugins.map((p) => {
    const b = el("button", { type: "button" }, `Replay all of ${p}`);
    b.onclick = () => replay(`/v1/dlq/replay?plugin=${encodeURIComponent(p)}`);
    return b;
  }));
  $("#dlq tbody").replaceChildren(...entries.slice().reverse().map((d) => {
    const ev = d.event;
    const b = el("button", { type: "button" }, "Replay");
    // A URL drops a path segment of "." or ".." (encoded too): "/v1/dlq/./replay" would be
    // the replay of every dead letter. Such an id (a broker's, forged) cannot be replayed alone.
    if (ev.id === "." || ev.id === "..") {
      b.disabled = true;
      b.title = "this id cannot be sent in a URL path: replay it with its plugin's";
    } else {
      b.onclick = () => replay(`/v1/dlq/${encodeURIComponent(ev.id)}/replay`);
    }
    return el("tr", { "data-id": ev.id },
      el("td", {}, header(ev, "plugbus-failed-at")), el("td", {}, d.plugin),
      el("td", {}, header(ev, "plugbus-original-subject")),
      el("td", { class: "data" }, header(ev, "plugbus-error")), el("td", {}, ev.id), el("td", {}, b));
  }));
}

// One refresh at a time: a slow answer is not asked again every 2 s meanwhile.
let refreshing = false;

async function refresh() {
  if (needToken || refreshing) return;
  refreshing = true;
  try {
    const [stats, dlq] = await Promise.all([
      api("/v1/stats").then((r) => r.json()),
      api("/v1/dlq?limit=100&summary=true").then((r) => r.json()),
    ]);
    drawGraph(stats.graph);
    drawPlugins(stats);
    drawDlq(dlq.dead_letters, dlq.total);
    status(`${stats.plugins.length} plugins serving · updated ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    status("host: " + e.message, true);
  } finally {
    refreshing = false;
  }
}

// The live tail: the SSE stream read with fetch (EventSource cannot send the token).
let tailAbort = null;

function addTailRow(ev) {
  const data = String(ev.data || "");
  const row = el("tr", {},
    el("td", {}, (ev.time || "").replace("T", " ").slice(0, 23)), el("td", {}, ev.subject),
    el("td", {}, ev.id), el("td", { class: "data" }, data.length > 160 ? data.slice(0, 160) + "…" : data));
  const body = $("#tail tbody");
  body.prepend(row);
  while (body.rows.length > 200) body.lastElementChild.remove();
}

async function tail(pattern) {
  tailAbort = new AbortController();
  $("#tail-button").textContent = "Stop";
  try {
    const resp = await api("/v1/events/" + encodeURIComponent(pattern), { signal: tailAbort.signal });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const message = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = message.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) addTailRow(JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") notice("tail: " + e.message, true);
  }
  tailAbort = null;
  $("#tail-button").textContent = "Start";
}

$("#tail-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (tailAbort) tailAbort.abort();
  else tail($("#tail-pattern").value.trim() || ">");
});

$("#token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = $("#token").value.trim();
  $("#token").value = "";
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token-form").hidden = true;
  needToken = false;
  status("checking the token…");
  notice("");
  refresh();
});

refresh();
setInterval(refresh, 2000);
