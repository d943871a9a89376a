"""The deployer over the Runtime interface (runtime/base.py), with a runtime of the test's own that serves
the health stages from a thread; the container spec's GPU access; the settings the health stage checks."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator.plan.model import HardwareSummary, HealthSpec, Plan, ServerPlan, Settings
from orchestrator.runtime.base import (
    Found,
    Launched,
    Prepared,
    Reconciled,
    Runtime,
    UpResult,
    api_url,
    new_record,
    plan_hash,
)
from orchestrator.runtime.deployer import Deployer
from orchestrator.runtime.health import planned_settings
from orchestrator.runtime.state import ServerRecord, StateStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


HARDWARE = HardwareSummary("cpu", "CPU", 0, "test", "x86_64", None, 0.0)


def server_plan(**kw: Any) -> ServerPlan:
    base: dict[str, Any] = dict(
        name="s", engine="llama.cpp", engine_display="llama.cpp", engine_version="b1", engine_reason="test",
        runtime="fake", accelerator="cpu", image=None, image_reason="", host="127.0.0.1", port=free_port(),
        served_name="m", model_location="/models/m.gguf", model_format="gguf", model_is_hf=False, model_pypi=None,
        binary=None, gpu_ids=None, gpu_count=0, command=["llama-server"], container_command=["/app/llama-server"],
        health=HealthSpec("/health", "/v1/models", "/props", None, 10, 1, "test"),
        settings=Settings(context=4096, slots=2, kv_cache="f16"))
    base.update(kw)
    return ServerPlan(**base)


class Engine(ThreadingHTTPServer):
    """What the health stages ask a llama-server, answered as planned."""

    daemon_threads = True

    def __init__(self, sp: ServerPlan, n_ctx: int) -> None:
        served, slots = sp.served_name, sp.settings.slots if sp.settings else 1

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.answer({"/health": {"status": "ok"}, "/v1/models": {"data": [{"id": served}]},
                             "/props": {"default_generation_settings": {"n_ctx": n_ctx}, "total_slots": slots}
                             }.get(self.path, {}))

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer({"choices": [{"text": "!"}]})

        super().__init__((sp.host, sp.port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


class FakeFound(Found):
    def __init__(self, rt: FakeRuntime, deployment: str, server: str) -> None:
        self.rt, self.deployment, self.server, self.instance = rt, deployment, server, f"lost-{server}"

    def row(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "server": self.server, "state": "running, no state record"}

    def remove(self) -> str:
        self.rt.lost.remove((self.deployment, self.server))
        return "stopped (lost)"

    def save_log(self) -> None:
        self.rt.calls.append(f"save_log {self.server}")


class FakeRuntime(Runtime):
    name = "fake"

    def __init__(self, host: Deployer, n_ctx: int | None = None) -> None:
        super().__init__(host)
        self.n_ctx = n_ctx
        self.engines: dict[str, Engine] = {}
        self.lost: list[tuple[str, str]] = []
        self.calls: list[str] = []

    def preflight(self, sp: ServerPlan) -> Prepared:
        self.calls.append("preflight")
        return Prepared(plan_hash(sp, "fake-engine"), self.host.api_key(sp), "fake-engine")

    def retire(self, deployment: str, rec: ServerRecord, successor: str) -> bool:
        self.calls.append(f"retire for {successor}")
        return self.stop(deployment, rec.server, rec) == "stopped"

    def reconcile(self, plan: Plan, sp: ServerPlan, prep: Prepared, existing: ServerRecord | None,
                  log_path: Path) -> Reconciled:
        if existing is not None and sp.name in self.engines:
            if existing.plan_hash == prep.hash:
                return Reconciled(UpResult(sp.name, "already running", "fake", url=api_url(sp), log=existing.log))
            self.stop(plan.name, sp.name, existing)
            return Reconciled(restarted=True)
        return Reconciled()

    def start(self, plan: Plan, sp: ServerPlan, prep: Prepared, log_path: Path) -> Launched:
        self.calls.append("start")
        settings = sp.settings
        assert settings is not None
        self.engines[sp.name] = engine = Engine(sp, settings.context if self.n_ctx is None else self.n_ctx)
        rec = new_record(plan, sp, prep, log_path, pid=0, pgid=0, create_time=0.0, binary=prep.binary, argv=[],
                         runtime=self.name)
        return Launched(rec, lambda: None, f"fake on {sp.port}", engine)

    def abort(self, launched: Launched, detail: str) -> str:
        self.stop(launched.rec.profile, launched.rec.server, launched.rec)
        return detail + " (fake stopped)"

    def settle(self, launched: Launched) -> None:
        self.calls.append("settle")

    def stop(self, deployment: str, server: str, rec: ServerRecord) -> str:
        engine = self.engines.pop(server, None)
        if engine is None:
            return "not running"
        engine.shutdown()
        engine.server_close()
        return "stopped"

    def alive(self, rec: ServerRecord) -> bool:
        return rec.server in self.engines

    def host_pid(self, rec: ServerRecord) -> int | None:
        return None

    def status_row(self, deployment: str, server: str, rec: ServerRecord) -> dict[str, Any]:
        return {"deployment": deployment, "server": server, "state": "up" if self.alive(rec) else "down"}

    def discover(self, deployment: str | None = None) -> list[Found]:
        return [FakeFound(self, d, s) for d, s in self.lost if deployment in (None, d)]


@pytest.fixture
def deployer(tmp_path: Path):
    events: list[tuple[str, str, str]] = []
    d = Deployer(StateStore(tmp_path / "state"), environ={},
                 progress=lambda server, event, detail: events.append((server, event, detail)))
    d.runtimes["fake"] = FakeRuntime(d)
    d.events = events  # type: ignore[attr-defined]
    yield d
    for engine in d.runtimes["fake"].engines.values():  # type: ignore[attr-defined]
        engine.shutdown()
        engine.server_close()


def test_up_status_down_through_the_runtime_interface(deployer: Deployer, tmp_path: Path) -> None:
    rt: FakeRuntime = deployer.runtimes["fake"]  # type: ignore[assignment]
    sp = server_plan()
    plan = Plan("dep", str(tmp_path / "p.yaml"), HARDWARE, [sp])
    [result] = deployer.up(plan)
    assert result.outcome == "started" and result.detail == f"fake on {sp.port}", result
    assert result.stages == ["process", "port", "ready", "models", "completion", "settings"]
    assert rt.calls == ["preflight", "start", "settle"]
    rec = deployer.store.load("dep")["s"]
    assert (rec.runtime, rec.status, rec.plan_hash) == ("fake", "running", plan_hash(sp, "fake-engine"))
    assert deployer.alive(rec) and deployer.host_pid(rec) is None
    assert ("s", "settings", "n_ctx=4096, total_slots=2") in deployer.events  # type: ignore[attr-defined]

    [again] = deployer.up(plan)
    assert again.outcome == "already running"

    rt.lost.append(("dep", "ghost"))
    rows = deployer.status(["dep"])
    assert [(r["server"], r["state"]) for r in rows] == [("ghost", "running, no state record"), ("s", "up")]
    deployer.refresh_logs("dep")
    assert rt.calls[-1] == "save_log ghost"
    assert sorted(deployer.down("dep")) == [("ghost", "stopped (lost)"), ("s", "stopped")]
    assert deployer.store.load("dep") == {} and not rt.engines and not rt.lost


def test_a_server_of_another_runtime_is_retired_first(deployer: Deployer, tmp_path: Path) -> None:
    """The record of a process that has exited gives way: dropped, nothing signalled, then the new runtime starts."""
    sleeper = subprocess.Popen(["true"])
    sleeper.wait()
    sp = server_plan()
    plan = Plan("dep", str(tmp_path / "p.yaml"), HARDWARE, [sp])
    deployer.store.save("dep", {"s": ServerRecord(
        profile="dep", server="s", engine="llama.cpp", pid=sleeper.pid, pgid=sleeper.pid, create_time=1.0,
        plan_hash="old", host=sp.host, port=sp.port, log="/dev/null", binary="llama-server", argv=[],
        served_name="m", health_path="/health", profile_file="p.yaml")})
    [result] = deployer.up(plan)
    assert result.outcome == "started", result
    assert deployer.store.load("dep")["s"].runtime == "fake"


def test_settings_that_differ_from_the_plan_fail_and_stop_the_server(deployer: Deployer, tmp_path: Path) -> None:
    rt = FakeRuntime(deployer, n_ctx=512)
    deployer.runtimes["fake"] = rt
    plan = Plan("dep", str(tmp_path / "p.yaml"), HARDWARE, [server_plan()])
    [result] = deployer.up(plan)
    assert result.outcome == "failed" and result.stage == "settings"
    assert result.detail == ("effective settings differ from the plan: n_ctx is 512, plan says 4096 (fake stopped)")
    assert deployer.store.load("dep") == {} and not rt.engines


def test_a_taken_port_fails_before_the_runtime_starts_anything(deployer: Deployer, tmp_path: Path) -> None:
    rt: FakeRuntime = deployer.runtimes["fake"]  # type: ignore[assignment]
    sp = server_plan()
    with socket.socket() as s:
        s.bind((sp.host, sp.port))
        s.listen()
        [result] = deployer.up(Plan("dep", str(tmp_path / "p.yaml"), HARDWARE, [sp]))
    assert result.outcome == "failed" and result.stage == "preflight" and result.cause == "port_in_use"
    assert result.detail.startswith(f"port {sp.port} on 127.0.0.1 is taken by pid ")
    assert rt.calls == ["preflight"] and deployer.store.load("dep") == {}


def test_unknown_runtime_names_fall_back_to_process(deployer: Deployer) -> None:
    assert deployer._runtime("process").name == "process"
    assert deployer._runtime("docker").name == "docker"
    assert deployer._runtime("something-older") is deployer.runtimes["process"]


@pytest.mark.parametrize("engine,expect", [
    ("llama.cpp", {"n_ctx": 4096, "total_slots": 2}),
    ("ik_llama", {"n_ctx": 4096, "total_slots": 2}),
    ("vllm", {"max_model_len": 4096}),
    ("sglang", {"max_model_len": 4096}),
])
def test_planned_settings_come_from_the_plan_settings(engine: str, expect: dict[str, int]) -> None:
    assert planned_settings(server_plan(engine=engine)) == expect
    assert planned_settings(server_plan(engine=engine, settings=None)) == {}


@pytest.mark.parametrize("accelerator,gpu_ids,gpu_count,expect", [
    ("cuda", None, 2, {"device_requests": [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [],
                                            "Capabilities": [["gpu"]], "Options": {}}]}),
    ("cuda", [1, 3], 2, {"device_requests": [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["1", "3"],
                                              "Capabilities": [["gpu"]], "Options": {}}]}),
    ("rocm", None, 1, {"devices": ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"], "group_add": ["video"]}),
    ("sycl", None, 1, {"devices": ["/dev/dri:/dev/dri:rwm"]}),
    ("cpu", None, 0, {}),
    ("cuda", None, 0, {}),
])
def test_container_gpu_access(accelerator: str, gpu_ids: list[int] | None, gpu_count: int,
                              expect: dict[str, Any]) -> None:
    from orchestrator.runtime import docker as docker_rt

    sp = server_plan(accelerator=accelerator, gpu_ids=gpu_ids, gpu_count=gpu_count, image="img:1")
    kw = docker_rt.create_kwargs("p-s", sp, {}, docker_rt.labels("p", sp, "h", "/p.yaml"), 5)
    got = {k: [dict(v) for v in kw[k]] if k == "device_requests" else kw[k]
           for k in ("device_requests", "devices", "group_add") if k in kw}
    assert got == expect


def test_down_removes_the_key_files_it_started_with(deployer: Deployer, tmp_path: Path) -> None:
    sp = server_plan()
    plan = Plan("dep", str(tmp_path / "p.yaml"), HARDWARE, [sp])
    [result] = deployer.up(plan)
    assert result.outcome == "started"
    keys = deployer.store.key_files("dep", "s")
    for key in keys:   # what ik_llama's --api-key-file and SGLang's --config were written to
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text("secret")
    deployer.down("dep")
    assert not any(k.exists() for k in keys)


def _time_wait_of_a_reuseport_listener() -> int:
    """A port held by nothing but the server side of a closed connection in TIME_WAIT, left by a
    listener that bound with SO_REUSEPORT, as llama-server's cpp-httplib does."""
    import socket

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()              # the server closes first: its side goes to TIME_WAIT
        client.recv(1)
        client.close()
    return port


def test_a_reuseport_server_need_not_wait_out_time_wait() -> None:
    """llama-server binds beside its predecessor's TIME_WAIT connections (SO_REUSEPORT): waiting a
    minute for them to drain made every restart on the same port slow (seen with ik_llama.cpp)."""
    import socket
    import time

    from orchestrator.runtime import process

    port = _time_wait_of_a_reuseport_listener()
    t0 = time.monotonic()
    assert process.port_owner("127.0.0.1", port, drain_s=30, reuseport=True) is None
    assert time.monotonic() - t0 < 5
    said = process.port_owner("127.0.0.1", port, drain_s=1)
    assert said is not None and "TIME_WAIT" in said, "an SO_REUSEADDR server still waits for the drain"
    with socket.socket() as live:    # a live listener is never taken for free, whatever it bound with
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        live.bind(("127.0.0.1", 0))
        live.listen()
        assert process.port_owner("127.0.0.1", live.getsockname()[1], drain_s=1, reuseport=True) is not None
