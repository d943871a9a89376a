"""The k8s target: a Deployment (or, for a server across nodes, a LeaderWorkerSet) and a Service per
server, as data (written by render() with yaml.safe_dump)."""

from __future__ import annotations

import math
from typing import Any

from orchestrator.plan.model import Plan, Role, ServerPlan, container_name
from orchestrator.render.common import STOP_GRACE_S, container_entry, require_image
from orchestrator.render.gateway import k8s_gateway_docs

LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"   # set by the LeaderWorkerSet controller on every pod


def _env(s: ServerPlan, secret_name: str, env_secret: str) -> list[dict[str, Any]]:
    """Literal values as value:, the API key from its Secret, and env references (${VAR} in the profile)
    from the Secret DEPLOYMENT--SERVER-env, key VAR."""
    out: list[dict[str, Any]] = []
    for e in s.env:
        if e.process_only:
            continue
        if e.from_env and s.api_key and e.from_env == s.api_key.env_var:
            out.append({"name": e.name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "api-key"}}})
        elif e.from_env:
            out.append({"name": e.name, "valueFrom": {"secretKeyRef": {"name": env_secret, "key": e.from_env}}})
        else:
            out.append({"name": e.name, "value": e.value or ""})
    return out


def _storage(s: ServerPlan, secret_name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container volumeMounts): the model mounts, the API key secret and /dev/shm."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    for i, m in enumerate(s.mounts):
        vol = f"model-{i}"
        if m.k8s_claim:
            volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": m.k8s_claim, "readOnly": m.read_only}})
        else:
            volumes.append({"name": vol, "hostPath": {"path": m.host_path, "type": "Directory"}})
        mounts.append({"name": vol, "mountPath": m.container_path, "readOnly": m.read_only})
    if s.api_key and s.api_key.mechanism in ("file", "config"):
        volumes.append({"name": "api-key", "secret": {"secretName": secret_name, "defaultMode": 0o400,
                                                      "items": [{"key": "api-key", "path": "api_key"}]}})
        mounts.append({"name": "api-key", "mountPath": "/run/secrets", "readOnly": True})
    if s.shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size.upper().replace("G", "Gi")}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _probes(s: ServerPlan) -> dict[str, Any]:
    """Startup (allowing the planned load time), readiness and liveness probes of the API server."""
    assert s.health is not None
    probe = {"httpGet": {"path": s.health.ready_path, "port": "http"}, "periodSeconds": s.health.interval_s,
             "timeoutSeconds": 5}
    return {"startupProbe": {**probe, "failureThreshold": max(1, math.ceil(s.health.timeout_s / s.health.interval_s))},
            "readinessProbe": {**probe, "failureThreshold": 3},
            "livenessProbe": {**probe, "periodSeconds": 15, "timeoutSeconds": 10, "failureThreshold": 6}}


def _k8s_pod(s: ServerPlan, name: str, role: Role) -> dict[str, Any]:
    """The pod spec of one server; for a multi-node server, of its leader (serves the API, probed) or of a
    worker pod (no API server: no port, no HTTP probes)."""
    entry, command = container_entry(s, role)
    secret_name = f"{name}-api-key"
    env = _env(s, secret_name, f"{name}-env")
    volumes, mounts = _storage(s, secret_name)
    container: dict[str, Any] = {"name": s.name if role == "leader" else f"{s.name}-worker", "image": s.image}
    if entry:
        container["command"] = entry
    container["args"] = command
    if role == "leader":
        container["ports"] = [{"name": "http", "containerPort": s.port, "protocol": "TCP"}]
    if env:
        container["env"] = env
    resource = s.gpu_access().k8s_resource
    if resource:
        container["resources"] = {"limits": {resource: s.gpu_count}}
    if role == "leader":
        container.update(_probes(s))
    if mounts:
        container["volumeMounts"] = mounts
    container["securityContext"] = {"allowPrivilegeEscalation": False}
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": STOP_GRACE_S, "containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    return pod


def _workload(s: ServerPlan, name: str, labels: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the Deployment or LeaderWorkerSet of one server, the selector of the pods that serve its API)."""
    if s.nodes == 1:
        selector = {"app.kubernetes.io/instance": name}
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                     "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": labels}, "spec": _k8s_pod(s, name, "leader")}},
        }, selector
    # One group of `nodes` pods is one model instance; a failed pod restarts the whole group
    # (the engine's process group cannot take a member back).
    return {
        "apiVersion": LWS_API, "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 1, "leaderWorkerTemplate": {
            "size": s.nodes, "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": {"metadata": {"labels": {**labels, "role": "leader"}},
                               "spec": _k8s_pod(s, name, "leader")},
            "workerTemplate": {"metadata": {"labels": {**labels, "role": "worker"}},
                               "spec": _k8s_pod(s, name, "worker")}}},
    }, {LWS_NAME_LABEL: name, "role": "leader"}


def k8s_docs(plan: Plan) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for s in plan.servers:
        require_image(s)
        name = container_name(plan.name, s.name)
        labels = {"app.kubernetes.io/name": s.name, "app.kubernetes.io/instance": name,
                  "app.kubernetes.io/part-of": plan.name, "app.kubernetes.io/managed-by": "orchestrator"}
        workload, selector = _workload(s, name, labels)
        docs.append(workload)
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {"selector": selector,
                     "ports": [{"name": "http", "port": s.port, "targetPort": "http", "protocol": "TCP"}]},
        })
    if plan.gateway is not None:
        docs += k8s_gateway_docs(plan)
    return docs
