"""The gateway as a container service of the compose and k8s targets: its image (built here by
`orchestrate engines image gateway`) serves the plan it is given as /etc/orchestrator/plan.json, a copy of
the Plan in which each server's host is the name the platform gives its service and the gateway binds
every address inside its container. Keys travel by reference only: the gateway's and each upstream's."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import GatewayPlan, Plan, container_name

PLAN_DIR = "/etc/orchestrator"
PLAN_PATH = f"{PLAN_DIR}/plan.json"
SERVICE = "gateway"
# What the gateway never reads: how each server was planned (its flags, estimate, mounts, environment).
_UNUSED = ("flags", "argv", "estimate", "executable", "warnings", "notes", "mounts", "env")


def gateway_plan_json(plan: Plan, hosts: dict[str, str]) -> str:
    """The plan the gateway's container serves: servers reached at `hosts` (server -> service name)."""
    data = plan.to_dict()
    data["warnings"], data["gpus"] = [], []
    for server in data["servers"]:
        server["host"] = hosts[server["name"]]
        for key in _UNUSED:
            server.pop(key, None)
    data["gateway"]["host"] = "0.0.0.0"  # noqa: S104 (inside its container; published on the planned address)
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def require_gateway_image(gw: GatewayPlan) -> str:
    if not gw.image:
        raise OrchestratorError("the gateway has no container image", "set gateway.image in the profile")
    return gw.image


def check_names(plan: Plan) -> None:
    if any(s.name == SERVICE for s in plan.servers):
        raise OrchestratorError(f"a server is named {SERVICE!r}, the name of the gateway's service",
                                "rename that server")


def upstream_keys(plan: Plan) -> list[str]:
    """The variables that hold the servers' API keys, which the gateway sends upstream."""
    return sorted({s.api_key.env_var for s in plan.servers if s.api_key})


def k8s_gateway_docs(plan: Plan) -> list[dict[str, Any]]:
    """A ConfigMap holding plan.json, a Deployment and a Service for the gateway."""
    gw = plan.gateway
    assert gw is not None
    check_names(plan)
    name = container_name(plan.name, SERVICE)
    labels = {"app.kubernetes.io/name": SERVICE, "app.kubernetes.io/instance": name,
              "app.kubernetes.io/part-of": plan.name, "app.kubernetes.io/managed-by": "orchestrator"}
    hosts = {s.name: container_name(plan.name, s.name) for s in plan.servers}
    env: list[dict[str, Any]] = []
    if gw.api_key_env:
        env.append({"name": gw.api_key_env,
                    "valueFrom": {"secretKeyRef": {"name": f"{name}-api-key", "key": "api-key"}}})
    for s in plan.servers:
        if s.api_key and s.api_key.env_var not in {e["name"] for e in env}:
            env.append({"name": s.api_key.env_var, "valueFrom": {"secretKeyRef": {
                "name": f"{container_name(plan.name, s.name)}-api-key", "key": "api-key"}}})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 5}
    container: dict[str, Any] = {
        "name": SERVICE, "image": require_gateway_image(gw), "args": ["--plan", PLAN_PATH],
        "ports": [{"name": "http", "containerPort": gw.port, "protocol": "TCP"}]}
    if env:
        container["env"] = env
    container.update({"startupProbe": {**probe, "failureThreshold": 24},
                      "readinessProbe": {**probe, "failureThreshold": 3},
                      "livenessProbe": {**probe, "periodSeconds": 15, "failureThreshold": 4},
                      "volumeMounts": [{"name": "plan", "mountPath": PLAN_DIR, "readOnly": True}],
                      "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                                          "runAsUser": 65534, "runAsGroup": 65534}})
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-plan", "labels": labels},
         "data": {"plan.json": gateway_plan_json(plan, hosts)}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "terminationGracePeriodSeconds": 10, "containers": [container],
                      "volumes": [{"name": "plan", "configMap": {"name": f"{name}-plan"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
         "spec": {"selector": {"app.kubernetes.io/instance": name},
                  "ports": [{"name": "http", "port": gw.port, "targetPort": "http", "protocol": "TCP"}]}},
    ]
