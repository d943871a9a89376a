"""Run the gateway of a plan in the foreground on uvicorn (what `orchestrate gateway PROFILE` does,
and what `up` starts as a supervised process)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

from orchestrator.errors import OrchestratorError
from orchestrator.gateway.app import Gateway, create_app
from orchestrator.gateway.backend import DeployerBackend, PlatformBackend
from orchestrator.gateway.metrics import Metrics
from orchestrator.plan.model import Plan, plan_from_dict
from orchestrator.runtime.deployer import Deployer

GRACEFUL_S = 5


def gateway_key(plan: Plan, environ: dict[str, str]) -> str | None:
    gw = plan.gateway
    if gw is None or not gw.api_key_env:
        return None
    key = environ.get(gw.api_key_env)
    if not key:
        raise OrchestratorError(f"the gateway's API key variable {gw.api_key_env} is not set",
                                f"export {gw.api_key_env}=<key> before starting it")
    return key


def build(plan: Plan, deployer: Deployer, log: TextIO | None = None) -> Gateway:
    if plan.gateway is None:
        raise OrchestratorError(f"{plan.profile_file} has no gateway: section",
                                "add gateway: {port: 8000} to the profile (and start: on_demand to servers "
                                "the gateway should start)")
    metrics = Metrics(log)
    deployer.progress = lambda server, event, detail: metrics.log(f"[{server}] {event}" + (f": {detail}"
                                                                                            if detail else ""))
    return Gateway(plan, DeployerBackend(plan, deployer), gateway_key(plan, deployer.environ), metrics)


def read_plan(path: str) -> Plan:
    """A plan written by render --target compose/k8s (Plan.to_dict as JSON)."""
    try:
        data = json.loads(Path(path).read_text())
        plan = plan_from_dict(data)
    except OSError as exc:
        raise OrchestratorError(f"cannot read the plan {path}: {exc.strerror}",
                                "mount the plan.json that render --target compose/k8s wrote") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise OrchestratorError(f"{path} is not a plan written by orchestrate render: {type(exc).__name__}: {exc}",
                                "render it again: orchestrate render PROFILE --target compose|k8s") from None
    if plan.gateway is None:
        raise OrchestratorError(f"the plan {path} has no gateway", "add a gateway: section to the profile and "
                                "render it again")
    return plan


def build_platform(plan: Plan, environ: dict[str, str], log: TextIO | None = None) -> Gateway:
    """The gateway of servers a container platform runs (render --target compose/k8s)."""
    metrics = Metrics(log)
    return Gateway(plan, PlatformBackend(plan, environ, metrics.log), gateway_key(plan, environ), metrics)


def serve_plan(path: str, environ: dict[str, str], log: TextIO | None = None) -> None:
    """Serve a rendered plan's gateway inside a container, in front of servers the platform runs."""
    plan = read_plan(path)
    run(plan, build_platform(plan, environ, log))


def serve(plan: Plan, deployer: Deployer, log: TextIO | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Servers it started keep running (their records are in the state
    file; the next gateway adopts them, `down` stops them)."""
    run(plan, build(plan, deployer, log))


def run(plan: Plan, gateway: Gateway) -> None:
    import uvicorn

    assert plan.gateway is not None
    gateway.metrics.log(f"gateway for {plan.name} on http://{plan.gateway.host}:{plan.gateway.port} "
                        f"(pid {os.getpid()}); servers: " + ", ".join(f"{sp.served_name} ({sp.start})"
                                                                     for sp in plan.servers))
    config = uvicorn.Config(create_app(gateway), host=plan.gateway.host, port=plan.gateway.port, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=GRACEFUL_S,
                            server_header=False)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        print(f"error: the gateway could not listen on {plan.gateway.host}:{plan.gateway.port}", file=sys.stderr)
        raise SystemExit(1)
