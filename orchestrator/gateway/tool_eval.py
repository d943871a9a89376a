"""The tool-use suite (orchestrator/data/tool_tasks.json) run against a server directly and through the
gateway (`orchestrate eval-tools`): valid-call rate (judged by the same check the gateway applies),
task-correct rate (the expected tools with the expected arguments), attempts per task, added latency
p50/p95, and the failure kinds."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import httpx

from orchestrator.gateway import toolcalls as tc
from orchestrator.gateway.toolflow import ATTEMPTS, HEADER

SYSTEM = "You are a helpful assistant with access to tools. Call a tool when it helps answer the user."


def load_tasks() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(resources.files("orchestrator.data").joinpath("tool_tasks.json").read_text())
    return data


def request_for(task: dict[str, Any], tools: dict[str, Any], model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "temperature": 0, "max_tokens": max_tokens, "tool_choice": task["tool_choice"],
            "tools": [tools[n] for n in task["tools"]],
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task["prompt"]}]}


def _get(args: dict[str, Any], dotted: str) -> Any:
    value: Any = args
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def matches(want: Any, got: Any) -> bool:
    if isinstance(want, bool):
        return got is want
    if isinstance(want, int | float):
        return isinstance(got, int | float) and not isinstance(got, bool) and got == want
    if isinstance(want, str):
        return isinstance(got, str) and want.lower() in got.lower()
    if isinstance(want, list):
        return isinstance(got, list) and all(any(matches(w, g) for g in got) for w in want)
    return bool(want == got)


def correct(task: dict[str, Any], message: dict[str, Any]) -> bool:
    """The answer makes the expected calls (in any order) with the expected arguments; for a task that
    needs no tool, it calls none."""
    calls = message.get("tool_calls") or []
    expect = task["expect"]
    if not expect:
        return not calls
    if len(calls) < len(expect):
        return False
    left = list(calls)
    for e in expect:
        for c in left:
            fn = c.get("function") or {}
            args = tc._parse_args(fn.get("arguments"))[0]
            if fn.get("name") == e["name"] and args is not None and all(matches(w, _get(args, k))
                                                                         for k, w in e["args"].items()):
                left.remove(c)
                break
        else:
            return False
    return True


@dataclass
class TaskResult:
    id: str
    status: int
    valid: bool          # the answer passes the gateway's check (a refused answer is not valid)
    correct: bool
    kind: str            # the first failure kind, "" when valid; "refused" for the gateway's 502
    seconds: float
    attempts: int = 1
    outcome: str = ""    # the gateway's x-orchestrator-tool-calls


@dataclass
class Summary:
    target: str
    tasks: int
    valid_rate: float
    correct_rate: float
    attempts_per_task: float
    invalid_passed: int  # answers given as valid (200, not marked unvalidated) that fail the check
    kinds: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    p50_s: float = 0.0
    p95_s: float = 0.0
    results: list[TaskResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_task(client: httpx.Client, url: str, headers: dict[str, str], task: dict[str, Any], tools: dict[str, Any],
             model: str, max_tokens: int) -> TaskResult:
    body = request_for(task, tools, model, max_tokens)
    t0 = time.perf_counter()
    r = client.post(url + "/chat/completions", json=body, headers=headers)
    took = time.perf_counter() - t0
    outcome = r.headers.get(HEADER, "")
    attempts = int(r.headers.get(ATTEMPTS, "1") or 1)
    try:
        answer = r.json()
    except ValueError:
        answer = None
    msg = tc.message_of(answer)
    if r.status_code != 200 or msg is None:
        kind = "refused" if outcome == "failed" else f"http_{r.status_code}"
        return TaskResult(task["id"], r.status_code, False, False, kind, took, attempts, outcome)
    verdict = tc.check(body, msg)
    return TaskResult(task["id"], 200, verdict.ok, verdict.ok and correct(task, msg), verdict.kind, took, attempts,
                      outcome)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def summarize(target: str, results: list[TaskResult], base: list[TaskResult] | None = None) -> Summary:
    n = len(results) or 1
    kinds: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for r in results:
        if r.kind:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        if r.outcome:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    if base:
        added = [r.seconds - b.seconds for r, b in zip(results, base, strict=True)]
    else:
        added = [r.seconds for r in results]
    return Summary(target, len(results), sum(r.valid for r in results) / n, sum(r.correct for r in results) / n,
                   sum(r.attempts for r in results) / n,
                   sum(1 for r in results if r.status == 200 and not r.valid and r.outcome != "unvalidated"),
                   kinds, outcomes, _pct(added, 0.5), _pct(added, 0.95), results)


def run_suite(targets: list[tuple[str, str, dict[str, str]]], model: str, max_tokens: int = 256,
              limit: int | None = None, say: Any = None) -> list[Summary]:
    """Each target is (label, base URL ending in /v1, headers); the first one's latencies are the base the
    others' added latency is measured from."""
    data = load_tasks()
    tasks = data["tasks"][:limit] if limit else data["tasks"]
    out: list[Summary] = []
    with httpx.Client(timeout=600, trust_env=False) as client:
        runs: list[list[TaskResult]] = []
        for label, url, headers in targets:
            results = []
            for i, task in enumerate(tasks):
                if say:
                    say(f"{label}: task {i + 1}/{len(tasks)} {task['id']}")
                results.append(run_task(client, url, headers, task, data["tools"], model, max_tokens))
            runs.append(results)
        for (label, _, _), results in zip(targets, runs, strict=True):
            out.append(summarize(label, results, runs[0] if results is not runs[0] else None))
    return out
