"""The gateway in the foreground: `orchestrate gateway PROFILE` (what `up` runs as a supervised process)."""

from __future__ import annotations

import click

from orchestrator.cli.common import IGNORE_FIT, make_deployer


@click.command("gateway")
@click.argument("profile", type=click.Path(dir_okay=False), required=False)
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Serve a plan.json that render --target compose/k8s wrote (in the gateway's container: its "
                   "servers are the platform's services) instead of a profile.")
@IGNORE_FIT
def gateway(profile: str | None, plan_file: str | None, ignore_fit: bool) -> None:
    """Serve the profile's gateway in the foreground: one OpenAI-compatible endpoint that starts
    on-demand servers when asked for, swaps them within the memory budget and stops them when idle."""
    if (profile is None) == (plan_file is None):
        raise click.UsageError("give a PROFILE or --plan FILE")
    if profile is None:
        import os

        from orchestrator.gateway.serve import serve_plan

        assert plan_file is not None
        serve_plan(plan_file, dict(os.environ))
        return
    from orchestrator.gateway.serve import serve
    from orchestrator.pipeline import plan_for_up

    deployer = make_deployer()
    serve(plan_for_up(profile, deployer, ignore_fit), deployer)
