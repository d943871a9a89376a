"""The labeled prompt set of routing (orchestrator/data/route_prompts.jsonl, described in its README):
each item as the chat body a client would send, and the accuracy and confusion table of a route's
decisions on a split of it. `orchestrate eval route` and the scorer's tests read it."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import RoutePlan, client_host

SET_FILE = "route_prompts.jsonl"
HARNESS_FILE = "route_harness.json"


@dataclass
class Item:
    id: str
    level: str
    kind: str
    lang: str
    split: str
    body: dict[str, Any]


def _data(name: str) -> str:
    return resources.files("orchestrator.data").joinpath(name).read_text(encoding="utf-8")


def load(path: str | Path | None = None, split: str | None = None) -> list[Item]:
    """The set's items (of one split: train or heldout), each as a chat body."""
    harness = json.loads(_data(HARNESS_FILE))
    text = Path(path).read_text(encoding="utf-8") if path else _data(SET_FILE)
    book: str | None = None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            messages: list[dict[str, Any]] = []
            if d.get("system"):
                messages.append({"role": "system", "content": harness["systems"][d["system"]]})
            messages += [{"role": r, "content": c} for r, c in d.get("history", [])]
            ask = d["text"]
            if d.get("doc"):
                if book is None:
                    from orchestrator.measure.quality import eval_text
                    book = eval_text()
                start, length = d["doc"]
                ask = f"{ask}\n\n{book[start:start + length]}"
            messages.append({"role": "user", "content": ask})
            body: dict[str, Any] = {"model": "route", "messages": messages}
            if d.get("tools"):
                body["tools"] = harness["tools"][d["tools"]]
            item = Item(d["id"], d["level"], d.get("kind", ""), d.get("lang", ""), d.get("split", "train"), body)
        except (ValueError, KeyError, TypeError) as exc:
            raise OrchestratorError(f"{path or SET_FILE}:{n}: not a labeled prompt ({type(exc).__name__}: {exc})",
                                    'each line is {"id", "level", "text", ...} as in the shipped set') from exc
        if split is None or item.split == split:
            items.append(item)
    return items


def report(route: RoutePlan, items: list[Item], decisions: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy by tier: an item's label is right when its level's tier is the tier decided."""
    from orchestrator.gateway.routing import tier_of

    names = [t.server for t in route.tiers]
    confusion: Counter[tuple[str, str]] = Counter()
    wrong = []
    for item, d in zip(items, decisions, strict=True):
        want = names[tier_of(route, item.level)]
        confusion[(want, d["server"])] += 1
        if want != d["server"]:
            wrong.append({"id": item.id, "kind": item.kind, "label": item.level, "want": want, "got": d["server"],
                          "score": d["score"]})
    right = sum(v for (a, b), v in confusion.items() if a == b)
    return {"route": route.name, "items": len(items), "correct": right,
            "accuracy": round(right / len(items), 4) if items else None,
            "confusion": {want: {got: confusion[(want, got)] for got in names} for want in names}, "wrong": wrong}


def gateway_url(host: str, port: int) -> str:
    return f"http://{client_host(host)}:{port}"


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def gateway_decisions(url: str, key: str | None, route: RoutePlan, items: list[Item]) -> list[dict[str, Any]] | None:
    """Each item's decision from a running gateway's POST /v1/route; None when no gateway answers there."""
    import httpx

    with httpx.Client(base_url=url, headers=_headers(key), timeout=30, trust_env=False) as client:
        try:
            client.get("/health", timeout=2).raise_for_status()
        except httpx.HTTPError:
            return None
        out = []
        for item in items:
            r = client.post("/v1/route", json={**item.body, "model": route.name})
            if r.status_code != 200:
                raise OrchestratorError(f"the gateway at {url} answered POST /v1/route with {r.status_code}: "
                                        f"{r.text[:300]}", "is it running this profile? (orchestrate up PROFILE; "
                                        "export the gateway's key variable if it has one)")
            out.append(r.json())
    return out


def send_all(url: str, key: str | None, model: str, items: list[Item], max_tokens: int) -> dict[str, Any]:
    """Every item as a chat request for `model` (one at a time): latency, tokens and throughput, and
    which servers answered."""
    import httpx

    lat, prompt_t, gen_t, failed = [], 0, 0, 0
    servers: Counter[str] = Counter()
    with httpx.Client(base_url=url, headers=_headers(key), timeout=600, trust_env=False) as client:
        for item in items:
            t0 = time.perf_counter()
            r = client.post("/v1/chat/completions", json={**item.body, "model": model, "max_tokens": max_tokens,
                                                          "temperature": 0})
            lat.append(time.perf_counter() - t0)
            servers[r.headers.get("x-orchestrator-server", "-")] += 1
            if r.status_code != 200:
                failed += 1
                continue
            usage = r.json().get("usage") or {}
            prompt_t += int(usage.get("prompt_tokens") or 0)
            gen_t += int(usage.get("completion_tokens") or 0)
    total = sum(lat)
    lat.sort()
    return {"model": model, "requests": len(items), "failed": failed, "servers": dict(servers),
            "latency_p50_s": round(lat[len(lat) // 2], 3) if lat else None,
            "latency_mean_s": round(total / len(lat), 3) if lat else None, "total_s": round(total, 2),
            "prompt_tokens": prompt_t, "completion_tokens": gen_t,
            "completion_tok_s": round(gen_t / total, 1) if total else None}
