"""Cold start of `orchestrate plan`: wall time of a fresh interpreter, interleaved with baselines.

    python benchmarks/cold_start.py [--runs 15] [--baseline-tree DIR]

Reports medians for: bare `python -c pass`, importing only what `plan` needs (pydantic, yaml,
click), and the real `orchestrate plan examples/quickstart-cpu.yaml`. Also lists which heavy
modules (docker, gguf, rich, requests, jinja2, psutil) `plan` loaded: the goal is none.
--baseline-tree DIR adds `orchestrate plan` from another orchestrator tree (first on PYTHONPATH) to
the same rounds. Children run with bytecode caching on, as an installed package does.
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

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import pydantic+yaml+click": [sys.executable, "-c", "import pydantic, yaml, click"],
    "orchestrate plan": [sys.executable, "-m", "orchestrator", "plan", str(ROOT / "examples/quickstart-cpu.yaml")],
}
PROBE = ("import sys; sys.argv=['orchestrate','plan','examples/quickstart-cpu.yaml']\n"
         "from orchestrator.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
         "print([m for m in ('docker','gguf','rich','requests','jinja2','psutil') if m in sys.modules], file=sys.stderr)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--baseline-tree", type=Path)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cases = {name: (argv, env) for name, argv in CASES.items()}
    if args.baseline_tree:
        cases["orchestrate plan (baseline)"] = (CASES["orchestrate plan"],
                                                {**env, "PYTHONPATH": str(args.baseline_tree.resolve())})
    # Not from the checkout: `python -m` puts the working directory first on sys.path, which would
    # shadow the baseline tree on PYTHONPATH.
    cwd = tempfile.mkdtemp()
    for argv, case_env in cases.values():   # a first run writes the bytecode caches
        subprocess.run(argv, cwd=cwd, capture_output=True, check=True, env=case_env)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, (argv, case_env) in cases.items():  # interleaved so machine noise hits every case alike
            t0 = time.perf_counter()
            subprocess.run(argv, cwd=cwd, capture_output=True, check=True, env=case_env)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'case':32} {'median ms':>10} {'min ms':>8} {'vs python':>10}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:32} {m * 1000:10.1f} {min(ts) * 1000:8.1f} {m / base:10.2f}x")
    heavy = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True).stderr.strip()
    print(f"heavy modules loaded by plan: {heavy.splitlines()[-1]}")


if __name__ == "__main__":
    main()
