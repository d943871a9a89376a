// The gateway's dashboard: polls /ui/api/state and draws it with DOM nodes (textContent only, no HTML
// from data). The API key, when the gateway has one, lives in this tab's sessionStorage and goes out
// as an Authorization header on the page's own requests; nothing here talks to any other host.
"use strict";
const KEY = "orchestrator-gateway-key";
const POLL_MS = 2000;
let timer = null;
let openServer = null;

function $(id) { return document.getElementById(id); }
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(2) + " GiB";
  return (n / 2 ** 20).toFixed(0) + " MiB";
}
function num(v, unit) { return v === null || v === undefined ? "–" : `${v}${unit || ""}`; }

async function api(path, opts) {
  const headers = Object.assign({}, (opts && opts.headers) || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers["Authorization"] = "Bearer " + key;
  const r = await fetch(path, Object.assign({}, opts || {}, { headers, cache: "no-store", credentials: "omit" }));
  if (r.status === 401) { showLogin(key ? "that key was refused" : ""); throw new Error("401"); }
  return r;
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("status").textContent = "the API key is needed";
  if (timer) { clearTimeout(timer); timer = null; }
}

async function poll() {
  timer = null;
  try {
    const r = await api("/ui/api/state");
    const state = await r.json();
    $("login").hidden = true;
    $("main").hidden = false;
    render(state);
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e.message === "401") return;
    $("status").textContent = "no answer from the gateway (" + e.message + "); retrying";
  }
  timer = setTimeout(poll, POLL_MS);
}

function render(s) {
  document.title = `${s.deployment} · gateway`;
  $("title").textContent = `${s.deployment} · gateway on ${s.gateway.host}:${s.gateway.port}`;
  const codes = s.requests_by_code || {};
  const total = Object.values(codes).reduce((a, b) => a + b, 0);
  const errors = Object.entries(codes).filter(([c]) => Number(c) >= 400).reduce((a, [, v]) => a + v, 0);
  const sp = s.speed;
  $("summary").replaceChildren(
    ...[["servers", s.servers.length], ["running", s.servers.filter(x => x.state === "running").length],
        ["requests", total], ["errors", errors], [`tokens/s (last ${sp.window_s} s)`, sp.tokens_per_s],
        ["TTFT p50", num(sp.ttft_ms_p50, " ms")], ["in flight", s.servers.reduce((a, x) => a + x.inflight, 0)],
        ["waiting", s.servers.reduce((a, x) => a + x.waiting, 0)]]
      .map(([k, v]) => el("div", {}, el("b", {}, v), k)));
  $("servers").replaceChildren(...s.servers.map(card));
  $("budgets").replaceChildren(...s.budgets.map(budget));
  $("events").replaceChildren(...s.events.slice().reverse().map(ev =>
    el("li", {}, `${new Date(ev.time * 1000).toLocaleTimeString()} ${ev.server}: ${ev.kind} (${ev.detail})`)));
  const titles = { routes: "Route decisions", tool_calls: "Tool calls", prefix_cache: "Prefix reuse", other: "More figures" };
  $("extra").replaceChildren(...Object.entries(s.sections || {}).map(([name, rows]) =>
    el("div", { "data-section": name }, el("h2", {}, titles[name] || name), table(["metric", "labels", "value"],
      rows.map(r => [r.metric, Object.entries(r.labels).map(([k, v]) => `${k}=${v}`).join(" "), r.value])))));
}

function card(x) {
  const dl = el("dl", { class: "kv" });
  const add = (k, v) => { dl.append(el("dt", {}, k), el("dd", {}, v)); };
  add("engine", `${x.engine} ${x.version}`);
  add("model", `${x.model} as ${x.served_name}`);
  add("start", x.start + (x.idle_timeout_s ? ` (idle stop after ${x.idle_timeout_s} s)` : ""));
  const w = x.where;
  add("runs on", `${w.device} · ${w.runtime}` + (w.pid ? ` · pid ${w.pid}` : "") + (w.container ? ` · container ${w.container}` : ""));
  for (const [res, need] of Object.entries(x.planned)) {
    const got = x.measured[res];
    add(res, `planned ${bytes(need)} · measured ${got === undefined ? "–" : bytes(got)}`);
  }
  add("queue", `${x.inflight} of ${x.parallel} running, ${x.waiting} waiting`);
  const sp = x.speed;
  add("last minute", `${sp.requests} req · ${sp.tokens_per_s} tok/s · TTFT ${num(sp.ttft_ms_p50, " ms")} · decode ${num(sp.decode_tps_p50, " tok/s")}`);
  const node = el("div", { class: "card", "data-server": x.name, "data-state": x.state, onclick: () => showDetail(x.name) },
    el("h3", {}, x.name, el("span", { class: "state " + x.state }, x.state)), dl);
  if (x.loading) {
    const l = x.loading;
    const pct = l.total ? ` ${Math.round(100 * l.done / l.total)}% (${Math.round(l.done)} of ${Math.round(l.total)} ${l.unit || ""})` : "";
    node.append(el("div", { class: "legend loading" }, `loading: ${l.step}${pct} ${l.detail || ""}`));
  }
  if (x.failure) {
    const f = x.failure;
    node.append(el("div", { class: "failure" }, el("b", {}, `failed at stage ${f.stage}: ${f.cause}`),
      el("div", {}, f.detail), el("div", {}, "fix: " + (f.fix || "see the log"))));
  }
  for (const action of x.actions) {
    node.append(el("button", { "data-action": action, onclick: (ev) => { ev.stopPropagation(); act(x.name, action, ev.target); } }, action));
  }
  return node;
}

function budget(b) {
  const of = b.budget_bytes;
  const pct = v => of ? Math.min(100, 100 * v / of).toFixed(1) + "%" : "0%";
  const bar = el("div", { class: "bar", title: `planned ${bytes(b.planned_bytes)}, measured ${bytes(b.measured_bytes)}` },
    el("div", { class: "planned" }), el("div", { class: "measured" }));
  bar.children[0].style.width = pct(b.planned_bytes);
  bar.children[1].style.width = pct(b.measured_bytes);
  const rows = Object.entries(b.per_server).map(([n, v]) => `${n} ${bytes(v.planned)} planned, ${v.measured === null || v.measured === undefined ? "–" : bytes(v.measured)} measured`);
  return el("div", { "data-resource": b.resource },
    el("div", {}, el("b", {}, b.resource), ` planned ${bytes(b.planned_bytes)} · measured ${bytes(b.measured_bytes)} of ${of === null ? "unlimited" : bytes(of)} (${b.reason})`),
    bar, el("div", { class: "legend" }, rows.join(" · ")));
}

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, head.map(h => el("th", {}, h)))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => el("td", {}, c === null || c === undefined ? "" : c))))));
}

async function act(name, action, button) {
  button.disabled = true;
  try {
    const r = await api(`/ui/api/server/${encodeURIComponent(name)}/${action}`,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    if (!r.ok) { const e = await r.json(); $("status").textContent = `${action} ${name}: ${e.error.message}`; }
  } catch (e) { /* shown by api() */ }
  if (!timer) return;
  clearTimeout(timer);
  poll();
}

async function showDetail(name) {
  openServer = name;
  const body = $("detail-body");
  body.replaceChildren(el("p", {}, "loading…"));
  if (!$("detail").open) $("detail").showModal();
  let d;
  try { d = await (await api(`/ui/api/server/${encodeURIComponent(name)}`)).json(); } catch (e) { return; }
  if (openServer !== name) return;
  const parts = [el("h2", {}, `server ${d.name}`), el("pre", { class: "explain" }, d.explain.join("\n"))];
  parts.push(el("h3", {}, "Flags and why"), table(["flag", "value", "reason", "source"],
    d.flags.map(f => [f.flag || "(positional)", f.value, f.reason, f.source])));
  if (d.env.length) parts.push(el("h3", {}, "Environment"), table(["name", "value", "reason"],
    d.env.map(v => [v.name, v.from_env ? `from $${v.from_env}` : v.value, v.reason])));
  parts.push(el("h3", {}, "Last log lines"), el("pre", { class: "log" }, d.log.length ? d.log.join("\n") : "(no log yet)"));
  parts.push(el("h3", {}, "Saved bench runs"));
  if (!d.bench.length) parts.push(el("p", { class: "legend" }, "none: orchestrate bench PROFILE saves one"));
  for (const run of d.bench) {
    const rows = run.results.flatMap(r => r.levels.map(lv => [run.time, lv.concurrency, lv.throughput_tps, lv.decode_tps, lv.ttft_ms, lv.itl_ms, lv.errors]));
    const t = table(["saved", "concurrency", "tok/s", "per stream tok/s", "TTFT ms", "ITL ms", "errors"], rows);
    t.classList.add("bench");
    parts.push(t);
    const img = el("img", { class: "plot", alt: `bench plot ${run.time}` });
    parts.push(img);
    api(`/ui/api/server/${encodeURIComponent(name)}/bench.svg?run=${run.index}`)
      .then(r => r.ok ? r.blob() : null).then(b => { if (b) img.src = URL.createObjectURL(b); }).catch(() => {});
  }
  parts.push(el("h3", {}, "Saved eval results"));
  if (!d.eval.length) parts.push(el("p", { class: "legend" }, "none: orchestrate eval PROFILE saves one"));
  for (const run of d.eval) {
    parts.push(table(["saved", "kv", "context", "perplexity", "KLD mean", "decode tok/s"],
      run.results.map(r => [run.time, r.kv_cache, r.context, r.perplexity, r.kld_mean, r.decode_tps])));
  }
  body.replaceChildren(...parts);
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key").value = "";
  poll();
});
$("close").addEventListener("click", () => { openServer = null; $("detail").close(); });
poll();
