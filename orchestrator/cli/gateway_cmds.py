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
