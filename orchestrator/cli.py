"""Command line: parse, call, print. Decisions live in the core modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .errors import OrchestratorError, ProfileError


def _fail(problems: list[str], as_json: bool = False, data: Any = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    for p in problems:
        click.echo(p, err=True)
    sys.exit(1)


def _load_plan(profile: str) -> Any:
    from .planner import build_plan
    from .profile import load

    return build_plan(load(profile))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="orchestrator")
def main() -> None:
    """Declarative deployments for local LLM servers (llama.cpp, ik_llama.cpp, vLLM, SGLang)."""


@main.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print problems as JSON.")
def validate(profiles: tuple[str, ...], as_json: bool) -> None:
    """Check profiles: every problem as FILE:LINE: field: what — how to fix."""
    from .planner import build_plan
    from .profile import load

    problems = []
    warnings: list[str] = []
    for path in profiles:
        try:
            plan = build_plan(load(path))
            warnings += [f"{path}: {s.name}: warning: {w}" for s in plan.servers for w in s.warnings]
        except ProfileError as exc:
            problems += exc.problems
    if as_json:
        click.echo(json.dumps({"valid": not problems, "problems": [p.as_dict() for p in problems],
                               "warnings": warnings}, indent=2))
    else:
        for w in warnings:
            click.echo(w, err=True)
        for p in problems:
            click.echo(str(p), err=True)
        if not problems:
            click.echo(f"{len(profiles)} profile(s) valid")
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The plan as data.")
def plan(profile: str, as_json: bool) -> None:
    """Show per server the engine, image, port and every flag with its reason."""
    try:
        p = _load_plan(profile)
    except ProfileError as exc:
        _fail([str(x) for x in exc.problems])
        return
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
        return
    from .explain import explain

    click.echo(explain(p), nl=False)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(["command", "docker", "compose", "k8s"]), default="command",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="command target: argv lists as JSON.")
def render(profile: str, target: str, output: str | None, as_json: bool) -> None:
    """Render launch commands, docker run lines, a compose file or k8s manifests."""
    from .render import render as do_render

    try:
        text = do_render(_load_plan(profile), target, as_json)
    except ProfileError as exc:
        _fail([str(x) for x in exc.problems])
        return
    except OrchestratorError as exc:
        _fail([f"error: {exc}"])
        return
    if output:
        tmp = Path(output + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(output)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command()
def schema() -> None:
    """Print the profile JSON Schema (for editor autocompletion)."""
    from .profile import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def gpus(as_json: bool) -> None:
    """List the GPU catalog."""
    from . import catalog

    rows = list(catalog.gpus().values())
    if as_json:
        click.echo(json.dumps([g.__dict__ for g in rows], indent=2))
        return
    for g in rows:
        cc = g.compute_capability or g.gfx_target or "-"
        click.echo(f"{g.id:24} {g.name:40} {g.arch:10} {cc:7} {g.vram_gb:>6g} GB {g.bandwidth_gbs or '-':>6} GB/s")


if __name__ == "__main__":
    main()
