"""Commands that only read: validate, plan, fit, render, schema, gpus. None of them starts anything, and
none imports docker, gguf, rich or requests (they stay fast)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from orchestrator.cli.common import IGNORE_FIT, LOCKED, load_plan
from orchestrator.cli.show import print_gpus
from orchestrator.errors import ProfileError, one_line, printable

if TYPE_CHECKING:
    from orchestrator.plan.model import Plan


@click.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print problems as JSON.")
@IGNORE_FIT
def validate(profiles: tuple[str, ...], as_json: bool, ignore_fit: bool) -> None:
    """Check profiles: every problem as FILE:LINE: field: what — how to fix."""
    problems = []
    warnings: list[str] = []
    for path in profiles:
        try:
            plan_ = load_plan(path, ignore_fit)
            warnings += [one_line(f"{path}: {s.name}: warning: {w}") for s in plan_.servers for w in s.warnings]
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


@click.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The plan as data.")
@IGNORE_FIT
@LOCKED
def plan(profile: str, as_json: bool, ignore_fit: bool, locked: bool) -> None:
    """Show per server the engine, image, port and every flag with its reason."""
    p = load_plan(profile, ignore_fit, locked=locked)
    notes = _quality_notes(p)
    if as_json:
        data = p.to_dict()
        for server in data["servers"]:
            if server["name"] in notes:
                server["quality"] = notes[server["name"]]
        click.echo(json.dumps(data, indent=2))
        return
    from orchestrator.plan.explain import explain

    click.echo(printable(explain(p)), nl=False)   # user values never steer the terminal
    for name, note in notes.items():
        click.echo(one_line(f"quality of server {name} (orchestrate eval --save): {note}"))


def _quality_notes(p: Plan) -> dict[str, str]:
    """Saved `orchestrate eval` results that measured exactly these settings. Nothing heavy is
    imported unless a results file exists (plan stays fast)."""
    from orchestrator.paths import state_dir as default_state_dir

    state = default_state_dir(dict(os.environ))
    if not (Path(state) / "bench").is_dir():
        return {}
    from orchestrator.measure.bench import results_file
    from orchestrator.measure.eval_plan import quality_notes

    return quality_notes(p, results_file(state))


@click.command("fit")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def fit_cmd(profile: str, as_json: bool) -> None:
    """Memory estimate per server: weights, KV cache, compute, total vs VRAM/RAM, and a verdict."""
    p = load_plan(profile, ignore_fit=True)
    if as_json:
        click.echo(json.dumps([{"server": s.name, **(s.estimate.as_dict() if s.estimate else {})}
                                for s in p.servers], indent=2))
        return
    from orchestrator.plan.explain import explain_fit

    click.echo(printable(explain_fit(p)), nl=False)
    if any(s.estimate and s.estimate.verdict == "does not fit" for s in p.servers):
        sys.exit(1)


@click.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(["command", "docker", "compose", "k8s", "llama-swap"]),
              default="command",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="command target: argv lists as JSON.")
@IGNORE_FIT
@LOCKED
def render(profile: str, target: str, output: str | None, as_json: bool, ignore_fit: bool, locked: bool) -> None:
    """Render launch commands, docker run lines, a compose file or k8s manifests (with a lock beside the
    profile: its tuned flags, and images pinned by digest)."""
    from orchestrator.render import env_example
    from orchestrator.render import render as do_render

    plan_ = load_plan(profile, ignore_fit, target, locked)
    text = do_render(plan_, target, as_json)
    if not output:
        click.echo(text, nl=False)
        return
    from orchestrator.errors import OrchestratorError
    from orchestrator.paths import UnsafeOutput, write_file

    example = env_example(plan_) if target == "compose" else None   # what `compose up` writes beside it too
    try:
        write_file(output, text, protect=(profile,))
        click.echo(f"wrote {one_line(output)}", err=True)
        if example:
            path = write_file(Path(output).parent / ".env.example", example, protect=(profile,))
            click.echo(f"wrote {one_line(str(path))}: copy it to .env and fill in the secrets", err=True)
    except UnsafeOutput as exc:
        raise OrchestratorError(f"-o {exc}", exc.hint) from None


@click.command()
def schema() -> None:
    """Print the profile JSON Schema (for editor autocompletion)."""
    from orchestrator.profile import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--compare", "compare", nargs=1, multiple=True, metavar="GPU",
              help="Compare these GPUs side by side (repeat, or list them after the options).")
@click.option("--model", default="Llama-3.1-8B-Instruct", show_default=True, help="--compare: a catalog model.")
@click.option("--quant", default="Q4_K_M", show_default=True, help="--compare: the model's quant.")
@click.option("--context", type=int, default=8192, show_default=True, help="--compare: tokens per sequence.")
@click.option("--count", type=int, default=1, show_default=True, help="--compare: GPUs of each kind.")
@click.argument("more", nargs=-1, metavar="[GPU]...")
def gpus(as_json: bool, compare: tuple[str, ...], model: str, quant: str, context: int, count: int,
         more: tuple[str, ...]) -> None:
    """List the GPU catalog; with --compare, GPUs side by side for one model: VRAM, bandwidth, fit,
    predicted tok/s, tokens per joule at TDP and what fits on each."""
    from orchestrator import catalog

    if compare or more:
        from orchestrator.cli.recommend_cmds import compare_gpus

        if not compare:
            raise click.UsageError("GPU names are only taken with --compare (orchestrate gpus --compare P40 3090)")
        if count < 1:
            raise click.UsageError("--count must be at least 1")
        compare_gpus((*compare, *more), model, quant, context, count, as_json)
        return
    rows = list(catalog.gpus().values())
    if as_json:
        click.echo(json.dumps([g.__dict__ for g in rows], indent=2))
        return
    print_gpus(rows)
