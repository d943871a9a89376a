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


@click.command("eval-tools")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "server", help="The server to measure (default: the first with tool_calls, else the first).")
@click.option("--direct-only", is_flag=True, help="Only the server directly, not through the gateway.")
@click.option("--limit", type=click.IntRange(min=1), help="Run the first N tasks only.")
@click.option("--max-tokens", type=click.IntRange(min=16), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@IGNORE_FIT
def eval_tools(profile: str, server: str | None, direct_only: bool, limit: int | None, max_tokens: int,
               as_json: bool, ignore_fit: bool) -> None:
    """Run the tool-use suite (42 tasks) against a running server directly and through the gateway:
    valid-call rate, task-correct rate, attempts per task, added latency, failure kinds."""
    import json
    import os

    from orchestrator.cli.common import fail, load_plan
    from orchestrator.gateway.tool_eval import run_suite
    from orchestrator.plan.model import client_host

    plan = load_plan(profile, ignore_fit)
    names = [sp.name for sp in plan.servers]
    tool_servers = [n for n in names if plan.gateway and n in plan.gateway.tool_calls]
    name = server or (tool_servers or names)[0]
    if name not in names:
        fail([f"no server {name!r} in {profile}; servers: {', '.join(names)}"])
    sp = plan.server(name)
    direct_headers = {}
    if sp.api_key and os.environ.get(sp.api_key.env_var):
        direct_headers["Authorization"] = f"Bearer {os.environ[sp.api_key.env_var]}"
    targets = [("direct", f"http://{sp.client_host}:{sp.port}/v1", direct_headers)]
    if not direct_only:
        gw = plan.gateway
        if gw is None:
            fail([f"{profile} has no gateway: section; use --direct-only"])
        assert gw is not None
        headers = {}
        if gw.api_key_env and os.environ.get(gw.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[gw.api_key_env]}"
        host = client_host(gw.host)
        targets.append(("gateway", f"http://{host}:{gw.port}/v1", headers))
    summaries = run_suite(targets, sp.served_name, max_tokens, limit, say=lambda s: click.echo(s, err=True))
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in summaries], indent=2))
        return
    click.echo(f"{name} ({sp.engine} {sp.engine_version}, model {sp.served_name}), {summaries[0].tasks} tasks")
    for s in summaries:
        added = "" if s.target == "direct" else f"; added latency p50 {s.p50_s:.2f} s, p95 {s.p95_s:.2f} s"
        click.echo(f"  {s.target:8} valid calls {s.valid_rate:6.1%}  task-correct {s.correct_rate:6.1%}  "
                   f"attempts/task {s.attempts_per_task:.2f}  invalid passed as valid {s.invalid_passed}{added}")
        if s.kinds:
            click.echo("           failures: " + ", ".join(f"{k} {v}" for k, v in sorted(s.kinds.items())))
        if s.outcomes:
            click.echo("           gateway: " + ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items())))
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
