"""The gateway's dashboard without an engine: the state JSON (servers, states, a failed start's cause,
budgets, events, speed from answers, sections from the metric registry), the server detail (flags with
reasons, redacted log, saved bench runs and their SVG), actions (on_demand only, JSON only, no foreign
origin), and auth: 401 without the key, no key value in any answer. The same page in a real browser in
front of real llama-server processes: tests/e2e/test_dashboard.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import Counter
from starlette.testclient import TestClient

from orchestrator.gateway.app import Gateway, create_app
from orchestrator.gateway.backend import DeployerBackend
from orchestrator.gateway.dashboard import Dashboard, answered, bench_svg, redact, speed
from orchestrator.gateway.metrics import Metrics
from orchestrator.gateway.scheduler import StartOutcome
from orchestrator.measure.bench import results_file, save
from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text
from orchestrator.runtime.deployer import Deployer
from orchestrator.runtime.state import StateStore
from tests.unit.test_gateway_profile import gemma_path

GW_KEY, UP_KEY = "sk-gw-Zq81xVt9aaQQ", "sk-up-Lm27pWz4bbRR"


class Scripted(DeployerBackend):
    """The deployer's backend with starts and stops scripted (no engine in unit tests)."""

    def __init__(self, plan: Any, deployer: Deployer) -> None:
        super().__init__(plan, deployer)
        self.up: set[str] = set()

    async def start(self, name: str) -> StartOutcome:
        if name == "b":            # what the deployer reports while it waits for the health stages
            self.deployer.progress(name, "ready", "503 loading model")
            self.deployer.meter(name, "health", 3.0, 60.0, "s", "stage ready")
            await asyncio.sleep(0.4)
        await asyncio.sleep(0.05)
        if name == "c":
            return StartOutcome(False, f"exit 1: invalid value for -fa (key {UP_KEY})", "ready", "bad_flag",
                                "remove the option or give a value the engine accepts")
        self.up.add(name)
        return StartOutcome(True, "started", elapsed_s=0.05)

    async def stop(self, name: str, reason: str) -> None:
        self.up.discard(name)

    def alive(self, name: str) -> bool:
        return name in self.up

    def running(self) -> tuple[set[str], set[str]]:
        return set(), set()


def profile_text(port: int = 9300) -> str:
    g = gemma_path()
    return (f"name: dash\nhardware: {{gpu: cpu}}\ngateway: {{port: {port}, api_key_env: GW_KEY}}\nservers:\n"
            f"  - name: a\n    engine: llama.cpp\n    model: {{path: {g}, served_name: gemma-a}}\n    port: 9301\n"
            f"  - name: b\n    engine: llama.cpp\n    model: {{path: {g}, served_name: gemma-b}}\n    port: 9302\n"
            f"    start: on_demand\n    idle_timeout: 600\n    api_key_env: UP_KEY\n"
            f"  - name: c\n    engine: llama.cpp\n    model: {{path: {g}, served_name: gemma-c}}\n    port: 9303\n"
            f"    start: on_demand\n")


@dataclass
class Rig:
    client: TestClient
    dash: Dashboard
    store: StateStore
    bodies: list[str] = field(default_factory=list)

    def get(self, path: str, key: str | None = GW_KEY, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = self.client.get(path, headers=headers, **kw)
        self.bodies.append(r.text)
        return r

    def post(self, path: str, key: str | None = GW_KEY, json_body: bool = True, **headers: str) -> Any:
        h = {"Authorization": f"Bearer {key}"} if key else {}
        h.update(headers)
        if json_body:
            r = self.client.post(path, headers=h, json={})
        else:
            r = self.client.post(path, headers=h, data={"x": "1"})
        self.bodies.append(r.text)
        return r

    def server(self, name: str) -> dict[str, Any]:
        state = self.get("/ui/api/state").json()
        return next(s for s in state["servers"] if s["name"] == name)

    def wait_state(self, name: str, want: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.server(name)
            if s["state"] == want:
                return s
            time.sleep(0.05)
        raise AssertionError(f"{name} never reached {want}: {self.server(name)}")


@pytest.fixture
def rig(tmp_path: Path):
    environ = {"GW_KEY": GW_KEY, "UP_KEY": UP_KEY, "HOME": "/home/user", "ORCHESTRATOR_STATE_DIR": str(tmp_path)}
    plan = build_plan(load_text(profile_text(), "dash.yaml"), detect=False, environ=environ)
    store = StateStore(tmp_path)
    store.ensure()
    deployer = Deployer(store, environ)
    gateway = Gateway(plan, Scripted(plan, deployer), GW_KEY, Metrics(log=open("/dev/null", "w")))  # noqa: SIM115
    app = create_app(gateway)
    dash = next(h for h in gateway.hooks if isinstance(h, Dashboard))
    with TestClient(app) as client:
        r = Rig(client, dash, store)
        yield r
        for body in r.bodies:                      # no answer of any test carries a key
            assert GW_KEY not in body and UP_KEY not in body


def test_without_the_key_page_and_data_are_401_and_hold_no_data(rig: Rig) -> None:
    page = rig.get("/", key=None)
    assert page.status_code == 401 and "<script src=\"/ui/static/app.js\"" in page.text
    assert "gemma" not in page.text and "dash" not in page.text          # the shell only
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert rig.get("/", key="sk-wrong").status_code == 401
    assert rig.get("/", key=GW_KEY).status_code == 200
    for path in ("/ui/api/state", "/ui/api/server/a", "/ui/api/server/a/bench.svg?run=0"):
        r = rig.get(path, key=None)
        assert r.status_code == 401 and "gemma" not in r.text, path
    assert rig.post("/ui/api/server/b/start", key=None).status_code == 401
    assert rig.get("/ui/static/app.js", key=None).status_code == 200      # code, no data
    assert rig.get("/ui/static/../dashboard.py", key=None).status_code == 404


def test_state_lists_every_server_with_engine_model_budget_and_actions(rig: Rig) -> None:
    state = rig.get("/ui/api/state").json()
    assert state["deployment"] == "dash" and state["gateway"]["auth"] is True
    by = {s["name"]: s for s in state["servers"]}
    assert list(by) == ["a", "b", "c"]
    a = by["a"]
    assert a["engine"] == "llama.cpp" and a["version"] and a["model"] == gemma_path().name
    assert a["served_name"] == "gemma-a" and a["where"]["device"] == "CPU" and a["where"]["runtime"] == "process"
    assert a["planned"]["RAM"] > 100 * 2**20 and a["actions"] == []           # always: up/down own it
    assert by["b"]["actions"] == ["start"] and by["b"]["state"] == "stopped"
    ram = next(b for b in state["budgets"] if b["resource"] == "RAM")
    assert ram["planned_bytes"] == a["planned"]["RAM"]                        # only the always server counts
    assert set(ram["per_server"]) == {"a", "b", "c"}


def test_start_and_stop_on_demand_from_the_dashboard_and_the_events(rig: Rig) -> None:
    assert rig.post("/ui/api/server/b/start", json_body=False).status_code == 403      # a form's body
    assert rig.post("/ui/api/server/b/start", Origin="http://evil.example").status_code == 403
    assert rig.post("/ui/api/server/a/start").status_code == 409
    assert rig.post("/ui/api/server/nope/start").status_code == 404
    r = rig.post("/ui/api/server/b/start", Origin="http://testserver")
    assert r.status_code == 202, r.text
    loading = rig.wait_state("b", "loading")["loading"]
    assert loading["step"] == "health" and loading["done"] == 3.0 and loading["total"] == 60.0
    assert loading["detail"] == "stage ready" and rig.server("b")["actions"] == []
    b = rig.wait_state("b", "running")
    assert b["actions"] == ["stop"] and b["inflight"] == 0                    # the start holds no slot
    assert "b" not in rig.dash.progress                                        # the next start shows its own
    assert rig.post("/ui/api/server/b/stop").status_code == 202
    rig.wait_state("b", "stopped")
    assert rig.post("/ui/api/server/b/stop").status_code == 409               # not running
    kinds = [(e["server"], e["kind"]) for e in rig.get("/ui/api/state").json()["events"]]
    assert kinds == [("b", "start asked"), ("b", "started"), ("b", "stop asked"), ("b", "stopped")]


def test_a_failed_start_shows_stage_cause_and_fix_without_the_key(rig: Rig) -> None:
    assert rig.post("/ui/api/server/c/start").status_code == 202
    c = rig.wait_state("c", "failed")
    f = c["failure"]
    assert f["stage"] == "ready" and f["cause"] == "bad_flag" and "remove the option" in f["fix"]
    assert "invalid value for -fa" in f["detail"] and "[redacted]" in f["detail"]
    assert c["actions"] == ["start"]
    events = rig.get("/ui/api/state").json()["events"]
    assert events[-1]["kind"] == "start failed" and "bad_flag" in events[-1]["detail"]


def test_speed_from_answers_and_sections_from_the_registry(rig: Rig) -> None:
    t0 = time.perf_counter() - 0.5
    for prompt_ms in (40.0, 60.0, 80.0):
        rig.dash.finished(SimpleNamespace(name="a", t0=t0), 200, {
            "usage": {"completion_tokens": 30}, "timings": {"prompt_ms": prompt_ms, "predicted_per_second": 50.0}})
    rig.dash.finished(SimpleNamespace(name="a", t0=t0), 502, None)
    a = rig.server("a")["speed"]
    assert a["requests"] == 4 and a["errors"] == 1 and a["tokens_per_s"] == 1.5   # 90 tokens / 60 s
    assert a["ttft_ms_p50"] == 60.0 and a["decode_tps_p50"] == 50.0 and 400 < a["latency_ms_p50"] < 5000
    assert rig.get("/ui/api/state").json()["sections"] == {}
    routes = Counter("gateway_route_decisions", "route decisions", ["tier"], registry=rig.dash.gw.metrics.registry)
    routes.labels("small").inc(3)
    sections = rig.get("/ui/api/state").json()["sections"]
    assert sections["routes"] == [{"metric": "gateway_route_decisions_total", "labels": {"tier": "small"},
                                   "value": 3.0}]


def test_speed_window_and_answer_shapes() -> None:
    now = 1000.0
    old = answered("a", 200, 1.0, {"usage": {"completion_tokens": 600}}, now=now - 120)
    ik = answered("a", 200, 1.0, {"timings": {"predicted_n": 12, "prompt_ms": 9.5}}, now=now - 1)
    assert ik.completion_tokens == 12 and ik.prompt_ms == 9.5 and ik.decode_tps is None
    figures = speed([old, ik], now)
    assert figures["requests"] == 1 and figures["tokens_per_s"] == 0.2


def test_detail_has_flags_with_reasons_redacted_log_and_saved_bench_with_plot(rig: Rig) -> None:
    log = rig.store.log_path("dash", "a")
    log.write_text("main: loading model\n"
                   f"srv  params: api key {GW_KEY} given\n"
                   "request: Authorization: Bearer sk-live-AAAABBBBCCCCDDDD\n"
                   "main: server is listening\n")

    @dataclass
    class Saved:
        d: dict[str, Any]

        def as_dict(self) -> dict[str, Any]:
            return self.d

    levels = [{"concurrency": c, "throughput_tps": 20.0 * c, "decode_tps": 20.0, "ttft_ms": 50.0 * c,
               "itl_ms": 40.0, "errors": 0} for c in (1, 2, 4)]
    save(results_file(str(rig.store.root)), "dash", [Saved({"server": "a", "levels": levels})])
    save(results_file(str(rig.store.root)), "other", [Saved({"server": "a", "levels": levels})])
    d = rig.get("/ui/api/server/a").json()
    assert any(f["reason"] for f in d["flags"]) and all("reason" in f for f in d["flags"])
    assert any(line.startswith("server a:") for line in d["explain"])
    assert d["log"][0] == "main: loading model" and d["log"][-1] == "main: server is listening"
    assert "[redacted]" in d["log"][1] and "sk-live" not in "".join(d["log"])
    assert len(d["bench"]) == 1 and d["bench"][0]["results"][0]["levels"][2]["concurrency"] == 4   # not "other"'s
    svg = rig.get(f"/ui/api/server/a/bench.svg?run={d['bench'][0]['index']}")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert svg.text.startswith("<svg") and svg.text.count("<circle") == 6 and "80.0" in svg.text
    assert rig.get("/ui/api/server/a/bench.svg?run=7").status_code == 404
    assert rig.get("/ui/api/server/zz").status_code == 404


def test_redact_and_svg_escape() -> None:
    text = redact("x --api-key abc123 y; api_key=\"qqqqqqqq\"; hf_ABCDEFGHijkl; token: zz9zz9 ok; mine SECRETVALUE; "
                  "Authorization: Bearer plainkey99",
                  ["SECRETVALUE"])
    assert text == ("x --api-key [redacted] y; api_key=\"[redacted]\"; [redacted]; token: [redacted] ok; mine "
                    "[redacted]; Authorization: Bearer [redacted]")
    for kept in ("control-looking token:    1 '</s>'", "on a 512-token window keep", "bearer of news"):
        assert redact(kept, []) == kept
    assert redact("a sk-abcdefgh1234 key", [], shapes=False) == "a sk-abcdefgh1234 key"
    svg = bench_svg({"time": "<t>", "servers": [{"server": "<b>", "levels": []}]}, "<b>")
    assert "<b>" not in svg and "&lt;b&gt;" in svg and "no data" in svg
