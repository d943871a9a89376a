"""The gateway's web dashboard: one page at `/` that shows every server of the deployment (engine,
version, model, state with loading progress or a failed start's cause, where it runs, memory against
the budget, throughput, queue) and, on a click, a server's plan, last log lines and saved bench/eval
results with a plot.

- Everything is served by the gateway itself (static/ beside this module; no CDN, no external fetch;
  the page's Content-Security-Policy allows its own origin only).
- The data comes from JSON endpoints under /ui/api/ that take the API's key (Bearer), like /v1. A
  browser cannot send a Bearer header when it opens `/`, so on a gateway with a key the page shell
  answers 401 with no data in it, asks for the key, keeps it in sessionStorage and sends it on its own
  fetches. No key is ever written into a page or an answer: each one is scrubbed of the key values the
  gateway knows before it leaves.
- Actions: POST /ui/api/server/NAME/start|stop, for on_demand servers only, with the key, and only with
  a JSON content type and no foreign Origin (an HTML form on another site can send neither).
- Figures: the scheduler's own state (state, in flight, waiting, failures), the plan's estimates against
  the gateway's budgets beside measured use (process-tree RSS; GPU memory where NVML reports it), the
  engine's own timings of recent answers (a gateway hook), and any metric other parts of the gateway
  register under gateway_route*, gateway_tool*, gateway_prefix* / gateway_cache* (shown when present).
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import statistics
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.gateway.scheduler import Events, Rejected, StartOutcome

WINDOW_S = 60.0             # throughput and latency over the last minute
EVENTS_KEPT = 50
LOG_LINES = 40
SAVED_RUNS = 5
REDACTED = "[redacted]"
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Metric families other parts of the gateway add; each becomes a section of the page when present.
SECTIONS = {"routes": ("gateway_route",), "tool_calls": ("gateway_tool",),
            "prefix_cache": ("gateway_prefix", "gateway_cache")}
BASE_METRICS = {"gateway_requests", "gateway_request_duration_seconds", "gateway_queue_wait_seconds",
                "gateway_server_starts", "gateway_server_start_seconds", "gateway_server_stops",
                "gateway_rejections", "gateway_server_state", "gateway_server_inflight", "gateway_server_waiting"}
# Key-shaped words (published prefixes) and `key: VALUE` / `--api-key VALUE` / `Bearer VALUE` forms.
_KEY_WORD = re.compile(r"\b(?:sk-|sk_|rk_|hf_|gh[opsur]_|github_pat_|glpat-|xox[abpr]-|AKIA|ASIA)[A-Za-z0-9_\-]{8,}")
_KEY_ARG = re.compile(r"(?i)((?:(?:--api-key|authorization\s*:\s*bearer|bearer)\s+)|(?:(?:--api-key|api[_-]?key|"
                      r"authorization|token|password|secret)[\"']?\s*[:=]\s*[\"']?))(?!\[redacted\])"
                      r"[^\s\"',;]{6,}")


def redact(text: str, secrets: list[str], shapes: bool = True) -> str:
    """Text with every known secret value replaced by [redacted], and (`shapes`: logs) anything key-shaped."""
    for s in secrets:
        text = text.replace(s, REDACTED)
    if not shapes:
        return text
    text = _KEY_WORD.sub(REDACTED, text)
    return _KEY_ARG.sub(lambda m: m.group(1) + REDACTED, text)


@dataclass
class Answered:
    at: float                   # time.monotonic()
    server: str
    status: int
    seconds: float              # arrival to the end of the answer, at the gateway
    completion_tokens: int | None
    prompt_ms: float | None     # the engine's prefill time (llama.cpp/ik `timings`): time to first token there
    decode_tps: float | None    # the engine's decode rate


class EventRing(Events):
    """Recent starts, stops and swaps for the page (the scheduler's Events; the gateway's metrics get
    every event as before through Fanout)."""

    def __init__(self, keep: int = EVENTS_KEPT) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=keep)

    def add(self, server: str, kind: str, detail: str) -> None:
        self.items.append({"time": time.time(), "server": server, "kind": kind, "detail": detail})

    def started(self, name: str, outcome: StartOutcome) -> None:
        if outcome.ok:
            self.add(name, "started", f"in {outcome.elapsed_s:.1f} s")
        else:
            self.add(name, "start failed", f"stage {outcome.stage}: {outcome.cause} ({outcome.hint})")

    def stopped(self, name: str, reason: str) -> None:
        self.add(name, "swapped out" if reason == "swap" else "stopped", reason)


class Forget(Events):
    """Drops a server's start progress once its start has ended, so the next start shows only its own."""

    def __init__(self, progress: dict[str, dict[str, Any]]) -> None:
        self.progress = progress

    def started(self, name: str, outcome: StartOutcome) -> None:
        self.progress.pop(name, None)

    def stopped(self, name: str, reason: str) -> None:
        self.progress.pop(name, None)


class Fanout(Events):
    def __init__(self, *sinks: Events) -> None:
        self.sinks = sinks

    def started(self, name: str, outcome: StartOutcome) -> None:
        for s in self.sinks:
            s.started(name, outcome)

    def stopped(self, name: str, reason: str) -> None:
        for s in self.sinks:
            s.stopped(name, reason)

    def rejected(self, name: str, status: int, reason: str) -> None:
        for s in self.sinks:
            s.rejected(name, status, reason)

    def changed(self, name: str, state: str, inflight: int, waiting: int) -> None:
        for s in self.sinks:
            s.changed(name, state, inflight, waiting)


def _num(d: Any, key: str) -> float | None:
    v = d.get(key) if isinstance(d, dict) else None
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def answered(server: str, status: int, seconds: float, answer: dict[str, Any] | None,
             now: float | None = None) -> Answered:
    """What one answer tells: llama.cpp/ik put `timings` in the answer (or a stream's last event), every
    OpenAI-style server `usage`."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    timings = answer.get("timings") if isinstance(answer, dict) else None
    tokens = _num(usage, "completion_tokens")
    if tokens is None:
        tokens = _num(timings, "predicted_n")
    return Answered(time.monotonic() if now is None else now, server, status, seconds,
                    int(tokens) if tokens is not None else None, _num(timings, "prompt_ms"),
                    _num(timings, "predicted_per_second"))


def speed(items: list[Answered], now: float, window: float = WINDOW_S) -> dict[str, Any]:
    """Figures over the last `window` seconds of answers."""
    recent = [a for a in items if now - a.at <= window]
    ok = [a for a in recent if a.status < 400]
    tokens = sum(a.completion_tokens or 0 for a in ok)

    def p50(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 1) if xs else None

    return {"window_s": window, "requests": len(recent), "errors": len(recent) - len(ok),
            "tokens_per_s": round(tokens / window, 2),
            "ttft_ms_p50": p50([a.prompt_ms for a in ok if a.prompt_ms is not None]),
            "decode_tps_p50": p50([a.decode_tps for a in ok if a.decode_tps is not None]),
            "latency_ms_p50": p50([a.seconds * 1000 for a in ok])}


def registry_sections(registry: Any) -> dict[str, list[dict[str, Any]]]:
    """Samples of the metric families beyond the gateway's base set, grouped by name prefix: routes,
    tool calls, prefix reuse, and `other` for any further family (histogram buckets left out)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for fam in registry.collect():
        if fam.name in BASE_METRICS:
            continue
        section = next((k for k, prefixes in SECTIONS.items() if fam.name.startswith(prefixes)), "other")
        for s in fam.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            out.setdefault(section, []).append({"metric": s.name, "labels": dict(s.labels), "value": s.value})
    return out


def requests_by_code(registry: Any) -> dict[str, float]:
    counts: dict[str, float] = {}
    for fam in registry.collect():
        if fam.name == "gateway_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    counts[s.labels.get("code", "?")] = counts.get(s.labels.get("code", "?"), 0) + s.value
    return counts


# ---------------------------------------------------------------------------- measured memory

def process_rss(pid: int) -> int | None:
    """RSS of the process and its children (bytes), None when it is gone."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.Error):
            total += q.memory_info().rss
    return total


class GpuMemory:
    """GPU memory used per process where NVML reports it (NVIDIA); nothing elsewhere."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._tried = False

    def by_pid(self) -> dict[int, dict[int, int]]:
        """pid -> GPU index -> bytes."""
        if not self._tried:
            self._tried = True
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # no NVML library, driver or GPU
                self._nvml = None
        nv = self._nvml
        if nv is None:
            return {}
        out: dict[int, dict[int, int]] = {}
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    if proc.usedGpuMemory:
                        out.setdefault(int(proc.pid), {})[i] = int(proc.usedGpuMemory)
        except Exception:  # a GPU that does not report processes
            return out
        return out


# ---------------------------------------------------------------------------- SVG plot

def bench_svg(entry: dict[str, Any], server: str, width: int = 640, height: int = 260) -> str:
    """A saved bench run of one server as an SVG: output tokens/s (aggregate) and TTFT p50 against
    concurrent requests, one point per level."""
    result = next((r for r in entry.get("servers", []) if r.get("server") == server), None)
    levels = sorted((lv for lv in (result or {}).get("levels", []) if isinstance(lv.get("concurrency"), int)),
                    key=lambda lv: lv["concurrency"])
    pad, mid = 44, width // 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{width // 2}" y="14" text-anchor="middle">{html.escape(server)}: bench '
             f'{html.escape(str(entry.get("time", "")))}</text>']
    panels = (("throughput_tps", "output tokens/s", "#1f77b4"), ("ttft_ms", "TTFT p50 (ms)", "#d62728"))
    for k, (key, label, colour) in enumerate(panels):
        x0, x1, y0, y1 = k * mid + pad, (k + 1) * mid - 12, height - 30, 40
        parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#888"/>'
                     f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#888"/>'
                     f'<text x="{(x0 + x1) // 2}" y="{height - 6}" text-anchor="middle">concurrent requests · '
                     f'{html.escape(label)}</text>')
        pts = [(lv["concurrency"], float(lv[key])) for lv in levels if isinstance(lv.get(key), int | float)]
        if not pts:
            parts.append(f'<text x="{(x0 + x1) // 2}" y="{(y0 + y1) // 2}" text-anchor="middle">no data</text>')
            continue
        top = max(y for _, y in pts) or 1.0
        n = len(pts)
        coords = [(x0 + (x1 - x0) * (i + 0.5) / n, y0 - (y0 - y1) * y / top) for i, (_, y) in enumerate(pts)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + '"/>')
        for (c, y), (px, py) in zip(pts, coords, strict=True):
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>'
                         f'<text x="{px:.1f}" y="{y0 + 12}" text-anchor="middle">{c}</text>'
                         f'<text x="{px:.1f}" y="{py - 6:.1f}" text-anchor="middle">{y:.1f}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- the dashboard

class Dashboard:
    """The page and its endpoints over one Gateway; `hook` (prepare/finished) records each answer."""

    def __init__(self, gateway: Any) -> None:
        """`gateway`: the app's Gateway (not imported here: app.py imports this module)."""
        self.gw = gateway
        self.ring = EventRing()
        self.answers: deque[Answered] = deque(maxlen=2000)
        self.progress: dict[str, dict[str, Any]] = {}
        self.gpu = GpuMemory()
        self.actions: set[Any] = set()
        gateway.sched.events = Fanout(gateway.sched.events, self.ring, Forget(self.progress))
        if gateway.backend.deployer is not None:
            self._follow(gateway.backend.deployer)

    # ------------------------------------------------------------------ feeds

    def _follow(self, deployer: Any) -> None:
        """Keep each server's latest start step (health stage, seconds waited of its timeout)."""
        progress, meter = deployer.progress, deployer.meter

        def on_progress(server: str, event: str, detail: str) -> None:
            self.progress[server] = {"step": event, "detail": detail, "at": time.time()}
            progress(server, event, detail)

        def on_meter(server: str, what: str, done: float, total: float | None, unit: str, note: str) -> None:
            self.progress[server] = {"step": what, "detail": note, "done": done, "total": total, "unit": unit,
                                     "at": time.time()}
            meter(server, what, done, total, unit, note)

        deployer.progress, deployer.meter = on_progress, on_meter

    def prepare(self, call: Any) -> Response | None:
        return None

    def finished(self, call: Any, status: int, answer: dict[str, Any] | None) -> None:
        self.answers.append(answered(call.name, status, time.perf_counter() - call.t0, answer))

    # ------------------------------------------------------------------ secrets

    def secrets(self) -> list[str]:
        """Every secret value the gateway can know: its own key, each server's upstream key and the
        values of variables the plan takes secrets from."""
        environ = self.gw.backend.environ
        names = {e.from_env for sp in self.gw.plan.servers for e in sp.env if e.from_env}
        names |= {sp.api_key.env_var for sp in self.gw.plan.servers if sp.api_key}
        if self.gw.gw.api_key_env:
            names.add(self.gw.gw.api_key_env)
        values = {environ.get(n) or "" for n in names} | {self.gw.api_key or ""}
        return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)

    def answer(self, data: Any, status: int = 200) -> Response:
        text = json.dumps(data, default=str)
        for s in self.secrets():
            text = text.replace(json.dumps(s)[1:-1], REDACTED)
        return Response(text, status, media_type="application/json", headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ figures

    def records(self) -> dict[str, Any]:
        deployer = self.gw.backend.deployer
        if deployer is None:
            return {}
        try:
            return dict(deployer.store.load(self.gw.plan.name))
        except Exception:  # a state file being rewritten: no records this time
            return {}

    def server_state(self, name: str, rec: Any, gpu_use: dict[int, dict[int, int]], now: float) -> dict[str, Any]:
        sp = self.gw.plan.server(name)
        e = self.gw.sched.entries[name]
        secrets = self.secrets()
        waiting = sum(1 for w in e.waiters if not w.future.done())
        failure = None
        if e.state == "failed" and e.failure is not None:
            f = e.failure
            failure = {"stage": f.stage, "cause": f.cause, "fix": f.hint, "detail": redact(f.detail, secrets),
                       "retry_in_s": max(0.0, round(e.retry_at - self.gw.sched.clock(), 1))}
        loading = None
        if e.state == "loading":
            loading = dict(self.progress.get(name, {"step": "starting", "detail": ""}))
            loading["detail"] = redact(str(loading.get("detail", "")), secrets)
        alive = rec is not None and e.state in ("running", "loading", "stopping")
        where: dict[str, Any] = {"runtime": sp.runtime, "accelerator": sp.accelerator,
                                 "device": "CPU" if sp.gpu_count == 0 else
                                 "GPU " + ",".join(str(i) for i in (sp.gpu_ids if sp.gpu_ids is not None
                                                                    else range(sp.gpu_count))),
                                 "address": f"{sp.client_host}:{sp.port}"}
        measured: dict[str, int] = {}
        if alive:
            if rec.runtime == "docker":
                where["container"] = (rec.container or "")[:12] or None
            else:
                where["pid"] = rec.pid
                rss = process_rss(rec.pid)
                if rss is not None:
                    measured["RAM"] = rss
                for i, used in gpu_use.get(rec.pid, {}).items():
                    measured[f"GPU {i}"] = used
        return {
            "name": name, "served_name": sp.served_name, "engine": sp.engine_display, "version": sp.engine_version,
            "model": Path(sp.model_location).name if not sp.model_is_hf else sp.model_location,
            "start": sp.start, "state": e.state, "inflight": e.inflight, "waiting": waiting,
            "parallel": e.spec.parallel, "starts": e.starts, "loading": loading, "failure": failure,
            "where": where, "planned": dict(e.spec.needs), "measured": measured,
            "fit": sp.estimate.verdict if sp.estimate else None,
            "idle_timeout_s": sp.idle_timeout_s,
            "speed": speed([a for a in self.answers if a.server == name], now),
            "actions": self.actions_for(name)}

    def actions_for(self, name: str) -> list[str]:
        e = self.gw.sched.entries[name]
        if e.spec.start != "on_demand":
            return []
        if e.state in ("stopped", "failed"):
            return ["start"]
        if e.state == "running":
            return ["stop"]
        return []

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        records = self.records()
        gpu_use = self.gpu.by_pid()
        servers = [self.server_state(sp.name, records.get(sp.name), gpu_use, now) for sp in self.gw.plan.servers]
        budgets = []
        for b in self.gw.gw.budgets:
            loaded = sum(s["planned"].get(b.resource, 0) for s in servers
                         if s["state"] in ("loading", "running", "stopping") or s["start"] == "always")
            measured = sum(s["measured"].get(b.resource, 0) for s in servers)
            budgets.append({"resource": b.resource, "budget_bytes": b.bytes, "reason": b.reason,
                            "planned_bytes": loaded, "measured_bytes": measured,
                            "per_server": {s["name"]: {"planned": s["planned"].get(b.resource, 0),
                                                       "measured": s["measured"].get(b.resource)}
                                           for s in servers if b.resource in s["planned"]}})
        registry = self.gw.metrics.registry
        total = speed(list(self.answers), now)
        return {"deployment": self.gw.plan.name, "time": time.time(),
                "gateway": {"host": self.gw.gw.host, "port": self.gw.gw.port, "auth": bool(self.gw.api_key),
                            "queue": self.gw.gw.queue},
                "servers": servers, "budgets": budgets, "speed": total,
                "requests_by_code": requests_by_code(registry),
                "events": [dict(ev, detail=redact(str(ev["detail"]), self.secrets())) for ev in self.ring.items],
                "sections": registry_sections(registry)}

    def detail(self, name: str) -> dict[str, Any]:
        from orchestrator.plan.explain import explain_server
        from orchestrator.runtime.logs import tail

        sp = self.gw.plan.server(name)
        secrets = self.secrets()
        flags = [{"flag": f.name, "value": f.value, "reason": f.reason, "source": f.source} for f in sp.flags]
        env = [{"name": v.name, "value": None if v.secret else v.value, "from_env": v.from_env, "reason": v.reason}
               for v in sp.env]
        store = self.gw.backend.deployer.store if hasattr(self.gw.backend, "deployer") else None
        log: list[str] = []
        if store is not None:
            log = [redact(line, secrets) for line in tail(store.log_path(self.gw.plan.name, name), LOG_LINES)]
        bench, evals = self.saved(name)
        # The plan holds secrets by reference only; known values are still taken out, shapes are left alone.
        return {"name": name, "explain": [redact(line, secrets, shapes=False) for line in explain_server(sp)],
                "flags": [dict(f, value=redact(f["value"], secrets, shapes=False) if f["value"] else f["value"])
                          for f in flags],
                "env": env, "estimate": sp.estimate.as_dict() if sp.estimate else None,
                "needs": self.gw.gw.needs.get(name, {}), "warnings": sp.warnings, "log": log,
                "bench": bench, "eval": evals}

    def results_path(self) -> Path | None:
        deployer = self.gw.backend.deployer
        if deployer is None:
            return None
        from orchestrator.measure.bench import results_file

        return results_file(str(deployer.store.root))

    def saved(self, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """This server's last saved bench runs and eval results (newest first), as `bench`/`eval` saved them."""
        path = self.results_path()
        if path is None:
            return [], []
        from orchestrator.measure.bench import saved

        out: dict[str, list[dict[str, Any]]] = {"bench": [], "eval": []}
        for kind in out:
            runs = [e for e in saved(path, kind) if e.get("profile") == self.gw.plan.name]
            for index, entry in reversed(list(enumerate(runs))):
                mine = [r for r in entry.get("servers", []) if r.get("server") == name]
                if mine and len(out[kind]) < SAVED_RUNS:
                    out[kind].append({"index": index, "time": entry.get("time"), "host": entry.get("host"),
                                      "results": mine})
        return out["bench"], out["eval"]

    # ------------------------------------------------------------------ endpoints

    def denied(self, request: Request) -> Response | None:
        denied: Response | None = self.gw.unauthorized(request)
        return denied

    async def page(self, request: Request) -> Response:
        text = resources.files("orchestrator.gateway").joinpath("static/index.html").read_text(encoding="utf-8")
        # The shell holds no data; without the key it still loads (with 401) and asks for it.
        status = 401 if self.denied(request) is not None else 200
        return Response(text, status, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def static(self, request: Request) -> Response:
        name = request.path_params["file"]
        if name not in STATIC:
            return JSONResponse({"error": {"message": f"no such file: {name}", "code": 404}}, 404)
        text = resources.files("orchestrator.gateway").joinpath(f"static/{name}").read_bytes()
        return Response(text, media_type=STATIC[name], headers={"X-Content-Type-Options": "nosniff",
                                                                "Cache-Control": "no-cache"})

    async def api_state(self, request: Request) -> Response:
        if (denied := self.denied(request)) is not None:
            return denied
        return self.answer(self.state())

    def _server(self, request: Request) -> str | Response:
        name = request.path_params["name"]
        if name not in self.gw.sched.entries:
            names = ", ".join(sp.name for sp in self.gw.plan.servers)
            return self.answer({"error": {"message": f"no server {name!r} in this deployment; servers: {names}",
                                          "code": 404}}, 404)
        return str(name)

    async def api_server(self, request: Request) -> Response:
        if (denied := self.denied(request)) is not None:
            return denied
        name = self._server(request)
        return name if isinstance(name, Response) else self.answer(self.detail(name))

    async def api_plot(self, request: Request) -> Response:
        if (denied := self.denied(request)) is not None:
            return denied
        name = self._server(request)
        if isinstance(name, Response):
            return name
        path = self.results_path()
        from orchestrator.measure.bench import saved

        runs = [e for e in saved(path, "bench") if e.get("profile") == self.gw.plan.name] if path else []
        index = request.query_params.get("run", "")
        if not index.isdigit() or int(index) >= len(runs):
            return self.answer({"error": {"message": f"no saved bench run {index!r} for {name}: see "
                                          "bench[].index in /ui/api/server/NAME", "code": 404}}, 404)
        svg = redact(bench_svg(runs[int(index)], name), self.secrets())
        return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store",
                                                                  "Content-Security-Policy": "default-src 'none'"})

    def cross_site(self, request: Request) -> Response | None:
        """An action must come from the page: a JSON body type (a form cannot send it without a CORS
        preflight, which this gateway never grants) and no Origin other than the gateway's own."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if ctype != "application/json" or (origin is not None and origin not in (f"http://{host}",
                                                                                 f"https://{host}")):
            return self.answer({"error": {"message": "actions take Content-Type: application/json from the "
                                          "dashboard's own origin", "code": 403}}, 403)
        return None

    async def api_action(self, request: Request) -> Response:
        if (denied := self.denied(request)) is not None:
            return denied
        if (refused := self.cross_site(request)) is not None:
            return refused
        name = self._server(request)
        if isinstance(name, Response):
            return name
        action = request.path_params["action"]
        e = self.gw.sched.entries[name]
        if e.spec.start != "on_demand":
            return self.answer({"error": {"message": f"{name} is a start: always server: up and down start and "
                                          "stop it, not the dashboard", "code": 409}}, 409)
        if action == "start":
            if e.state in ("running", "loading"):
                return self.answer({"server": name, "state": e.state})
            try:
                waiter = self.gw.sched.enqueue(name)
            except Rejected as exc:
                return self.answer({"error": {"message": exc.message, "code": exc.status, **exc.extra}},
                                   exc.status)
            self.ring.add(name, "start asked", "from the dashboard")
            self._spawn(self._hold_then_release(name, waiter))
            return self.answer({"server": name, "state": e.state}, 202)
        if action == "stop":
            why = self.gw.sched.stop(name, "dashboard")
            if why:
                return self.answer({"error": {"message": why, "code": 409}}, 409)
            self.ring.add(name, "stop asked", "from the dashboard")
            return self.answer({"server": name, "state": e.state}, 202)
        return self.answer({"error": {"message": f"unknown action {action!r}: start or stop", "code": 404}}, 404)

    def _spawn(self, coro: Any) -> None:
        import asyncio

        task = asyncio.get_running_loop().create_task(coro)
        self.actions.add(task)
        task.add_done_callback(self.actions.discard)

    async def _hold_then_release(self, name: str, waiter: Any) -> None:
        """A start asked from the page is a request that holds no slot once the server is up."""
        try:
            await self.gw.sched.wait(name, waiter)
        except Rejected:
            return            # the failure is on the server's card (its state and cause)
        self.gw.sched.release(name)

    def routes(self) -> list[Route]:
        return [Route("/", self.page, methods=["GET"]),
                Route("/ui/static/{file}", self.static, methods=["GET"]),
                Route("/ui/api/state", self.api_state, methods=["GET"]),
                Route("/ui/api/server/{name}", self.api_server, methods=["GET"]),
                Route("/ui/api/server/{name}/bench.svg", self.api_plot, methods=["GET"]),
                Route("/ui/api/server/{name}/{action}", self.api_action, methods=["POST"])]
