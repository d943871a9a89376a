"""`orchestrate tune PROFILE`: measure candidate flags through the real server, keep the winner in the
lock beside the profile (orchestrator.measure.tune)."""

from __future__ import annotations

import json
import re
import sys

import click

from orchestrator.cli.common import make_deployer
from orchestrator.cli.measure_cmds import _progress


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", value)
    if not m or float(m.group(1)) <= 0:
        raise click.BadParameter(f"{value!r}: give a duration such as 90s, 10m or 1h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


@click.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable; default: all).")
@click.option("--budget", default="10m", show_default=True, callback=_duration,
              help="Time for the whole run (90s, 10m, 1h), split between the servers.")
@click.option("--prompt-tokens", type=click.IntRange(min=16), help="Workload: prompt length  [default: 512]")
@click.option("--gen-tokens", type=click.IntRange(min=2), help="Workload: tokens generated per request  [default: 128]")
@click.option("--concurrency", type=click.IntRange(min=1), help="Workload: simultaneous requests  "
              "[default: the server's parallel]")
@click.option("--requests", type=click.IntRange(min=1), help="Rounds of --concurrency requests per visit  [default: 1]")
@click.option("--depth", type=click.IntRange(min=0), help="Workload: tokens of a shared, cached prefix every request "
              "begins with (the context depth it runs at)  [default: 0]")
@click.option("--kv", "kv", default="", help="KV-cache types the quality budget allows besides the planned one "
              "(comma-separated, e.g. q8_0; check them with orchestrate eval --matrix first). Default: none.")
@click.option("--json", "as_json", is_flag=True)
def tune(profile: str, servers: tuple[str, ...], budget: float, prompt_tokens: int | None, gen_tokens: int | None,
         concurrency: int | None, requests: int | None, depth: int | None, kv: str, as_json: bool) -> None:
    """Measure candidate configurations of the knobs the plan is unsure of (threads, ubatch,
    FlashAttention, KV type, draft length, -ncmoe, slots) through the real server on this machine, and write
    the winner into PROFILE.lock.yaml. Interleaved rounds; a change wins only beyond the spread between
    two identical planned arms; successive halving fits the budget."""
    from orchestrator.measure import tune as tuner

    shape = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "concurrency": concurrency,
             "requests": requests, "depth": depth}
    deployer = make_deployer(as_json=True)
    with _progress(False, "tune") as say:   # on stderr, also with --json
        outcomes, path, said = tuner.tune_profile(profile, list(servers) or None, deployer, budget, shape,
                                                  [k.strip() for k in kv.split(",") if k.strip()], say)
    if as_json:
        click.echo(json.dumps({"lock": path, "servers": [{"server": o.server, "reason": o.reason,
                                                           **_data(o)} for o in outcomes]}, indent=2))
        sys.exit(0)
    for o in outcomes:
        t = o.tuning()
        click.echo(f"server {o.server}: {o.workload.describe()}; {o.rounds} round(s), {o.visits} visits in "
                   f"{o.spent_s:.0f} s; noise ±{o.noise:.1%}"
                   + (f"; {o.untried} candidate(s) left out by the budget" if o.untried else ""))
        click.echo(f"  {'candidate':<34} {'visits':>6} {'median':>8} {'vs planned':>10}  status")
        for c in t.candidates:
            ratio = f"{c['vs_planned']:.3f}" if c.get("vs_planned") else "-"
            med = f"{c['median']:.2f}" if c.get("median") else "-"
            click.echo(f"  {c['flags']:<34} {c['visits']:>6} {med:>8} {ratio:>10}  {c['status']}")
        click.echo(f"  → {o.reason}")
    for line in said:
        click.echo(line, err=True)
    click.echo(f"wrote {path}")


def _data(o: object) -> dict[str, object]:
    from orchestrator.measure.tune import Outcome

    assert isinstance(o, Outcome)
    t = o.tuning()
    return {"flags": [list(f) for f in t.flags], "figures": t.figures, "candidates": list(t.candidates)}
