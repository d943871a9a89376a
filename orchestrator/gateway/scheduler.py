"""Who may run where and when: the gateway's one state owner.

Every state change goes through `_pump`, a synchronous pass (no await inside, so on the event loop it
is never interleaved with another) that admits waiting requests, starts stopped servers that fit the
memory budget, picks servers to stop to make room, and stops the drained ones. Starts and stops run as
tasks on a `Backend` (the runtime's deployer in the gateway; the unit tests drive a scripted one) and
call `_pump` again when they end.

Rules (issue 17):
- each server admits at most `parallel` requests; more wait FIFO, up to `queue`, then 429;
- a stopped server starts on its first request; its waiters get 503 naming stage and cause when the
  start fails, and requests in the following back-off get that answer at once;
- before a start the fit estimates of everything loaded plus the new one must fit the budget; if not,
  on-demand servers are stopped, idle ones first, least recently used first; never an `always` server,
  never one with requests in flight (it is drained: it keeps serving the requests that were queued
  before, new ones wait), and if even stopping every candidate cannot make room the answer is 503 with
  the figures;
- collation: while a server drains for another, requests that arrive for it wait instead of keeping it
  loaded, so a burst of alternating requests swaps a few times, not once per request;
- an on-demand server idle for `idle_timeout` is stopped; an upstream that died is stopped and
  restarted on the next request, with back-off.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

GIB = 2**30
DRAIN_WAIT_S = 120.0           # how long a request may wait for servers to drain before it gets 503
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass
class StartOutcome:
    ok: bool
    detail: str = ""
    stage: str | None = None
    cause: str | None = None
    hint: str | None = None
    elapsed_s: float = 0.0


class Backend(Protocol):
    async def start(self, name: str) -> StartOutcome: ...
    async def stop(self, name: str, reason: str) -> None: ...
    def alive(self, name: str) -> bool: ...


class Events:
    """What the scheduler reports (the gateway's metrics and log); every method may be left as is."""

    def started(self, name: str, outcome: StartOutcome) -> None: ...
    def stopped(self, name: str, reason: str) -> None: ...
    def rejected(self, name: str, status: int, reason: str) -> None: ...
    def changed(self, name: str, state: str, inflight: int, waiting: int) -> None: ...


class Rejected(Exception):
    """A request the gateway answers itself: status, message, and Retry-After where it helps."""

    def __init__(self, status: int, message: str, kind: str, retry_after: float | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.retry_after = retry_after
        self.extra = extra or {}


@dataclass
class ServerSpec:
    name: str
    start: str                         # always | on_demand
    parallel: int
    needs: dict[str, int]              # resource -> bytes
    idle_timeout_s: float | None
    start_timeout_s: float


@dataclass
class Waiter:
    seq: int
    future: asyncio.Future[None]


@dataclass
class Entry:
    spec: ServerSpec
    state: str = "stopped"             # stopped | loading | running | stopping | failed
    inflight: int = 0
    waiters: deque[Waiter] = field(default_factory=deque)
    last_used: float = 0.0
    drain_before: int | None = None    # draining: only waiters queued before this sequence are admitted
    failure: StartOutcome | None = None
    retry_at: float = 0.0
    failures: int = 0                  # consecutive failed starts and upstream deaths (back-off index)
    restart_delay: float = 0.0         # after a crash: the back-off the next start waits first
    starts: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def admissible(self) -> Waiter | None:
        """The next waiter this server may serve now (draining: only those queued before the mark)."""
        while self.waiters and self.waiters[0].future.done():
            self.waiters.popleft()       # cancelled while waiting
        if not self.waiters:
            return None
        first = self.waiters[0]
        if self.drain_before is not None and first.seq >= self.drain_before:
            return None
        return first


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


class Scheduler:
    def __init__(self, specs: list[ServerSpec], budgets: dict[str, int | None], backend: Backend, queue: int,
                 events: Events | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.entries = {s.name: Entry(s) for s in specs}
        self.budgets = budgets
        self.backend = backend
        self.queue = queue
        self.events = events or Events()
        self.clock = clock
        self._seq = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ requests

    def enqueue(self, name: str) -> Waiter:
        """Queue a request for `name` and admit it at once when it can be; raises Rejected (429, 503)."""
        e = self.entries[name]
        now = self.clock()
        if e.state == "failed" and now < e.retry_at and e.failure is not None:
            self._reject(e, self._failure(e, now))
        pending = sum(1 for w in e.waiters if not w.future.done())
        free = e.spec.parallel - (e.inflight if e.state == "running" else 0)
        if pending >= self.queue + max(free, 0):
            retry = max(1.0, (pending + e.inflight) / max(e.spec.parallel, 1))
            self._reject(e, Rejected(429, f"server {name} has {e.inflight} requests running and {pending} waiting "
                                     f"(its limit: parallel {e.spec.parallel}, queue {self.queue})",
                                     "queue_full", retry_after=retry))
        w = Waiter(next(self._seq), asyncio.get_running_loop().create_future())
        e.waiters.append(w)
        self._pump()
        return w

    async def wait(self, name: str, w: Waiter) -> None:
        """Wait until the request is admitted; bounded by the server's start timeout plus the drain wait."""
        e = self.entries[name]
        bound = e.spec.start_timeout_s + DRAIN_WAIT_S
        try:
            await asyncio.wait_for(asyncio.shield(w.future), bound)
        except TimeoutError:
            if not w.future.done():
                w.future.cancel()
                self._pump()
                self._reject(e, Rejected(503, f"waited {bound:.0f} s for server {name} ({self.describe(name)})",
                                         "wait_timeout", retry_after=5.0))
            # admitted at the last moment: keep it
        except asyncio.CancelledError:
            self.abandon(name, w)
            raise
        if w.future.cancelled():
            raise asyncio.CancelledError
        exc = w.future.exception()
        if exc is not None:
            raise exc

    def abandon(self, name: str, w: Waiter) -> None:
        """The client went away: drop its place, or give back its slot if it had been admitted."""
        if not w.future.done():
            w.future.cancel()
        elif not w.future.cancelled() and w.future.exception() is None:
            self.release(name)
            return
        self._pump()

    def release(self, name: str, ok: bool = True) -> None:
        e = self.entries[name]
        e.inflight = max(0, e.inflight - 1)
        e.last_used = self.clock()
        if ok and e.state == "running":
            e.failures = 0
        self._pump()

    def upstream_died(self, name: str, detail: str) -> None:
        """A request to `name` failed at the connection: if its process is gone, stop (clean up) and mark it
        for a restart on the next request, after a back-off."""
        e = self.entries[name]
        if e.state != "running":
            return
        if not self.backend.alive(name):
            self._mark_dead(e, detail)
        else:
            self._spawn(self._check_dead(name, detail))

    async def _check_dead(self, name: str, detail: str) -> None:
        e = self.entries[name]
        for _ in range(5):            # a killed process closes its sockets a moment before it is reapable
            if e.state != "running":
                return
            if not self.backend.alive(name):
                break
            await asyncio.sleep(0.2)
        else:
            return
        self._mark_dead(e, detail)

    def _mark_dead(self, e: Entry, detail: str) -> None:
        e.failures += 1
        e.failure = StartOutcome(False, f"the server died: {detail}", "running", "crashed",
                                 "the next request restarts it; see orchestrate logs")
        self._begin_stop(e, "crashed")

    # ------------------------------------------------------------------ the one state owner

    def _pump(self) -> None:
        for _ in range(4 * len(self.entries) + 4):
            if not self._pump_once():
                break
        for e in self.entries.values():
            self.events.changed(e.name, e.state, e.inflight, sum(1 for w in e.waiters if not w.future.done()))

    def _pump_once(self) -> bool:
        changed = False
        for e in self.entries.values():
            while e.state == "running" and e.inflight < e.spec.parallel:
                w = e.admissible()
                if w is None:
                    break
                e.waiters.popleft()
                w.future.set_result(None)
                e.inflight += 1
                e.last_used = self.clock()
        for e in self.entries.values():
            if e.state == "running" and e.drain_before is not None and e.inflight == 0 and e.admissible() is None:
                self._begin_stop(e, "swap")
                changed = True
        waiting = [e for e in self.entries.values() if e.state in ("stopped", "failed") and e.admissible()]
        for e in sorted(waiting, key=lambda x: x.waiters[0].seq):
            changed = self._place(e) or changed
        return changed

    def _used(self, skip: set[str]) -> dict[str, int]:
        """Memory taken now: servers loading, running or stopping, and every `always` server (its room is
        kept so it can always come back)."""
        used: dict[str, int] = {}
        for e in self.entries.values():
            if e.name in skip:
                continue
            if e.state in ("loading", "running", "stopping") or e.spec.start == "always":
                for r, b in e.spec.needs.items():
                    used[r] = used.get(r, 0) + b
        return used

    def _over(self, e: Entry, freed: set[str]) -> list[tuple[str, int, int, int]]:
        """(resource, need, used, budget) wherever e does not fit beside the others (minus `freed`)."""
        used = self._used(freed | {e.name})
        out = []
        for r, need in e.spec.needs.items():
            budget = self.budgets.get(r)
            if budget is not None and need and used.get(r, 0) + need > budget:
                out.append((r, need, used.get(r, 0), budget))
        return out

    def _place(self, e: Entry) -> bool:
        now = self.clock()
        if e.state == "failed" and now < e.retry_at:
            self._fail_waiters(e, self._failure(e, now))
            return False
        over = self._over(e, set())
        if not over:
            self._begin_start(e)
            return True
        victims = self._victims(e)
        if victims is None:
            figures = "; ".join(f"{r}: needs {_gib(n)} beside {_gib(u)} in use, budget {_gib(b)}"
                                for r, n, u, b in over)
            self._fail_waiters(e, Rejected(503, f"server {e.name} does not fit the gateway's memory budget even "
                                           f"after stopping every idle on-demand server: {figures}",
                                           "does_not_fit", extra={"over": [
                                               {"resource": r, "need_bytes": n, "used_bytes": u, "budget_bytes": b}
                                               for r, n, u, b in over]}))
            return False
        changed = False
        for v in victims:
            if v.state in ("running", "loading") and v.drain_before is None:
                # It serves what is queued for it already; later requests for it wait (collation).
                v.drain_before = next(self._seq)
                changed = True
        return changed

    def _victims(self, e: Entry) -> list[Entry] | None:
        """The servers to stop so that e fits: already leaving ones first, then idle before busy, least
        recently used first; None when even all of them would not make room."""
        leaving = [v for v in self.entries.values() if v.state == "stopping"
                   or (v.state in ("running", "loading") and v.drain_before is not None)]
        candidates = sorted((v for v in self.entries.values()
                             if v.state in ("running", "loading") and v.drain_before is None
                             and v.spec.start == "on_demand" and v is not e),
                            key=lambda v: (v.state == "loading", v.inflight > 0 or bool(v.admissible()),
                                           v.last_used))
        chosen = list(leaving)
        if not self._over(e, {v.name for v in chosen}):
            return chosen
        for v in candidates:
            if not any(r in v.spec.needs for r, *_ in self._over(e, {c.name for c in chosen})):
                continue          # stopping it frees nothing that is short
            chosen.append(v)
            if not self._over(e, {c.name for c in chosen}):
                return chosen
        return None

    def _failure(self, e: Entry, now: float) -> Rejected:
        f = e.failure or StartOutcome(False, "failed")
        stage = f" at stage {f.stage}" if f.stage else ""
        cause = f" ({f.cause}: {f.hint})" if f.cause else ""
        return Rejected(503, f"server {e.name} failed to start{stage}: {f.detail}{cause}", "start_failed",
                        retry_after=max(1.0, e.retry_at - now),
                        extra={"stage": f.stage, "cause": f.cause, "hint": f.hint})

    def _reject(self, e: Entry, exc: Rejected) -> None:
        self.events.rejected(e.name, exc.status, exc.kind)
        raise exc

    def _fail_waiters(self, e: Entry, exc: Rejected) -> None:
        while e.waiters:
            w = e.waiters.popleft()
            if not w.future.done():
                self.events.rejected(e.name, exc.status, exc.kind)
                w.future.set_exception(exc)

    # ------------------------------------------------------------------ starts and stops

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _begin_start(self, e: Entry) -> None:
        e.state = "loading"
        e.starts += 1
        self._spawn(self._start(e))

    async def _start(self, e: Entry) -> None:
        if e.restart_delay:           # it crashed: back off before starting it again (a failed start waited
            delay, e.restart_delay = e.restart_delay, 0.0    # out its retry_at before getting here)
            await asyncio.sleep(delay)
        try:
            outcome = await self.backend.start(e.name)
        except Exception as exc:  # the backend's own bug: report it as a failed start, never hang
            outcome = StartOutcome(False, f"{type(exc).__name__}: {exc}", "preflight", "unknown", "see the gateway log")
        self.events.started(e.name, outcome)
        now = self.clock()
        if outcome.ok:
            e.state, e.failure, e.last_used = "running", None, now
        else:
            e.failures += 1
            e.state, e.failure, e.drain_before = "failed", outcome, None
            e.retry_at = now + BACKOFF_S[min(e.failures, len(BACKOFF_S)) - 1]
            self._fail_waiters(e, self._failure(e, now))
        self._pump()

    def _begin_stop(self, e: Entry, reason: str) -> None:
        e.state = "stopping"
        self._spawn(self._stop(e, reason))

    async def _stop(self, e: Entry, reason: str) -> None:
        try:
            await self.backend.stop(e.name, reason)
        finally:
            self.events.stopped(e.name, reason)
            e.drain_before = None
            if reason == "crashed":
                e.state = "failed"
                e.retry_at = 0.0      # restart on the next request (its start waits out the back-off)
                e.restart_delay = BACKOFF_S[min(e.failures, len(BACKOFF_S)) - 1]
            else:
                e.state = "stopped"
            self._pump()

    def tick(self) -> None:
        """Stop on-demand servers idle for their idle_timeout (called about once a second)."""
        now = self.clock()
        for e in self.entries.values():
            idle = e.spec.idle_timeout_s
            if (idle and e.spec.start == "on_demand" and e.state == "running" and e.inflight == 0
                    and e.admissible() is None and e.drain_before is None and now - e.last_used >= idle):
                self._begin_stop(e, "idle")
        self._pump()

    def stop(self, name: str, reason: str) -> str | None:
        """Stop an on-demand server that serves nothing now (the dashboard's stop); the reason it was
        not stopped otherwise."""
        e = self.entries[name]
        if e.spec.start != "on_demand":
            return f"{name} is a start: always server"
        if e.state != "running":
            return f"{name} is {e.state}, not running"
        if e.inflight or e.admissible() is not None or e.drain_before is not None:
            return f"{name} is busy ({self.describe(name)}): try again when it is idle"
        self._begin_stop(e, reason)
        self._pump()
        return None

    def adopt(self, running: set[str]) -> None:
        """Servers found running when the gateway starts (up's always servers, or on-demand servers a
        previous gateway started): serve them, and let their idle clocks start now."""
        now = self.clock()
        for name in running:
            if name in self.entries:
                e = self.entries[name]
                e.state, e.last_used = "running", now
        self._pump()

    async def drain_tasks(self) -> None:
        """Wait for the starts and stops in progress (tests; shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ------------------------------------------------------------------ views

    def state(self, name: str) -> str:
        """running | loading | stopped, as /v1/models shows it."""
        st = self.entries[name].state
        return st if st in ("running", "loading") else "stopped"

    def describe(self, name: str) -> str:
        e = self.entries[name]
        waiting = sum(1 for w in e.waiters if not w.future.done())
        text = f"{e.state}, {e.inflight} running, {waiting} waiting"
        if e.state in ("stopped", "failed") and waiting:
            draining = [v.name for v in self.entries.values()
                        if v.drain_before is not None or v.state == "stopping"]
            if draining:
                text += f"; making room: {', '.join(draining)} draining"
        return text
