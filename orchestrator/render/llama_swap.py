"""The llama-swap target: a config that starts each server on demand with the planned command."""

from __future__ import annotations

import shlex
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import Plan, ServerPlan

LLAMA_SWAP_TTL_S = 900   # unload a model after 15 idle minutes (llama-swap's ttl)


def _argv(s: ServerPlan) -> list[str]:
    """The planned command, minus the key file flag: llama-swap is the front door (with the keys), so the
    upstream binds its private (loopback) address."""
    drop = {s.api_key.file_flag} if s.api_key and s.api_key.file_flag else set()
    argv = [*s.command]
    for f in s.flags:
        if f.name == "--host":
            argv += ["--host", s.private_host]
        elif f.name not in drop:
            argv += f.argv()
    return argv


def _model(s: ServerPlan) -> dict[str, Any]:
    assert s.health is not None
    entry: dict[str, Any] = {"cmd": shlex.join(_argv(s)), "proxy": f"http://{s.client_host}:{s.port}",
                             "checkEndpoint": s.health.ready_path, "ttl": LLAMA_SWAP_TTL_S}
    env = [f"{e.name}={e.value}" for e in s.env if not e.from_env]
    if env:
        entry["env"] = env
    if s.served_name != s.name:
        entry["aliases"] = [s.name]
    return entry


def _unique_names(plan: Plan) -> None:
    """llama-swap routes a request by its model name (a served name or an alias): two servers under one
    name would leave one of them unreachable, silently."""
    seen: dict[str, str] = {}
    for s in plan.servers:
        for name in dict.fromkeys([s.served_name, *([s.name] if s.served_name != s.name else [])]):
            other = seen.setdefault(name, s.name)
            if other != s.name:
                raise OrchestratorError(
                    f"servers {other} and {s.name} are both reached as model {name!r}: llama-swap routes requests "
                    "by model name, so one of them would never be served",
                    f"give {s.name} its own model.served_name (or rename the server)")


def llama_swap_data(plan: Plan) -> dict[str, Any]:
    """A llama-swap config: one model per server, started by llama-swap with the planned command. API keys
    move to llama-swap's apiKeys (${env.VAR} references); the upstreams listen on loopback without one."""
    keys: list[str] = []
    for s in plan.servers:
        if s.api_key and f"${{env.{s.api_key.env_var}}}" not in keys:
            keys.append(f"${{env.{s.api_key.env_var}}}")
    _unique_names(plan)
    models = {s.served_name: _model(s) for s in plan.servers}
    doc: dict[str, Any] = {"healthCheckTimeout": max(15, *(s.health.timeout_s for s in plan.servers if s.health))}
    if keys:
        doc["apiKeys"] = keys
    doc["models"] = models
    return doc
