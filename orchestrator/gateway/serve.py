"""Run the gateway of a plan in the foreground on uvicorn (what `orchestrate gateway PROFILE` does,
and what `up` starts as a supervised process)."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from orchestrator.errors import OrchestratorError
from orchestrator.gateway.app import Gateway, create_app
from orchestrator.gateway.backend import DeployerBackend
from orchestrator.gateway.metrics import Metrics
from orchestrator.plan.model import Plan
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


def serve(plan: Plan, deployer: Deployer, log: TextIO | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Servers it started keep running (their records are in the state
    file; the next gateway adopts them, `down` stops them)."""
    import uvicorn

    gateway = build(plan, deployer, log)
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
