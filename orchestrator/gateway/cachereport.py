"""`orchestrate cache-report`: the prefix-cache doctor's records of a deployment, summed per client and
conversation, with the causes that cost the most reuse and the prefill time they cost (tokens lost ÷
the engine's measured prompt speed on that request)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError, shown
from orchestrator.gateway.prefixcache import records_path
from orchestrator.gateway.prefixdiff import KINDS

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """'90s', '30m', '1h', '7d' ago, or an ISO date/time; None for everything."""
    if not text:
        return None
    now = time.time() if now is None else now
    m = _SINCE.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    import datetime as dt

    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise OrchestratorError(f"--since {shown(text)} is neither a duration nor a date",
                                "write e.g. --since 1h, 30m, 2d or 2026-12-03T07:00") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def deployments_with_records(state_root: str | Path) -> list[str]:
    folder = Path(state_root) / "prefix-cache"
    return sorted(p.name[:-len(".jsonl")] for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def read_records(state_root: str | Path, deployment: str, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Records oldest first (the rotated file, then the current one); damaged lines are skipped."""
    path = records_path(state_root, deployment)
    for p in (path.with_name(path.name + ".1"), path):
        try:
            lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and (since is None or float(rec.get("t", 0)) >= since):
                yield rec


def _new() -> dict[str, Any]:
    return {"requests": 0, "prompt": 0, "cached": 0, "reusable": 0, "lost_tokens": 0, "lost_seconds": 0.0,
            "causes": {}}


def _add(acc: dict[str, Any], rec: dict[str, Any]) -> None:
    acc["requests"] += 1
    for key in ("prompt", "cached", "reusable"):
        acc[key] += int(rec.get(key) or 0)
    for c in rec.get("causes") or []:
        if not isinstance(c, dict):
            continue
        kind = str(c.get("kind", "?"))
        tokens, seconds = int(c.get("tokens") or 0), float(c.get("seconds") or 0.0)
        acc["lost_tokens"] += tokens
        acc["lost_seconds"] += seconds
        slot = acc["causes"].setdefault(kind, {"kind": kind, "what": KINDS.get(kind, kind), "count": 0, "tokens": 0,
                                                "seconds": 0.0, "example": ""})
        slot["count"] += 1
        slot["tokens"] += tokens
        slot["seconds"] += seconds
        slot["example"] = str(c.get("detail", ""))[:300]       # the latest


def _finish(acc: dict[str, Any]) -> dict[str, Any]:
    causes = sorted(acc["causes"].values(), key=lambda c: (-c["tokens"], -c["count"], c["kind"]))
    for c in causes:
        c["seconds"] = round(c["seconds"], 3)
    out = {**acc, "causes": causes, "lost_seconds": round(acc["lost_seconds"], 3)}
    out["reuse"] = round(acc["cached"] / acc["prompt"], 3) if acc["prompt"] else None
    return out


def summarize(records: Iterable[dict[str, Any]], deployment: str, since: float | None = None) -> dict[str, Any]:
    total = _new()
    convs: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rec in records:
        _add(total, rec)
        key = (str(rec.get("client", "?")), str(rec.get("model", "?")), str(rec.get("conversation", "?")))
        acc = convs.setdefault(key, {**_new(), "first": rec.get("t"), "last": rec.get("t")})
        acc["last"] = rec.get("t")
        _add(acc, rec)
    rows = []
    for (client, model, conv), acc in convs.items():
        rows.append({"client": client, "model": model, "conversation": conv, **_finish(acc)})
    rows.sort(key=lambda r: (-r["lost_tokens"], r["client"], r["conversation"]))
    return {"deployment": deployment, "since": since, **_finish(total), "conversations": rows}


def render(summary: dict[str, Any], top: int = 3) -> list[str]:
    def reuse(acc: dict[str, Any]) -> str:
        pct = f"{acc['reuse'] * 100:.0f}%" if acc.get("reuse") is not None else "-"
        return (f"reused {acc['cached']} of {acc['prompt']} prompt tokens ({pct}); {acc['reusable']} were reusable; "
                f"lost {acc['lost_tokens']} tokens ≈ {acc['lost_seconds']:.2f} s of prefill")

    if not summary["requests"]:
        return [f"{summary['deployment']}: no chat or completion requests recorded"
                + (" in that time" if summary.get("since") else "")]
    lines = [f"{summary['deployment']}: {summary['requests']} requests, {reuse(summary)}"]
    for c in summary["causes"][:top]:
        lines.append(f"  {c['kind']}: {c['count']}× {c['tokens']} tokens ≈ {c['seconds']:.2f} s — {c['what']}")
    lines.append("")
    for row in summary["conversations"]:
        lines.append(f"client {row['client']} · {row['model']} · conversation {row['conversation']}: "
                     f"{row['requests']} requests, {reuse(row)}")
        for c in row["causes"][:top]:
            lines.append(f"  {c['count']}× {c['kind']} ({c['tokens']} tokens ≈ {c['seconds']:.2f} s): {c['example']}")
    return lines
