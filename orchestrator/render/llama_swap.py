"""The llama-swap target: a config that starts each server on demand with the planned command."""

from __future__ import annotations

import shlex
from typing import Any

from orchestrator.errors import UNSAFE_CHARS, OrchestratorError, shown
from orchestrator.plan.model import Plan, ServerPlan, client_host

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


def _literal(s: ServerPlan, values: list[str]) -> None:
    """llama-swap expands ${...} macros (${env.VAR} included) in cmd and env, and splits cmd into lines
    before it splits words: a value holding either would run something else than the plan."""
    for value in values:
        if "${" in value or UNSAFE_CHARS.search(value):
            raise OrchestratorError(f"server {s.name}: {shown(value)} holds a '${{' macro or a control character, "
                                    "which llama-swap would expand or split",
                                    "remove it from the profile, or use another target")


def _model(s: ServerPlan) -> dict[str, Any]:
    assert s.health is not None
    argv = _argv(s)
    env = [f"{e.name}={e.value}" for e in s.env if not e.from_env]
    for e in s.env:   # a reference: the upstream inherits llama-swap's environment, so only VAR=${VAR} works
        if e.from_env and e.name != e.from_env and not (s.api_key and e.from_env == s.api_key.env_var):
            raise OrchestratorError(f"server {s.name}: env {e.name} takes ${e.from_env}, which llama-swap cannot "
                                    "pass under another name", f"write {e.name}: '${{{e.name}}}' and export {e.name}")
    _literal(s, [*argv, *env])
    # The upstream binds its private address (loopback), and llama-swap proxies to that same address.
    entry: dict[str, Any] = {"cmd": shlex.join(argv), "proxy": f"http://{client_host(s.private_host)}:{s.port}",
                             "checkEndpoint": s.health.ready_path, "ttl": LLAMA_SWAP_TTL_S}
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
