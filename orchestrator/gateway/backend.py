"""The scheduler's backend in the gateway: the runtime's own deployer starts a server (preflight, the
launch, every health stage, the diagnosis of a failure) and stops it, exactly as `up` and `down` do;
its state file is where a restarted gateway finds the servers that still run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

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


class DeployerBackend:
    def __init__(self, plan: Plan, deployer: Deployer) -> None:
        self.plan = plan
        self.deployer = deployer

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
