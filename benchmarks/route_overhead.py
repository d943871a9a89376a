"""What a routing decision costs in the gateway: `Router.prepare` (score, conversation key, pin,
header) on every prompt of the labeled set (orchestrator/data/route_prompts.jsonl), as the gateway
calls it for a request to a route, repeated in rounds; no model judgement, no network.

    python benchmarks/route_overhead.py [--rounds 50] [--json]

Reported: p50, p95, p99 and max per decision in microseconds, over all prompts and per kind (the
long-context prompts carry 5-8k characters of text, the agent ones a 2.6k-character system prompt and
a tool list), and the same for `score` alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.gateway import route_set  # noqa: E402
from orchestrator.gateway.call import Call  # noqa: E402
from orchestrator.gateway.routing import Router, score  # noqa: E402
from orchestrator.plan.model import RoutePlan, RouteTier  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_us": round(statistics.median(xs), 1), "p95_us": round(pct(xs, 0.95), 1),
            "p99_us": round(pct(xs, 0.99), 1), "max_us": round(max(xs), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    route = RoutePlan("auto", [RouteTier("fast", "small", "simple"), RouteTier("smart", "big", None)],
                      {"simple": 0.17, "medium": 0.35, "complex": 0.6}, 4096, 2)
    router = Router([route])
    items = route_set.load()
    prepare: dict[str, list[float]] = {}
    scoring: list[float] = []
    for r in range(args.rounds):
        for item in items:
            call = Call("/v1/chat/completions", item.body, b"", "auto", "", False, time.perf_counter(),
                        f"addr:{r}")
            t0 = time.perf_counter()
            router.prepare(call)
            prepare.setdefault(item.kind, []).append((time.perf_counter() - t0) * 1e6)
            t0 = time.perf_counter()
            score(item.body, route.thresholds)
            scoring.append((time.perf_counter() - t0) * 1e6)
    every = [x for xs in prepare.values() for x in xs]
    out = {"prompts": len(items), "rounds": args.rounds, "prepare": summary(every), "score": summary(scoring),
           "by_kind": {k: summary(v) for k, v in sorted(prepare.items())}}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{len(items)} prompts x {args.rounds} rounds")
    for label, s in (("Router.prepare", out["prepare"]), ("score alone", out["score"])):
        print(f"  {label:16} p50 {s['p50_us']} us  p95 {s['p95_us']} us  p99 {s['p99_us']} us  max {s['max_us']} us")
    for k, s in out["by_kind"].items():
        print(f"  {k:16} p50 {s['p50_us']} us  p95 {s['p95_us']} us  p99 {s['p99_us']} us")


if __name__ == "__main__":
    main()
