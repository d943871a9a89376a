"""`orchestrate eval route PROFILE`: a labeled prompt set through a route's decisions (a running
gateway's POST /v1/route, else the scorer in-process), accuracy and the confusion table; --run also
sends the prompts and compares the routed mix with everything sent to the smart tier."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from orchestrator.cli.common import IGNORE_FIT, load_plan
from orchestrator.errors import OrchestratorError


@click.command("eval route")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--route", "route_name", help="The route (default: the profile's only or first route).")
@click.option("--set", "set_file", type=click.Path(dir_okay=False, exists=True),
              help="A labeled set (JSON lines like orchestrator/data/route_prompts.jsonl); default: the shipped one.")
@click.option("--split", type=click.Choice(["train", "heldout", "all"]), default="heldout", show_default=True)
@click.option("--run", "run_prompts", is_flag=True, help="Also send the prompts through the gateway: the routed mix "
              "vs everything to the last (smart) tier.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="--run: per answer.")
@click.option("--json", "as_json", is_flag=True)
@IGNORE_FIT
def eval_route(profile: str, route_name: str | None, set_file: str | None, split: str, run_prompts: bool,
               max_tokens: int, as_json: bool, ignore_fit: bool) -> None:
    """Accuracy of a route's decisions on a labeled prompt set, and with --run what the routed mix costs."""
    from orchestrator.gateway import route_set
    from orchestrator.gateway.routing import decide

    plan = load_plan(profile, ignore_fit)
    gw = plan.gateway
    if gw is None or not gw.routes:
        raise OrchestratorError(f"{profile} has no gateway.routes", "add gateway: {routes: {auto: {tiers: "
                                "[{server: fast, up_to: simple}, {server: smart}]}}} (docs/routing.md)")
    routes = {r.name: r for r in gw.routes}
    if route_name and route_name not in routes:
        raise OrchestratorError(f"no route {route_name!r} in {profile}", f"use one of: {', '.join(routes)}")
    route = routes[route_name] if route_name else gw.routes[0]
    items = route_set.load(set_file, None if split == "all" else split)
    if not items:
        raise OrchestratorError(f"the set has no {split} items", "use --split all")
    key = os.environ.get(gw.api_key_env) if gw.api_key_env else None
    url = route_set.gateway_url(gw.host, gw.port)
    decisions = route_set.gateway_decisions(url, key, route, items)
    by = f"the gateway at {url} (POST /v1/route)"
    if decisions is None:
        if run_prompts:
            raise OrchestratorError(f"--run needs the running gateway; none answers at {url}",
                                    f"start it: orchestrate up {profile}")
        decisions = [decide(route, i.body) for i in items]
        by = f"the scorer in-process (no gateway answers at {url})"
    result: dict[str, Any] = {"decided_by": by, "split": split, **route_set.report(route, items, decisions)}
    if run_prompts:
        result["routed"] = route_set.send_all(url, key, route.name, items, max_tokens)
        result["smart_only"] = route_set.send_all(url, key, route.tiers[-1].served_name, items, max_tokens)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"route {route.name} on {len(items)} {split} prompts, decided by {by}")
    click.echo(f"  accuracy: {result['correct']}/{result['items']} = {result['accuracy']:.1%}")
    names = list(result["confusion"])
    width = max(len(n) for n in names) + 2
    click.echo("  label \\ decided".ljust(width + 18) + "".join(n.rjust(width) for n in names))
    for want in names:
        click.echo(f"  {want}".ljust(width + 18) + "".join(str(result["confusion"][want][g]).rjust(width)
                                                           for g in names))
    for w in result["wrong"][:20]:
        click.echo(f"  wrong: {w['id']} ({w['kind']}, {w['label']}): {w['got']} instead of {w['want']}, "
                   f"score {w['score']:.2f}")
    if run_prompts:
        for label in ("routed", "smart_only"):
            r = result[label]
            click.echo(f"  {label.replace('_', ' ')} ({r['model']}): p50 {r['latency_p50_s']} s, mean "
                       f"{r['latency_mean_s']} s, total {r['total_s']} s, {r['completion_tokens']} tokens out "
                       f"({r['completion_tok_s']} tok/s), {r['prompt_tokens']} in, {r['failed']} failed; "
                       f"servers {r['servers']}")
