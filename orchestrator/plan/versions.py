"""Version math, pure: how engine versions order, when a flag arrived or went away (catalog
flag_history), and whether the targeted build takes an option, judged from facts gathered before
planning (facts.engine_probe reads --version, --help and the parser)."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.facts.types import EngineVersion


def order_key(engine: str, version: str, caps: dict[str, Any]) -> tuple[int, ...] | None:
    """A comparable key: llama.cpp build number; ik_llama.cpp commit date (known commits or a
    YYYY-MM-DD version); vLLM/SGLang release numbers. None when the version cannot be placed."""
    v = version.strip()
    if engine == "llama.cpp":
        n = v.removeprefix("b")
        return (int(n),) if n.isdigit() else None
    if engine == "ik_llama":
        date = (caps.get("commits") or {}).get(v) or (v if re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", v) else None)
        return tuple(int(x) for x in str(date).split("-")) if date else None
    parts = re.findall(r"\d+", v)
    return tuple(int(p) for p in parts[:3]) if parts else None


def at_least(engine: str, version: str, since: str, caps: dict[str, Any]) -> bool | None:
    a, b = order_key(engine, version, caps), order_key(engine, since, caps)
    if a is None or b is None:
        return None
    return a >= b


def history(caps: dict[str, Any], flag: str, value: str | None = None) -> dict[str, Any] | None:
    """The catalog's record of when `flag` (with `value`, for valued entries) appeared or went away."""
    for entry in caps.get("flag_history") or []:
        if entry["flag"] == flag and (entry.get("value") is None or entry.get("value") == value):
            return dict(entry)
    return None


def supports(caps: dict[str, Any], target: EngineVersion, flag: str, value: str | None = None) -> bool | None:
    """Whether the targeted build takes flag (value): its --help decides when it was probed (and, for an
    option it does not list, the parser's answer gathered with the facts), else the catalog's version
    ranges; None when none of them can say. Pure: it reads facts, it never runs the engine."""
    entry = history(caps, flag, value)
    if target.flags is not None:
        if flag not in target.flags:
            if not target.binary:
                return False
            return target.accepted(flag, value)   # None: ask the parser before up (pipeline.verify_flags)
        if entry is None or not entry.get("value"):
            return True
        if entry.get("help_lists_values"):
            return value is not None and value in target.help
    if entry is None:
        return None
    checks = []
    if entry.get("since"):
        checks.append(at_least(target.engine, target.version, entry["since"], caps))
    if entry.get("until"):
        newer = at_least(target.engine, target.version, entry["until"], caps)
        checks.append(None if newer is None else not newer)
    if False in checks:
        return False
    return None if None in checks else True


def explain_missing(caps: dict[str, Any], target: EngineVersion, flag: str, value: str | None = None) -> str:
    """One line for a flag the targeted build does not take: which version has it, or what replaced it."""
    entry = history(caps, flag, value)
    what = f"{flag} {value}" if value else flag
    base = f"{caps['display']} {target.version} does not take {what}"
    if entry is None:
        return base + f" (not in its --help; the rules were verified against {caps['verified_version']})"
    if entry.get("since"):
        base += f"; it arrived in {entry['since']}"
    if entry.get("until"):
        base += f"; it was removed by {entry['until']}"
    if entry.get("replacement"):
        base += f"; use {entry['replacement']}"
    if entry.get("note"):
        base += f" ({entry['note']})"
    return base
