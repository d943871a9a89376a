"""The gateway's scheduler on its own: admission, queue bound, start failures, memory-aware swaps
(LRU, idle first, never in flight, never an always server), collation, idle stops, crash restarts.
The backend here is a scripted one that records what it was asked; the real runtime behind it is
exercised in tests/e2e/test_gateway.py."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.gateway import scheduler as sched_mod
from orchestrator.gateway.scheduler import Rejected, Scheduler, ServerSpec, StartOutcome

GIB = 2**30


class ScriptedBackend:
    def __init__(self, fail: dict[str, StartOutcome] | None = None, start_s: float = 0.01) -> None:
        self.fail = fail or {}
        self.start_s = start_s
        self.calls: list[tuple[str, str]] = []
        self.running: set[str] = set()
        self.sched: Scheduler | None = None
        self.max_loaded = 0

    async def start(self, name: str) -> StartOutcome:
        self.calls.append(("start", name))
        await asyncio.sleep(self.start_s)
        if name in self.fail:
            return self.fail[name]
        self.running.add(name)
        self.max_loaded = max(self.max_loaded, len(self.running))
        return StartOutcome(True, "started")

    async def stop(self, name: str, reason: str) -> None:
        assert self.sched is not None
        assert self.sched.entries[name].inflight == 0 or reason == "crashed", f"stopped {name} with requests in flight"
        assert self.sched.entries[name].spec.start == "on_demand" or reason == "crashed"
        self.calls.append((f"stop:{reason}", name))
        await asyncio.sleep(0.005)
        self.running.discard(name)

    def alive(self, name: str) -> bool:
        return name in self.running

    def starts(self) -> list[str]:
        return [n for c, n in self.calls if c == "start"]


def spec(name: str, need: float = 1.0, parallel: int = 1, start: str = "on_demand",
         idle: float | None = None) -> ServerSpec:
    return ServerSpec(name, start, parallel, {"RAM": int(need * GIB)}, idle, 30)


def make(specs: list[ServerSpec], budget: float | None = 1.5, queue: int = 8, backend: ScriptedBackend | None = None,
         clock=None) -> tuple[Scheduler, ScriptedBackend]:
    b = backend or ScriptedBackend()
    kwargs = {"clock": clock} if clock else {}
    s = Scheduler(specs, {"RAM": int(budget * GIB) if budget else None}, b, queue, **kwargs)
    b.sched = s
    return s, b


async def request(s: Scheduler, name: str, work_s: float = 0.01, log: list[str] | None = None) -> None:
    w = s.enqueue(name)
    await s.wait(name, w)
    if log is not None:
        log.append(name)
    await asyncio.sleep(work_s)
    s.release(name)


def test_first_request_starts_a_stopped_server() -> None:
    async def main() -> None:
        s, b = make([spec("a")])
        assert s.state("a") == "stopped"
        w = s.enqueue("a")
        assert s.state("a") == "loading" and not w.future.done()
        await s.wait("a", w)
        assert s.state("a") == "running" and s.entries["a"].inflight == 1
        s.release("a")
        assert b.starts() == ["a"]
    asyncio.run(main())


def test_parallel_limit_then_fifo_queue_then_429() -> None:
    async def main() -> None:
        s, b = make([spec("a", parallel=2)], queue=2)
        s.adopt({"a"})
        b.running.add("a")
        ws = [s.enqueue("a") for _ in range(4)]
        assert [w.future.done() for w in ws] == [True, True, False, False]
        with pytest.raises(Rejected) as exc:
            s.enqueue("a")
        assert exc.value.status == 429 and exc.value.retry_after and exc.value.retry_after >= 1
        s.release("a")
        assert ws[2].future.done() and not ws[3].future.done()   # FIFO
        s.release("a")
        assert ws[3].future.done()
    asyncio.run(main())


def test_failed_start_answers_503_with_stage_and_cause_then_backs_off() -> None:
    async def main() -> None:
        fail = StartOutcome(False, "process exited with code 1 during stage 'ready'", "ready", "model_corrupt",
                            "download it again")
        s, b = make([spec("a")], backend=ScriptedBackend(fail={"a": fail}))
        w1, w2 = s.enqueue("a"), s.enqueue("a")
        for w in (w1, w2):
            with pytest.raises(Rejected) as exc:
                await s.wait("a", w)
            assert exc.value.status == 503 and "stage ready" in exc.value.message
            assert "model_corrupt" in exc.value.message and exc.value.extra["cause"] == "model_corrupt"
        with pytest.raises(Rejected) as again:        # inside the back-off: answered at once, not started again
            s.enqueue("a")
        assert again.value.retry_after is not None and b.starts() == ["a"]
    asyncio.run(main())


def test_swap_stops_idle_lru_on_demand_server_first() -> None:
    async def main() -> None:
        t = [100.0]
        s, b = make([spec("a"), spec("b"), spec("c")], budget=2.5, clock=lambda: t[0])
        await request(s, "a")
        t[0] += 1
        await request(s, "b")
        t[0] += 1
        await request(s, "a")        # a is now the more recently used
        await request(s, "c")        # room for two: b (least recently used) goes
        assert ("stop:swap", "b") in b.calls and ("stop:swap", "a") not in b.calls
        assert b.running == {"a", "c"}
    asyncio.run(main())


def test_never_stops_a_server_with_requests_in_flight() -> None:
    async def main() -> None:
        s, b = make([spec("a"), spec("b")])
        wa = s.enqueue("a")
        await s.wait("a", wa)              # a holds a request
        task = asyncio.create_task(request(s, "b"))
        await asyncio.sleep(0.05)
        assert s.state("a") == "running" and s.state("b") == "stopped" and not task.done()
        assert "draining" in s.describe("b")
        s.release("a")                     # a drains: now it may go
        await asyncio.wait_for(task, 2)
        assert b.calls[-2:] == [("stop:swap", "a"), ("start", "b")]
    asyncio.run(main())


def test_always_servers_are_never_stopped_and_a_misfit_gets_503_with_figures() -> None:
    async def main() -> None:
        s, b = make([spec("a", start="always"), spec("b", need=1.0)], budget=1.5)
        s.adopt({"a"})
        b.running.add("a")
        w = s.enqueue("b")
        with pytest.raises(Rejected) as exc:
            await s.wait("b", w)
        assert exc.value.status == 503 and exc.value.kind == "does_not_fit"
        assert "RAM: needs 1.00 GiB beside 1.00 GiB in use, budget 1.50 GiB" in exc.value.message
        assert exc.value.extra["over"][0]["budget_bytes"] == int(1.5 * GIB)
        assert not [c for c in b.calls if c[0].startswith("stop")]
    asyncio.run(main())


def test_collation_a_burst_of_alternating_requests_swaps_a_few_times() -> None:
    async def main() -> None:
        s, b = make([spec("a"), spec("b")], queue=32)
        log: list[str] = []
        names = ["a", "b"] * 10
        await asyncio.gather(*(request(s, n, 0.005, log) for n in names))
        assert sorted(log) == sorted(names)
        assert b.max_loaded == 1                    # never both: the budget holds one
        assert len(b.starts()) <= 3, b.calls        # 20 alternating requests, at most 3 starts
        changes = sum(1 for x, y in zip(log, log[1:]) if x != y)
        assert changes <= 2, log                    # served as runs: a a a … b b b …
    asyncio.run(main())


def test_a_loading_server_is_drained_after_it_loads_not_a_reason_for_503() -> None:
    async def main() -> None:
        s, b = make([spec("a"), spec("b")], backend=ScriptedBackend(start_s=0.05))
        ta = asyncio.create_task(request(s, "a"))
        await asyncio.sleep(0.01)
        assert s.state("a") == "loading"
        await asyncio.wait_for(asyncio.gather(ta, request(s, "b")), 2)
        assert b.starts() == ["a", "b"]
    asyncio.run(main())


def test_idle_timeout_stops_on_demand_server() -> None:
    async def main() -> None:
        t = [0.0]
        s, b = make([spec("a", idle=30), spec("k", start="always", need=0.1, idle=None)], budget=4,
                    clock=lambda: t[0])
        s.adopt({"k"})
        await request(s, "a")
        t[0] += 29
        s.tick()
        assert s.state("a") == "running"
        t[0] += 2
        s.tick()
        await s.drain_tasks()
        assert s.state("a") == "stopped" and ("stop:idle", "a") in b.calls
        assert s.state("k") == "running"           # always: no idle stop
    asyncio.run(main())


def test_dead_upstream_is_cleaned_up_and_restarted_on_next_request(monkeypatch) -> None:
    monkeypatch.setattr(sched_mod, "BACKOFF_S", (0.01, 0.02))

    async def main() -> None:
        s, b = make([spec("a")])
        await request(s, "a")
        b.running.discard("a")                      # the process died
        s.upstream_died("a", "peer closed connection")
        await s.drain_tasks()
        assert ("stop:crashed", "a") in b.calls and s.state("a") == "stopped"
        await request(s, "a")                       # restarted
        assert b.starts() == ["a", "a"]
    asyncio.run(main())


def test_upstream_error_on_a_live_server_does_not_stop_it() -> None:
    async def main() -> None:
        s, b = make([spec("a")])
        await request(s, "a")
        s.upstream_died("a", "read timeout")
        await asyncio.sleep(1.2)
        assert s.state("a") == "running" and not [c for c in b.calls if c[0].startswith("stop")]
    asyncio.run(main())


def test_client_that_gives_up_while_waiting_leaves_nothing_behind() -> None:
    async def main() -> None:
        s, b = make([spec("a")], backend=ScriptedBackend(start_s=0.1))
        w = s.enqueue("a")
        task = asyncio.create_task(s.wait("a", w))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await s.drain_tasks()
        e = s.entries["a"]
        assert e.inflight == 0 and e.admissible() is None and s.state("a") == "running"
    asyncio.run(main())


def test_a_failed_start_is_retried_after_its_back_off_without_waiting_again() -> None:
    async def main() -> None:
        t = [0.0]
        fail = StartOutcome(False, "exited", "ready", "crashed", "see the log")
        backend = ScriptedBackend(fail={"a": fail})
        s, b = make([spec("a")], backend=backend, clock=lambda: t[0])
        with pytest.raises(Rejected):
            await s.wait("a", s.enqueue("a"))
        t[0] += 60                                   # past retry_at
        del backend.fail["a"]
        t0 = asyncio.get_running_loop().time()
        await request(s, "a")
        assert asyncio.get_running_loop().time() - t0 < 0.5 and b.starts() == ["a", "a"]
    asyncio.run(main())
