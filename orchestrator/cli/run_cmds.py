"""Commands that start, stop and look at servers: up, down, status, logs, compose up/down."""

from __future__ import annotations

import json
import os
import sys

import click

from orchestrator.cli.common import IGNORE_FIT, LOCKED, deployment_name, fail, load_plan, make_deployer
from orchestrator.cli.completion import complete_server, complete_target
from orchestrator.cli.progress import display
from orchestrator.cli.show import print_status, print_up


@click.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).",
              shell_complete=complete_server)
@click.option("--foreground", is_flag=True, help="Stay attached; stop the servers on Ctrl-C.")
@click.option("--atomic", is_flag=True, help="If any server fails, stop the ones this run started.")
@click.option("--json", "as_json", is_flag=True)
@IGNORE_FIT
@LOCKED
def up(profile: str, servers: tuple[str, ...], foreground: bool, atomic: bool, as_json: bool,
       ignore_fit: bool, locked: bool) -> None:
    """Start every server and wait until each passes all health stages. With a gateway: section, the
    start: always servers and then the gateway (which starts the on_demand ones when asked for)."""
    from orchestrator.pipeline import plan_for_up

    deployer = make_deployer(as_json)
    plan_ = plan_for_up(profile, deployer, ignore_fit, locked)
    if plan_.gateway is not None and not servers:
        from orchestrator.gateway.supervise import up_with_gateway

        results = up_with_gateway(deployer, plan_, atomic)   # always servers, then the gateway
    else:
        results = deployer.up(plan_, list(servers) or None, atomic=atomic)
    display().end()
    print_up(results, as_json)
    ok = all(r.ok for r in results)
    if ok and foreground:
        click.echo("attached: Ctrl-C stops the servers", err=True)
        deployer.wait_foreground(plan_.name)
        for name, outcome in deployer.down(plan_.name, list(servers) or None):
            click.echo(f"{name}: {outcome}")
    sys.exit(0 if ok else 1)


@click.command()
@click.argument("target", shell_complete=complete_target)
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).",
              shell_complete=complete_server)
def down(target: str, servers: tuple[str, ...]) -> None:
    """Stop a deployment (by profile file or deployment name): SIGTERM, grace period, SIGKILL."""
    name = deployment_name(target)
    results = make_deployer().down(name, list(servers) or None)
    if not results:
        click.echo(f"{name}: nothing running")
    for server, outcome in results:
        click.echo(f"{name}/{server}: {outcome}")


@click.command()
@click.argument("target", required=False, shell_complete=complete_target)
@click.option("--json", "as_json", is_flag=True)
def status(target: str | None, as_json: bool) -> None:
    """Reconcile recorded servers with reality: alive, healthy, loading, busy, dead, stale."""
    rows = make_deployer(as_json).status([deployment_name(target)] if target else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    print_status(rows)


@click.command()
@click.argument("target", shell_complete=complete_target)
@click.option("--server", help="Which server (default: all).", shell_complete=complete_server)
@click.option("-n", "lines", default=50, show_default=True, help="Lines from the end.")
@click.option("-f", "follow", is_flag=True, help="Keep printing new lines.")
def logs(target: str, server: str | None, lines: int, follow: bool) -> None:
    """Show a server's log."""
    from orchestrator.runtime import logs as server_logs
    from orchestrator.runtime.logs import tail

    deployer = make_deployer()
    name = deployment_name(target)
    deployer.refresh_logs(name)   # containers: copy their log into the state dir first
    paths = server_logs.log_files(deployer.store, name, server)
    if not paths:
        fail([f"error: no logs for {name}{'/' + server if server else ''} — run orchestrate up first"])
    for p in paths:
        if len(paths) > 1:
            click.echo(f"==> {p.name} <==")
        for line in tail(p, lines):
            click.echo(line)
    if follow:
        server_logs.follow(paths, lambda text: click.echo(text, nl=False), lambda: deployer.refresh_logs(name))


@click.group()
def compose() -> None:
    """Run a profile's rendered compose file with Docker Compose v2 (docker compose up --wait / down)."""


@compose.command("up")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where compose.yaml is written "
              "(default: the state dir's compose/<deployment>).")
@IGNORE_FIT
def compose_up(profile: str, directory: str | None, ignore_fit: bool) -> None:
    """Render compose.yaml and run `docker compose up -d --wait` on it."""
    from orchestrator.runtime.compose import up as compose_up_

    sys.exit(compose_up_(load_plan(profile, ignore_fit), directory, dict(os.environ)))


@compose.command("down")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--dir", "directory", type=click.Path(file_okay=False))
def compose_down(profile: str, directory: str | None) -> None:
    """`docker compose down` for the profile's compose project."""
    from orchestrator.runtime.compose import down as compose_down_

    sys.exit(compose_down_(deployment_name(profile), directory, dict(os.environ)))
