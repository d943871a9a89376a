"""The labeled prompt set of routing (orchestrator/data/route_prompts.jsonl, described in its README):
each item as the chat body a client would send, and the accuracy and confusion table of a route's
decisions on a split of it. `orchestrate eval route` and the scorer's tests read it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import RoutePlan

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
