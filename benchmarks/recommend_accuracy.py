"""Predicted vs measured prefill and decode (batch 1) for the Gemma 3 270M GGUF on this machine's CPU,
before and after calibration.

    python benchmarks/recommend_accuracy.py --engine llama.cpp|ik_llama|vllm [--out benchmarks/results/...json]

vllm: vLLM CPU (`orchestrate engines install vllm` first) on a random-weight Llama-shaped model of
about Gemma 3 270M's weight bytes (hidden 1024, 16 layers, FFN 2816, 16 heads, 4 KV heads, bf16:
~360 MB; vLLM CPU runs no GGUF), made once with tests/e2e/make_tiny_llama.py in the vLLM env's Python.

1. Calibration session: `orchestrate bench --up --save` at a 512-token prompt into a scratch
   results file (its own state dir, so nothing of the user's is read or written).
2. Validation session, started fresh: bench at 256- and 1024-token prompts, not saved.
3. Predictions from plan.speed on the model file's facts and the host measured after the runs: with
   the default efficiency, and with the efficiency calibrated from session 1 (recommend.calibrate).
   The validation sessions never feed the calibration, so "after" is not fitted to what it is judged on.

--out keeps the raw bench results and the saved entry, so `--recompute FILE` redoes step 3 alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"llama.cpp": ROOT / "benchmarks/profiles/gemma-llamacpp.yaml",
            "ik_llama": ROOT / "benchmarks/profiles/gemma-ikllama.yaml",
            "vllm": ROOT / "benchmarks/profiles/llama180m-vllm.yaml"}
VLLM_SHAPE = ["--hidden", "1024", "--ffn", "2816", "--layers", "16", "--heads", "16", "--kv-heads", "4"]


def vllm_model() -> Path:
    """The random-weight model the vllm profile names (made once, kept in the cache)."""
    from orchestrator.facts.installed import installed_env
    from orchestrator.paths import cache_dir

    out = cache_dir() / "test-models" / "bench-llama-180m"
    if (out / "model.safetensors").is_file():
        return out
    env = installed_env("vllm")
    if env is None:
        raise SystemExit("vLLM CPU is not installed: orchestrate engines install vllm")
    subprocess.run([env.python, str(ROOT / "tests/e2e/make_tiny_llama.py"), str(out), *VLLM_SHAPE], check=True,
                   timeout=900)
    return out


def scratch_profile(src: Path, folder: Path, extra: list[str]) -> Path:
    """The benchmark profile with extra engine args (e.g. --no-repack where AMX kernels cannot run)."""
    import socket

    import yaml

    doc = yaml.safe_load(src.read_text())
    with socket.socket() as sock:   # a port of its own: other work on this machine uses the profile's
        sock.bind(("127.0.0.1", 0))
        doc["servers"][0]["port"] = sock.getsockname()[1]
    if extra:
        doc["servers"][0]["extra_args"] = extra
    out = folder / src.name
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def bench(profile: Path, state: Path, prompt: int, gen: int, runs: int, save: bool) -> dict[str, Any]:
    argv = [sys.executable, "-m", "orchestrator", "bench", str(profile), "--up", "--json", "--no-prefix",
            "--concurrency", "1", "--runs", str(runs), "--prompt-tokens", str(prompt), "--gen-tokens", str(gen)]
    if save:
        argv.append("--save")
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(state)}
    for _ in range(3):   # the previous session's server may still be releasing the port
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, check=False)
        if p.returncode == 0 or "is taken by another process" not in p.stderr:
            break
        time.sleep(10)
    if p.returncode != 0:
        raise SystemExit(f"bench failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    [res] = json.loads(p.stdout)
    return dict(res)


def measured(res: dict[str, Any]) -> tuple[float, float]:
    lv = res["levels"][0]
    return (lv.get("server_prefill_tps") or lv["prefill_tps"], lv.get("server_decode_tps") or lv["decode_tps"])


def predictions(out: dict[str, Any], calibrate_on: int | None = None) -> list[dict[str, Any]]:
    """Predicted vs measured for every session in `out` (raw bench results and the host figures),
    with the default efficiency and with the one calibrated from the calibration session's saved entry
    (or, with calibrate_on, from that session's result alone)."""
    from orchestrator import catalog
    from orchestrator.facts.model import gather
    from orchestrator.plan.speed import Host, default_efficiency, predict
    from orchestrator.recommend.calibrate import efficiency, shares

    engine, facts, cpu = out["engine"], gather(out["model_path"]), catalog.find_gpu("cpu")
    host = Host(**out["host_figures"])
    default = default_efficiency(engine, "cpu")
    entries = out["saved_entries"]
    if calibrate_on is not None:
        entries = [{"kind": "bench", "host": out["host"], "servers": [out["sessions"][calibrate_on]["result"]]}]
    calibrated = efficiency(engine, "cpu", "cpu", shares(entries, out["host"]), out["host"],
                            "calibration session" if calibrate_on is None else f"session {calibrate_on}")
    out["default_efficiency"], out["calibrated_efficiency"] = default.__dict__, calibrated.__dict__
    rows = []
    for session in out["sessions"]:
        res, n = session["result"], session["prompt_tokens"]
        mp, md = measured(res)
        kind = "calibration" if calibrate_on is not None and session is out["sessions"][calibrate_on] else (
            session["kind"] if calibrate_on is None else "validation")
        row: dict[str, Any] = {"prompt_tokens": n, "session": kind, "measured_prefill_tps": mp,
                               "measured_decode_tps": md}
        for label, eff in (("default", default), ("calibrated", calibrated)):
            sp = predict(facts, cpu, 1, engine, "f16", host, eff, prompt_tokens=n)
            row[f"{label}_prefill_tps"] = sp.prefill_tps
            row[f"{label}_decode_tps"] = sp.decode_tps
            row[f"{label}_prefill_error"] = round(sp.prefill_tps / mp - 1, 3) if sp.prefill_tps else None
            row[f"{label}_decode_error"] = round(sp.decode_tps / md - 1, 3) if sp.decode_tps else None
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from orchestrator.measure.bench import matmul_gflops, memory_bandwidth_gbs, results_file, saved
    from orchestrator.profile import load

    if args.engine == "vllm":
        vllm_model()
    loaded = load(PROFILES[args.engine])
    model_path = os.path.expanduser(str(loaded.profile.servers[0].model.path))
    with tempfile.TemporaryDirectory(prefix="recommend-accuracy-") as tmp:
        state = Path(tmp) / "state"
        profile = scratch_profile(PROFILES[args.engine], Path(tmp), args.extra_arg)
        t0 = time.time()
        load_before = os.getloadavg()
        sessions = [{"kind": "calibration", "prompt_tokens": 512,
                     "result": bench(profile, state, 512, 128, args.runs, save=True)}]
        sessions += [{"kind": "validation", "prompt_tokens": n, "result": bench(profile, state, n, 64, args.runs,
                                                                                 save=False)}
                     for n in map(int, args.prompts.split(","))]
        bw, flops = memory_bandwidth_gbs(), matmul_gflops()   # measured after the runs, as recommend would
        return {"engine": args.engine, "extra_args": args.extra_arg, "model_path": model_path,
                "host": platform.node(), "cpus": os.cpu_count(), "load_avg_before": load_before,
                "load_avg_after": os.getloadavg(), "wall_s": round(time.time() - t0),
                "host_figures": {"bandwidth_gbs": round(bw, 1), "bandwidth_source": f"{bw:.1f} GB/s measured now",
                                 "gflops": round(flops, 1), "gflops_source": f"{flops:.1f} GFLOPS measured now"},
                "saved_entries": saved(results_file(str(state)), "bench"), "sessions": sessions}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=sorted(PROFILES), default="llama.cpp")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", default="256,1024", help="validation prompt lengths")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--extra-arg", action="append", default=[],
                    help="extra engine argument (repeat), e.g. --extra-arg=--no-repack")
    ap.add_argument("--recompute", type=Path, help="recompute the predictions of a saved --out file")
    ap.add_argument("--calibrate-on", type=int, help="with --recompute: calibrate on this session (0 = the first)")
    args = ap.parse_args()
    out = json.loads(args.recompute.read_text()) if args.recompute else run(args)
    out["rows"] = rows = predictions(out, args.calibrate_on)
    if args.calibrate_on is not None:
        out["calibrated_on_session"] = args.calibrate_on
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    for r in rows:
        print(f"{out['engine']} prompt {r['prompt_tokens']:5} ({r['session']}): prefill measured "
              f"{r['measured_prefill_tps']:8.1f}, default {r['default_prefill_tps']} ({r['default_prefill_error']:+.0%}), "
              f"calibrated {r['calibrated_prefill_tps']} ({r['calibrated_prefill_error']:+.0%}); decode measured "
              f"{r['measured_decode_tps']:6.1f}, default {r['default_decode_tps']} ({r['default_decode_error']:+.0%}), "
              f"calibrated {r['calibrated_decode_tps']} ({r['calibrated_decode_error']:+.0%})")


if __name__ == "__main__":
    main()
