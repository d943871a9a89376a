"""Where orchestrator keeps what it remembers (state) and what it can rebuild (caches). A leaf: every
room asks here, so a test's ORCHESTRATOR_CACHE / ORCHESTRATOR_STATE_DIR moves all of it at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def cache_dir(kind: str = "", environ: Mapping[str, str] | None = None) -> Path:
    """ORCHESTRATOR_CACHE, else $XDG_CACHE_HOME/orchestrator, else ~/.cache/orchestrator; `kind` names
    the sub-folder (engines, pyenvs, probes, modelfacts, plans, sources, build)."""
    env = os.environ if environ is None else environ
    base = env.get("ORCHESTRATOR_CACHE") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(_home(env), ".cache"), "orchestrator")
    return Path(base) / kind if kind else Path(base)


def state_dir(environ: Mapping[str, str] | None = None) -> str:
    """ORCHESTRATOR_STATE_DIR, else $XDG_STATE_HOME/orchestrator, else ~/.local/state/orchestrator."""
    env = os.environ if environ is None else environ
    if env.get("ORCHESTRATOR_STATE_DIR"):
        return env["ORCHESTRATOR_STATE_DIR"]
    base = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME", "~"), ".local", "state")
    return os.path.join(base, "orchestrator")


def lock_path(profile_file: str | Path) -> Path:
    """The lock file beside a profile: `homelab.yaml` → `homelab.lock.yaml`."""
    p = Path(profile_file)
    stem = p.name.rsplit(".", 1)[0] if p.suffix in (".yaml", ".yml") else p.name
    return p.with_name(f"{stem}.lock.yaml")
