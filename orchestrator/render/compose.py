"""The compose target: one service per server, as data (written by render() with yaml.safe_dump)."""

from __future__ import annotations

from typing import Any

from orchestrator.plan.model import (
    L_ENGINE,
    L_HEALTH,
    L_HOST,
    L_MODEL,
    L_PORT,
    L_PROFILE,
    L_SERVER,
    Plan,
    ServerPlan,
    container_name,
)
from orchestrator.render.common import STOP_GRACE_S, container_entry, env_need, publish, require_image, require_key
from orchestrator.render.gateway import (
    PLAN_PATH,
    SERVICE,
    check_names,
    gateway_plan_json,
    require_gateway_image,
)


class Interpolated(str):
    """A ${VAR} reference compose is meant to interpolate; every other string has its $ escaped."""


def _dollar(value: str) -> str:
    """Escape literal $ for compose interpolation."""
    return value.replace("$", "$$")


def escape_all(node: Any) -> Any:
    """Every string of the compose document with $ escaped as $$, except the Interpolated references:
    compose interpolates $ in every value (image, volumes, labels, command), so escaping is done
    once, over the whole document, rather than field by field."""
    if isinstance(node, Interpolated):
        return str(node)
    if isinstance(node, str):
        return _dollar(node)
    if isinstance(node, dict):
        return {k: escape_all(v) for k, v in node.items()}
    if isinstance(node, list):
        return [escape_all(v) for v in node]
    return node


def _probe_cmd(s: ServerPlan, tool: str) -> list[str]:
    assert s.health is not None
    url = f"http://127.0.0.1:{s.port}{s.health.ready_path}"
    if tool == "curl":
        return ["CMD", "curl", "-fsS", "-o", "/dev/null", url]
    code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=5)"
    return ["CMD", "python3", "-c", code]


def compose_healthcheck(s: ServerPlan) -> dict[str, Any]:
    """Probe every interval (also during start_period, whose failures do not count) and allow the
    planned load time: the start period is the health timeout, derived from the model size. An image
    whose contents the catalog does not know (probe_tool "image") keeps its own HEALTHCHECK test."""
    assert s.health is not None
    test = {} if s.probe_tool == "image" else {"test": _probe_cmd(s, s.probe_tool)}
    return {**test, "interval": f"{s.health.interval_s}s", "timeout": "5s", "retries": 3,
            "start_period": f"{s.health.timeout_s}s"}


def _gpu_keys(s: ServerPlan) -> dict[str, Any]:
    """The service keys that give it its GPUs: an NVIDIA device request, or device nodes and their groups."""
    gpu = s.gpu_access()
    out: dict[str, Any] = {}
    if gpu.nvidia:
        dev: dict[str, Any] = {"driver": "nvidia", "capabilities": ["gpu"]}
        if gpu.device_ids is None:
            dev["count"] = "all"
        else:
            dev["device_ids"] = [str(i) for i in gpu.device_ids]
        out["deploy"] = {"resources": {"reservations": {"devices": [dev]}}}
    if gpu.devices:
        out["devices"] = list(gpu.devices)
    if gpu.groups:
        out["group_add"] = list(gpu.groups)
    return out


def _environment(s: ServerPlan) -> dict[str, str]:
    return {e.name: Interpolated(require_key(e.from_env, env_need(s, e.from_env))) if e.from_env else (e.value or "")
            for e in s.env if not e.process_only}


def _labels(plan: Plan, s: ServerPlan) -> dict[str, str]:
    """The labels the docker runtime sets too: `orchestrate status` shows these containers."""
    assert s.health is not None
    return {L_PROFILE: plan.name, L_SERVER: s.name, L_ENGINE: f"{s.engine} {s.engine_version}", L_HOST: s.host,
            L_PORT: str(s.port), L_HEALTH: s.health.ready_path, L_MODEL: s.served_name}


def _service(plan: Plan, s: ServerPlan, secrets: dict[str, Any]) -> dict[str, Any]:
    """One server's service; its API key secret (if any) is added to `secrets`."""
    require_image(s)
    entry, command = container_entry(s)
    svc: dict[str, Any] = {"image": s.image, "container_name": container_name(plan.name, s.name)}
    if entry:
        svc["entrypoint"] = entry
    svc["command"] = command
    svc["ports"] = [publish(s)]
    env = _environment(s)
    if env:
        svc["environment"] = env
    if s.mounts:
        svc["volumes"] = [{"type": "bind", "source": m.host_path, "target": m.container_path,
                           "read_only": m.read_only} for m in s.mounts]
    if s.api_key and s.api_key.mechanism in ("file", "config"):
        name = f"{s.name}-api-key"
        svc["secrets"] = [{"source": name, "target": "api_key"}]
        secrets[name] = {"environment": s.api_key.env_var}
    svc.update(_gpu_keys(s))
    if s.shm_size:
        svc["shm_size"] = s.shm_size
    svc["healthcheck"] = compose_healthcheck(s)
    if s.depends_on:
        svc["depends_on"] = {d: {"condition": "service_healthy"} for d in s.depends_on}
    svc["init"] = True
    svc["restart"] = "unless-stopped"
    svc["stop_grace_period"] = f"{STOP_GRACE_S}s"
    svc["labels"] = _labels(plan, s)
    return svc


def _gateway_service(plan: Plan) -> dict[str, Any]:
    """The gateway's service: its image, the plan it serves (the compose config NAME-plan), its port
    published on the planned address, its key and each upstream's by reference, after every server is
    healthy."""
    gw = plan.gateway
    assert gw is not None
    host = f"[{gw.host}]" if ":" in gw.host else gw.host
    svc: dict[str, Any] = {"image": require_gateway_image(gw), "container_name": container_name(plan.name, SERVICE),
                           "command": ["--plan", PLAN_PATH], "ports": [f"{host}:{gw.port}:{gw.port}"]}
    env: dict[str, str] = {}
    if gw.api_key_env:
        env[gw.api_key_env] = Interpolated(require_key(gw.api_key_env, "the key clients of the gateway send"))
    for s in plan.servers:
        if s.api_key:
            env[s.api_key.env_var] = Interpolated(require_key(s.api_key.env_var, f"{s.name}'s API key"))
    if env:
        svc["environment"] = env
    svc["configs"] = [{"source": f"{SERVICE}-plan", "target": PLAN_PATH, "mode": 0o444}]
    svc["depends_on"] = {s.name: {"condition": "service_healthy"} for s in plan.servers}
    # the image's own HEALTHCHECK (GET /health on the port of the plan it serves); compose sets the timings
    svc["healthcheck"] = {"interval": "2s", "timeout": "5s", "retries": 3, "start_period": "60s"}
    svc["init"] = True
    svc["restart"] = "unless-stopped"
    svc["stop_grace_period"] = "10s"
    svc["labels"] = {"orchestrator.gateway-of": plan.name}   # not orchestrator.profile: status lists servers
    return svc


def compose_data(plan: Plan) -> dict[str, Any]:
    secrets: dict[str, Any] = {}
    services = {s.name: _service(plan, s, secrets) for s in plan.servers}
    doc: dict[str, Any] = {"name": plan.name, "services": services}
    if plan.gateway is not None:
        check_names(plan)
        services[SERVICE] = _gateway_service(plan)
        doc["configs"] = {f"{SERVICE}-plan": {"content": gateway_plan_json(plan, {s.name: s.name
                                                                                   for s in plan.servers})}}
    if secrets:
        doc["secrets"] = secrets
    return dict(escape_all(doc))
