"""Bench against deployments: find the running servers of a profile (or start them with --up),
and run two profiles side by side for --compare. Measurement itself lives in bench.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import catalog
from orchestrator.errors import OrchestratorError
from orchestrator.measure import bench
from orchestrator.plan.model import Plan, ServerPlan
from orchestrator.runtime.deployer import Deployer

Say = Callable[[str], None]


def target_for(plan: Plan, sp: ServerPlan, deployer: Deployer) -> bench.Target:
    rec = deployer.store.load(plan.name).get(sp.name)
    if rec is None or not deployer.alive(rec):
        raise bench.BenchError(f"server {sp.name} of {plan.name} is not running",
                               f"start it with orchestrate up {plan.profile_file}, or pass --up")
    pid = deployer.host_pid(rec)   # a container's processes are host processes: RSS is sampled by pid
    key = None
    if sp.api_key is not None:
        key = deployer.environ.get(sp.api_key.env_var)
        if not key:
            raise bench.BenchError(f"server {sp.name} needs the API key in {sp.api_key.env_var}, which is not set",
                                   f"export {sp.api_key.env_var}=<key>")
    bandwidth = tflops = None
    gpu_id = plan.hardware.gpu
    if sp.accelerator != "cpu" and gpu_id:
        gpu = catalog.gpus().get(gpu_id)
        if gpu is not None and gpu.bandwidth_gbs:
            bandwidth = gpu.bandwidth_gbs * max(sp.gpu_count, 1)
        if gpu is not None and gpu.fp16_tflops:
            tflops = gpu.fp16_tflops * max(sp.gpu_count, 1)
    kv = sp.settings.kv_cache if sp.settings else "f16"
    return bench.Target(sp.name, rec.host, rec.port, sp.served_name, sp.engine, key, pid,
                        "" if sp.model_is_hf else sp.model_location,
                        "f16" if kv in ("auto", "bf16") else kv, bandwidth, sp.gpu_ids,
                        gpu_id if sp.accelerator != "cpu" and gpu_id else "cpu", tflops)


def select(plan: Plan, only: list[str] | None) -> list[ServerPlan]:
    unknown = set(only or []) - {sp.name for sp in plan.servers}
    if unknown:
        raise OrchestratorError(f"no server named {', '.join(sorted(unknown))} in {plan.name}",
                                f"servers: {', '.join(sp.name for sp in plan.servers)}")
    return [sp for sp in plan.servers if not only or sp.name in only]


@dataclass
class Started:
    """Servers a bench run started itself and must stop again."""

    deployer: Deployer
    plan: Plan
    names: list[str]

    def stop(self) -> None:
        if self.names:
            self.deployer.down(self.plan.name, self.names)


def start(deployer: Deployer, plan: Plan, only: list[str] | None) -> Started:
    names = [sp.name for sp in select(plan, only)]
    records = deployer.store.load(plan.name)
    running = {n for n in names if n in records and deployer.alive(records[n])}
    try:
        results = deployer.up(plan, names)
    except BaseException:   # interrupted (Ctrl-C, SIGTERM) while starting: stop what this run started
        now = deployer.store.load(plan.name)
        Started(deployer, plan, [n for n in names if n in now and n not in running]).stop()
        raise
    started = Started(deployer, plan, [r.server for r in results if r.outcome in ("started", "restarted")])
    failed = [r for r in results if not r.ok]
    if failed:
        started.stop()
        r = failed[0]
        raise OrchestratorError(f"server {r.server} did not start for the bench: {r.detail}"
                                + (f" (stage {r.stage})" if r.stage else ""), r.hint or "see orchestrate logs")
    return started


def bench_plan(plan: Plan, deployer: Deployer, only: list[str] | None, opts: dict[str, Any],
               say: Say) -> list[bench.ServerResult]:
    return [bench.bench_target(target_for(plan, sp, deployer), opts["prompt_tokens"], opts["gen_tokens"],
                               opts["concurrency"], opts["runs"], prefix=opts.get("prefix", True), progress=say,
                               depth=opts.get("depth", 0))
            for sp in select(plan, only)]


def _clash(a: Plan, b: Plan) -> bool:
    ports_a = {s.port for s in a.servers}
    return a.name == b.name or any(s.port in ports_a for s in b.servers)


def compare(plan_a: Plan, plan_b: Plan, deployer: Deployer, only: list[str] | None, opts: dict[str, Any],
            say: Say) -> tuple[list[list[bench.ServerResult]], list[list[bench.ServerResult]], str]:
    """Rounds A B A B ...; each round one measurement of every level of each profile. Profiles
    whose names or ports clash are started and stopped in turn; otherwise both stay up."""
    rounds = opts["runs"]
    one = {**opts, "runs": 1, "prefix": False}
    runs_a: list[list[bench.ServerResult]] = []
    runs_b: list[list[bench.ServerResult]] = []
    alternate = _clash(plan_a, plan_b)
    mode = ("one profile at a time (their names or ports clash): each round starts A, measures it, stops it, "
            "then the same for B" if alternate else "both profiles up at once, measured in turn")
    held: list[Started] = []
    try:
        if not alternate:
            held = [start(deployer, plan_a, only), start(deployer, plan_b, only)]
        for i in range(rounds):
            for label, plan, sink in (("A", plan_a, runs_a), ("B", plan_b, runs_b)):
                say(f"round {i + 1}/{rounds}: {label} = {plan.name}")
                if alternate:
                    st = start(deployer, plan, only)
                    try:
                        sink.append(bench_plan(plan, deployer, only, one, say))
                    finally:
                        st.stop()
                else:
                    sink.append(bench_plan(plan, deployer, only, one, say))
    finally:
        for st in held:
            st.stop()
    return runs_a, runs_b, mode
