"""Render a Plan into launch commands, docker run lines, compose files and k8s manifests.

One module per target: shell (command, docker, command JSON: a sandboxed Jinja template, every argument
quoted in Python), compose, k8s and llama_swap. The YAML targets are built as data and written here with
yaml.safe_dump, then parsed back and checked before they are returned. Only the Plan is read: no decision
is re-derived.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import OrchestratorError, one_line
from orchestrator.plan.model import Plan, require_single_node
from orchestrator.render.common import HEADER
from orchestrator.render.compose import compose_data, compose_healthcheck
from orchestrator.render.k8s import k8s_docs
from orchestrator.render.llama_swap import llama_swap_data
from orchestrator.render.shell import command_json, docker_argv, environment, render_shell, templates_dir

__all__ = ["TARGETS", "command_json", "compose_data", "compose_healthcheck", "docker_argv", "env_example",
           "environment", "k8s_docs", "llama_swap_data", "render", "render_shell", "templates_dir"]

TARGETS = ("command", "docker", "compose", "k8s", "llama-swap")


class _Dumper(yaml.SafeDumper):
    """Plain YAML for humans and validators: no &anchors/*aliases for values that repeat."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    """Text of several lines (the gateway's plan.json) as a literal block, as it reads."""
    style = "|" if "\n" in data and data.endswith("\n") and not data.startswith(" ") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def _dump(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


def _yaml_text(plan: Plan, target: str, docs: list[Any]) -> str:
    """The header and each document; a document that does not parse back to itself is a bug here."""
    header = "# " + one_line(HEADER.format(file=plan.profile_file)) + "\n"
    if plan.gateway is not None and target in ("compose", "k8s"):
        gw = plan.gateway
        header += "# " + one_line(f"the gateway runs from the image {gw.image}: build it here with orchestrate "
                                  "engines image gateway") + "\n"
    if target == "k8s":
        text = header + "".join("---\n" + _dump(d) for d in docs)
    else:
        text = header + _dump(docs[0])
    if list(yaml.safe_load_all(text)) != docs:
        raise OrchestratorError(f"{target} output did not round-trip", "report this as a bug")
    return text


def render(plan: Plan, target: str, as_json: bool = False) -> str:
    if target not in TARGETS:
        raise OrchestratorError(f"unknown target {target!r}", f"use one of {', '.join(TARGETS)}")
    if target != "k8s":
        require_single_node(plan.servers, f"--target {target}")
    if plan.gateway is not None and target in ("compose", "k8s"):
        _gateway_limits(plan, target)
    if target == "command" and as_json:
        return command_json(plan)
    if target in ("command", "docker"):
        return render_shell(plan, target)
    if target == "compose":
        return _yaml_text(plan, target, [compose_data(plan)])
    if target == "llama-swap":
        return _yaml_text(plan, target, [llama_swap_data(plan)])
    docs = k8s_docs(plan)
    if any(not s.shm_size for s in plan.servers if s.gpu_count > 1):
        raise OrchestratorError("multi-GPU server without /dev/shm", "report this as a bug")
    return _yaml_text(plan, target, docs)


def _gateway_limits(plan: Plan, target: str) -> None:
    """What a compose file or k8s manifests cannot say about a gateway, said plainly."""
    on_demand = [s.name for s in plan.servers if s.start == "on_demand"]
    what = "Compose starts every service at `docker compose up`" if target == "compose" else \
        "a Deployment keeps its replicas running"
    if on_demand:
        raise OrchestratorError(f"--target {target} cannot express start: on_demand ({', '.join(on_demand)}): {what}; "
                                "nothing in it starts a server when a request for its model arrives, stops it when "
                                "idle or swaps it within a memory budget",
                                "run them with `orchestrate up PROFILE` (its gateway starts on-demand servers as "
                                "processes or containers), render --target llama-swap (it loads models on demand), "
                                "or set start: always")


def env_example(plan: Plan) -> str | None:
    """The .env.example written beside a compose file: every variable it references, without values."""
    names = sorted({e.from_env for s in plan.servers for e in s.env if e.from_env and not e.process_only}
                   | {s.api_key.env_var for s in plan.servers if s.api_key}
                | ({plan.gateway.api_key_env} if plan.gateway and plan.gateway.api_key_env else set()))
    if not names:
        return None
    lines = [f"# Variables {one_line(Path(plan.profile_file).name)} references: copy to .env beside compose.yaml and fill "
             "in (keep .env out of version control)"]
    lines += [f"{n}=" for n in names]
    return "\n".join(lines) + "\n"
