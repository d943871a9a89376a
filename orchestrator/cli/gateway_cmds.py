"""The gateway in the foreground: `orchestrate gateway PROFILE` (what `up` runs as a supervised process)."""

from __future__ import annotations

import click

from orchestrator.cli.common import IGNORE_FIT, make_deployer


@click.command("gateway")
@click.argument("profile", type=click.Path(dir_okay=False))
@IGNORE_FIT
def gateway(profile: str, ignore_fit: bool) -> None:
    """Serve the profile's gateway in the foreground: one OpenAI-compatible endpoint that starts
    on-demand servers when asked for, swaps them within the memory budget and stops them when idle."""
    from orchestrator.gateway.serve import serve
    from orchestrator.pipeline import plan_for_up

    deployer = make_deployer()
    serve(plan_for_up(profile, deployer, ignore_fit), deployer)


@click.command("cache-report")
@click.argument("deployment", required=False)
@click.option("--since", default=None, help="Only requests after this: 30m, 1h, 2d, or a date/time")
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON")
@click.option("--top", default=3, show_default=True, help="Causes shown per conversation")
def cache_report(deployment: str | None, since: str | None, as_json: bool, top: int) -> None:
    """How much of each prompt the engines reused through the gateway, per client and conversation, and
    what broke the reuse (a timestamp in the system prompt, tools reordered, history rewritten, the
    engine's limits), with the prefill time it cost. DEPLOYMENT: a name or profile file; default: the
    one deployment with records."""
    import json
    import os

    from orchestrator.cli.common import deployment_name
    from orchestrator.errors import OrchestratorError
    from orchestrator.gateway.cachereport import deployments_with_records, parse_since, read_records, render, summarize
    from orchestrator.paths import state_dir

    root = state_dir(dict(os.environ))
    if deployment is None:
        known = deployments_with_records(root)
        if len(known) != 1:
            raise OrchestratorError("no deployment has prefix-cache records yet" if not known else
                                    f"several deployments have records: {', '.join(known)}",
                                    "send requests through a gateway (orchestrate up PROFILE) first" if not known
                                    else "name one: orchestrate cache-report NAME")
        deployment = known[0]
    name = deployment_name(deployment)
    after = parse_since(since)
    summary = summarize(read_records(root, name, after), name, after)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for line in render(summary, top):
        click.echo(line)
