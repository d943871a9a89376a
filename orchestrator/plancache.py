"""Plan cache for `up`: the same profile text, environment, model files and orchestrator code
give the same Plan (planning is pure and deterministic), so `up` can start the engine without
importing pydantic and the rule modules first. Anything that could change the plan is in the
key or checked on load; `gpu: auto` profiles are never cached (detection may differ)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.facts.cpu import host_cpu_flags
from orchestrator.paths import cache_dir, lock_path, write_private
from orchestrator.plan.model import Plan, plan_from_dict

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PACKAGE = Path(__file__).resolve().parent
MAX_ENTRIES = 256


def _code_stamp() -> str:
    """Changes whenever any module, catalog file or template of this installation changes."""
    parts = []
    for root in (_PACKAGE, _PACKAGE.parent / "templates"):
        if not root.is_dir():
            continue
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.endswith((".py", ".yaml", ".j2")):
                    st = os.stat(os.path.join(dirpath, name))
                    parts.append(f"{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()


def _key(path: str, text: str, environ: dict[str, str]) -> str:
    used = sorted(set(_VAR.findall(text)) | {"HOME", "ORCHESTRATOR_STATE_DIR", "XDG_STATE_HOME"})
    env = {name: environ.get(name) for name in used}
    cpu = [os.cpu_count(), sorted(host_cpu_flags())]   # a plan (and the build it runs) is for this CPU
    blob = json.dumps([os.path.abspath(path), text, env, _code_stamp(), cpu], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _inputs(plan: Plan) -> dict[str, Any]:
    files = {}
    for s in plan.servers:
        if not s.model_is_hf:
            files[s.model_location] = _stat(s.model_location)
        binary = s.executable.path if s.executable else None
        if binary and binary.startswith("/"):  # the plan targets this build's version and --help: re-plan if it changes
            files[binary] = _stat(binary)
    lock = str(lock_path(os.path.abspath(plan.profile_file)))   # tuned flags and pins: re-plan when it changes
    files[lock] = _stat(lock)
    return files


def load(path: str, environ: dict[str, str]) -> Plan | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
        entry = json.loads((cache_dir("plans", environ) / f"{_key(path, text, environ)}.json").read_text())
    except (OSError, ValueError):
        return None
    if any(_stat(f) != st for f, st in entry.get("files", {}).items()):
        return None
    try:
        return plan_from_dict(entry["plan"])
    except (KeyError, TypeError):
        return None


def store(path: str, environ: dict[str, str], plan: Plan, auto_detected: bool) -> None:
    if auto_detected:
        return
    try:
        text = Path(path).read_text(encoding="utf-8")
        folder = cache_dir("plans", environ)
        target = folder / f"{_key(path, text, environ)}.json"
        write_private(target, json.dumps({"plan": plan.to_dict(), "files": _inputs(plan)}))
        entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
