"""The scheduler's backend in the gateway: the runtime's own deployer starts a server (preflight, the
launch, every health stage, the diagnosis of a failure) and stops it, exactly as `up` and `down` do;
its state file is where a restarted gateway finds the servers that still run."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Protocol, TypeVar

from orchestrator.gateway.scheduler import StartOutcome
from orchestrator.plan.model import Plan
from orchestrator.runtime.deployer import Deployer
from orchestrator.runtime.state import ServerRecord

T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call on a daemon thread: a gateway told to exit never waits for a start in progress
    (its state record says what was left; `down` or the next gateway deals with it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_set_exception, future, exc)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)

    threading.Thread(target=run, daemon=True).start()
    return await future


def _set_result(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[T], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class GatewayBackend(Protocol):
    """What the gateway asks of whoever runs its servers. `deployer`: the one that runs them on this
    machine (its state store holds their records, logs and saved results), None where a container
    platform does; `environ`: where the servers' keys and secret variables are read."""

    @property
    def deployer(self) -> Deployer | None: ...
    @property
    def environ(self) -> dict[str, str]: ...

    async def start(self, name: str) -> StartOutcome: ...
    async def stop(self, name: str, reason: str) -> None: ...
    def alive(self, name: str) -> bool: ...
    def running(self) -> tuple[set[str], set[str]]: ...
    def upstream_key(self, name: str) -> str | None: ...


class DeployerBackend:
    def __init__(self, plan: Plan, deployer: Deployer) -> None:
        self.plan = plan
        self.deployer = deployer
        self.environ = deployer.environ

    async def start(self, name: str) -> StartOutcome:
        results = await in_thread(lambda: self.deployer.up(self.plan, [name]))
        r = results[0]
        if r.ok:
            return StartOutcome(True, f"{r.outcome}: {r.detail}", elapsed_s=r.elapsed_s or 0.0)
        return StartOutcome(False, r.detail, r.stage, r.cause, r.hint, r.elapsed_s or 0.0)

    async def stop(self, name: str, reason: str) -> None:
        await in_thread(lambda: self.deployer.down(self.plan.name, [name]))

    def record(self, name: str) -> ServerRecord | None:
        return self.deployer.store.load(self.plan.name).get(name)

    def alive(self, name: str) -> bool:
        rec = self.record(name)
        return rec is not None and self.deployer.alive(rec)

    def running(self) -> tuple[set[str], set[str]]:
        """(servers that run as this plan says, servers of ours that run otherwise: an older plan, or a
        start that never finished)."""
        ours, stale = set(), set()
        records = self.deployer.store.load(self.plan.name)
        for sp in self.plan.servers:
            rec = records.get(sp.name)
            if rec is None or not self.deployer.alive(rec):
                continue
            args = [*sp.command[1:], *sp.args()] if rec.runtime == "process" else None
            if rec.status == "running" and (args is None or rec.argv[1:] == args):
                ours.add(sp.name)
            else:
                stale.add(sp.name)
        return ours, stale

    def upstream_key(self, name: str) -> str | None:
        sp = self.plan.server(name)
        return self.deployer.environ.get(sp.api_key.env_var) if sp.api_key else None


class PlatformBackend:
    """Servers a container platform runs (compose, Kubernetes: every server start: always, each reached
    at its service name): the gateway starts and stops nothing. A start waits (bounded) for the server's
    /health, as the platform restarts a container that died; alive() is a TCP connect."""

    POLL_S = 1.0

    def __init__(self, plan: Plan, environ: dict[str, str], log: Callable[[str], None]) -> None:
        self.plan, self.environ, self.log = plan, environ, log
        self.deployer: Deployer | None = None

    def _health(self, name: str) -> tuple[bool, str]:
        sp = self.plan.server(name)
        path = sp.health.ready_path if sp.health else "/health"
        url = f"http://{sp.client_host}:{sp.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (a URL of the plan's)
                return r.status == 200, f"{url} answered {r.status}"
        except urllib.error.HTTPError as exc:
            return False, f"{url} answered {exc.code}"
        except (OSError, ValueError) as exc:
            return False, f"{url}: {type(exc).__name__}: {exc}"

    async def start(self, name: str) -> StartOutcome:
        sp = self.plan.server(name)
        assert self.plan.gateway is not None
        limit = self.plan.gateway.start_timeout(sp)
        self.log(f"[{name}] the container platform runs it: waiting up to {limit} s for its /health")
        t0 = time.monotonic()
        detail = ""
        while time.monotonic() - t0 < limit:
            ok, detail = await in_thread(lambda: self._health(name))
            if ok:
                return StartOutcome(True, f"healthy: {detail}", elapsed_s=time.monotonic() - t0)
            await asyncio.sleep(self.POLL_S)
        return StartOutcome(False, f"not healthy within {limit} s: {detail}", "health", "unreachable",
                            "the container platform restarts it: see docker compose ps / logs, or kubectl get pods",
                            time.monotonic() - t0)

    async def stop(self, name: str, reason: str) -> None:
        self.log(f"[{name}] not stopped ({reason}): the container platform runs it")

    def alive(self, name: str) -> bool:
        sp = self.plan.server(name)
        try:
            with socket.create_connection((sp.client_host, sp.port), timeout=1.0):
                return True
        except OSError:
            return False

    def running(self) -> tuple[set[str], set[str]]:
        return {sp.name for sp in self.plan.servers}, set()

    def upstream_key(self, name: str) -> str | None:
        sp = self.plan.server(name)
        return self.environ.get(sp.api_key.env_var) if sp.api_key else None
