"""`up` with a gateway: the start: always servers through the deployer, then the gateway itself as a
supervised process (`orchestrate gateway PROFILE` in its own process group, its log and state record
in the state dir beside the servers'), so `status`, `logs` and `down` see it like a server."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable

from orchestrator.errors import OrchestratorError
from orchestrator.gateway.serve import gateway_key
from orchestrator.plan.model import Plan, client_host
from orchestrator.runtime import process
from orchestrator.runtime.base import STOP_GRACE_S, UpResult
from orchestrator.runtime.deployer import Deployer
from orchestrator.runtime.diagnose import classify
from orchestrator.runtime.health import HttpError, http
from orchestrator.runtime.logs import tail
from orchestrator.runtime.state import GATEWAY_RECORD as GATEWAY
from orchestrator.runtime.state import ServerRecord

READY_TIMEOUT_S = 30.0


def gateway_hash(plan: Plan) -> str:
    """The gateway runs a plan: any change to it means a new gateway process."""
    text = json.dumps(plan.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gateway_argv(plan: Plan) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "gateway", os.path.abspath(plan.profile_file)]


def _failed(detail: str, stage: str, log: str, exit_code: int | None = None, url: str = "") -> UpResult:
    lines = tail(log, 200)
    diag = classify("\n".join(lines), exit_code)
    return UpResult("gateway", "failed", detail, stage, diag.cause, diag.hint, lines[-15:], url=url, log=log)


def _wait_ready(poll: Callable[[], int | None], host: str, port: int, deadline: float) -> tuple[bool, str, int | None]:
    while time.monotonic() < deadline:
        code = poll()
        if code is not None:
            return False, f"the gateway exited with code {code} while starting", code
        try:
            if http("GET", host, port, "/health", timeout=2).status_code == 200:
                return True, "", None
        except HttpError:
            pass
        time.sleep(0.1)
    return False, f"the gateway did not answer /health within {READY_TIMEOUT_S:.0f} s", None


def start_gateway(deployer: Deployer, plan: Plan) -> UpResult:
    gw = plan.gateway
    assert gw is not None
    store = deployer.store
    log = store.log_path(plan.name, GATEWAY)
    url = f"http://{gw.host}:{gw.port}/v1"
    want = gateway_hash(plan)
    restarted = False
    with store.lock(plan.name):
        existing = store.load(plan.name).get(GATEWAY)
        if existing is not None and deployer.alive(existing):
            if existing.plan_hash == want:
                return UpResult("gateway", "already running", f"pid {existing.pid}", url=url, log=existing.log)
            deployer.progress("gateway", "restart", "plan changed: stopping the running gateway")
            process.stop(existing, STOP_GRACE_S)
            restarted = True
        store.update(plan.name, None, GATEWAY)
        try:
            gateway_key(plan, deployer.environ)
        except OrchestratorError as exc:
            return UpResult("gateway", "failed", str(exc), "preflight", "api_key_missing", exc.hint, url=url)
        owner = process.port_owner(gw.host, gw.port, drain_s=5)
        if owner:
            return UpResult("gateway", "failed", f"port {gw.port} on {gw.host} is taken by {owner}", "preflight",
                            "port_in_use", "stop it or change gateway.port in the profile", url=url)
        argv = gateway_argv(plan)
        proc = process.spawn(argv, log, deployer.environ)
        rec = ServerRecord(profile=plan.name, server=GATEWAY, engine="gateway", pid=proc.pid, pgid=proc.pid,
                           create_time=process.create_time(proc.pid) or time.time(), plan_hash=want, host=gw.host,
                           port=gw.port, log=str(log), binary=sys.executable, argv=argv, served_name="(gateway)",
                           health_path="/health", profile_file=os.path.abspath(plan.profile_file),
                           api_key_env=gw.api_key_env)
        store.update(plan.name, rec)
    deployer.progress("gateway", "start", f"pid {proc.pid}")
    t0 = time.monotonic()
    ok, detail, code = _wait_ready(proc.poll, client_host(gw.host), gw.port, t0 + READY_TIMEOUT_S)
    with store.lock(plan.name):
        if not ok:
            process.stop(rec, STOP_GRACE_S)
            store.update(plan.name, None, GATEWAY)
            return _failed(detail, "ready", str(log), code, url)
        rec.status = "running"
        store.update(plan.name, rec)
    return UpResult("gateway", "restarted" if restarted else "started", f"pid {proc.pid}",
                    elapsed_s=time.monotonic() - t0, url=url, log=str(log), stages=["process", "ready"])


def up_with_gateway(deployer: Deployer, plan: Plan, atomic: bool = False) -> list[UpResult]:
    """The start: always servers, then the gateway (which starts the on_demand ones when asked)."""
    always = [sp.name for sp in plan.servers if sp.start == "always"]
    results = deployer.up(plan, always, atomic=atomic) if always else []
    if not all(r.ok for r in results):
        return results
    gateway = start_gateway(deployer, plan)
    results.append(gateway)
    if atomic and not gateway.ok:
        for r in results[:-1]:
            if r.outcome in ("started", "restarted"):
                deployer.down(plan.name, [r.server])
                r.outcome, r.detail = "rolled back", "stopped because the gateway failed (--atomic)"
    return results
