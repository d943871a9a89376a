"""Shell targets: the launch commands (command), docker run lines (docker) and the commands as JSON.

Every argument is quoted here, in Python, with shlex.quote; the one template (templates/shell.sh.j2, the
installed package orchestrator.templates) only lays the lines out, in a sandboxed Jinja environment that
fails on an undefined name.
"""

from __future__ import annotations

import json
import shlex
from functools import lru_cache
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError, one_line
from orchestrator.plan.model import L_PROFILE, L_SERVER, Plan, ServerPlan, container_name
from orchestrator.render.common import HEADER, STOP_GRACE_S, env_need, publish, require_image, require_key

TEMPLATE = "shell.sh.j2"


def templates_dir() -> Path:
    """The installed package orchestrator.templates (the top-level templates/ of the source tree)."""
    package = Path(__file__).resolve().parents[1]
    for cand in (package / "templates", package.parent / "templates"):
        if cand.is_dir():
            return cand
    raise OrchestratorError("templates folder not found", "reinstall orchestrator")


class Quoted(str):
    """Text already quoted for sh (shlex) by the code here: the template writes it as it is."""


def _finalize(value: Any) -> str:
    """Every value the template writes: a Quoted command line as it is, anything else (names, versions,
    the profile's file name) with its control characters escaped, so it stays inside its one line."""
    if isinstance(value, Quoted):
        return str(value)
    return one_line(str(value))


@lru_cache(maxsize=1)
def environment() -> Any:
    from jinja2 import FileSystemLoader, StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(loader=FileSystemLoader(str(templates_dir())), undefined=StrictUndefined,
                                autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                                finalize=_finalize)


def _secret_preamble(s: ServerPlan) -> list[str]:
    """Shell lines that write the key file (ik_llama) or config (SGLang) from the user's env var, 0600."""
    key = s.api_key
    if key is None or key.process_path is None:
        return []
    path = shlex.quote(key.process_path)
    parent = shlex.quote(str(Path(key.process_path).parent))
    var = key.env_var
    need = f': "{require_key(var)}"'
    if key.mechanism == "file":
        write = f"(umask 077 && printf '%s\\n' \"${var}\" > {path})"
    else:
        write = (f"(umask 077 && printf \"api-key: '%s'\\n\" \"$(printf '%s' \"${var}\" | sed \"s/'/''/g\")\" "
                 f"> {path})")
    return [Quoted(line) for line in (need, f"mkdir -p -m 700 {parent}", write)]


def _env_assignments(s: ServerPlan) -> list[str]:
    """VAR=value prefixes of a process launch line; secrets stay references to the user's variables."""
    return [f'{e.name}="{require_key(e.from_env, env_need(s, e.from_env))}"' if e.from_env
            else f"{e.name}={shlex.quote(e.value or '')}" for e in s.env]


def _gpu_docker_args(s: ServerPlan) -> list[str]:
    gpu = s.gpu_access()
    out: list[str] = []
    if gpu.nvidia:
        out += ["--gpus", "all" if gpu.device_ids is None else f'"device={",".join(map(str, gpu.device_ids))}"']
    for dev in gpu.devices:
        out += ["--device", dev]
    for group in gpu.groups:
        out += ["--group-add", group]
    return out


def docker_argv(plan: Plan, s: ServerPlan) -> tuple[list[str], list[str]]:
    """(env-prefix assignments, docker run argv) for one server."""
    require_image(s)
    argv = ["docker", "run", "-d", "--name", container_name(plan.name, s.name), "--restart", "unless-stopped",
            "--init", "--label", f"{L_PROFILE}={plan.name}", "--label", f"{L_SERVER}={s.name}",
            "-p", publish(s), "--stop-timeout", str(STOP_GRACE_S)]
    if s.shm_size:
        argv += ["--shm-size", s.shm_size]
    argv += _gpu_docker_args(s)
    for m in s.mounts:
        argv += ["-v", f"{m.host_path}:{m.container_path}" + (":ro" if m.read_only else "")]
    prefix: list[str] = []
    for e in s.env:
        if e.process_only:
            continue
        if e.from_env:
            prefix.append(f'{e.name}="{require_key(e.from_env, env_need(s, e.from_env))}"')
            argv += ["-e", e.name]
        else:
            argv += ["-e", f"{e.name}={e.value}"]
    if s.api_key and s.api_key.process_path and s.api_key.container_path:
        argv += ["-v", f"{s.api_key.process_path}:{s.api_key.container_path}:ro"]
    cmd = s.container_command
    if cmd:
        argv += ["--entrypoint", cmd[0]]
    argv += [str(s.image), *cmd[1:], *s.args(container=True)]
    return prefix, argv


def _server_view(plan: Plan, s: ServerPlan, target: str) -> dict[str, Any]:
    if target == "command":
        prefix, argv = _env_assignments(s), s.argv()
    else:
        prefix, argv = docker_argv(plan, s)
    line = " ".join([*prefix, shlex.join(argv)])
    view = {"name": s.name, "engine": s.engine_display, "version": s.engine_version,
            "preamble": _secret_preamble(s), "line": Quoted(line), "start_note": ""}
    if plan.gateway is not None and s.start == "on_demand":
        idle = f", stops it after {s.idle_timeout_s} s idle" if s.idle_timeout_s else ""
        view["start_note"] = (f"start: on_demand: the gateway starts it on the first request for "
                              f"{s.served_name!r}{idle}; to run it by hand, remove the # below")
        view["preamble"] = ["# " + p for p in view["preamble"]]
        view["line"] = Quoted("# " + line)
    return view


def gateway_argv(plan: Plan) -> list[str]:
    """The foreground gateway of a plan (what `orchestrate up` runs supervised); the profile as it was
    named, like the header's."""
    return ["orchestrate", "gateway", plan.profile_file]


def _gateway_view(plan: Plan) -> dict[str, Any] | None:
    gw = plan.gateway
    if gw is None:
        return None
    preamble = [f': "${{{gw.api_key_env}:?set {gw.api_key_env} to the key clients must send}}"'] if gw.api_key_env \
        else []
    return {"address": f"{gw.host}:{gw.port}", "preamble": preamble, "line": Quoted(shlex.join(gateway_argv(plan)))}


def render_shell(plan: Plan, target: str) -> str:
    """The command or docker target: a POSIX sh script, one server per line (and the gateway, if any)."""
    servers = [_server_view(plan, s, target) for s in plan.servers]
    return str(environment().get_template(TEMPLATE).render(
        target=target, plan=plan, header=HEADER.format(file=plan.profile_file), servers=servers,
        gateway=_gateway_view(plan)))


def command_json(plan: Plan) -> str:
    out: list[dict[str, Any]] = []
    for s in plan.servers:
        out.append({
            "server": s.name, "engine": s.engine, "argv": s.argv(),
            "env": {e.name: ({"from_env": e.from_env} if e.from_env else e.value) for e in s.env},
            "secret_files": ({"path": s.api_key.process_path, "from_env": s.api_key.env_var}
                             if s.api_key and s.api_key.process_path else []),
        })
        if plan.gateway is not None:
            out[-1]["start"] = s.start
    if plan.gateway is not None:
        gw = plan.gateway
        out.append({"gateway": f"{gw.host}:{gw.port}", "argv": gateway_argv(plan),
                    "env": {gw.api_key_env: {"from_env": gw.api_key_env}} if gw.api_key_env else {}})
    return json.dumps(out, indent=2) + "\n"
