"""Shell completion (click's): commands and options come from click itself, profile arguments
complete as files; these add deployment names (the state dir) and server names (the profile on the
command line, else the deployment's records). Completion runs on every Tab, so it reads YAML and
the state files only, never plans. Set up: README, "Shell completion"."""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING, Any

import click
from click.shell_completion import CompletionItem

if TYPE_CHECKING:
    from orchestrator.runtime.state import StateStore


def _store() -> StateStore:
    from orchestrator.paths import state_dir
    from orchestrator.runtime.state import StateStore

    return StateStore(state_dir(dict(os.environ)))


def deployments() -> list[str]:
    return _store().deployments()


def _profile_servers(path: str) -> list[str]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        return [str(s["name"]) for s in doc.get("servers") or [] if isinstance(s, dict) and "name" in s]
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return []


def _recorded_servers(deployment: str) -> list[str]:
    """Read without StateStore.load, which sets a damaged file aside: Tab changes nothing."""
    try:
        data = json.loads(_store().path(deployment).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    servers = data.get("servers", {}) if isinstance(data, dict) else {}
    return sorted(str(k) for k in servers) if isinstance(servers, dict) else []


def _first_argument(ctx: click.Context) -> str | None:
    """The word after the command on the line being completed. click leaves the command's params
    unset while an option still lacks its value (`up p.yaml --server <Tab>`); every shell click
    completes for passes the line in COMP_WORDS."""
    from click.shell_completion import split_arg_string

    words = split_arg_string(os.environ.get("COMP_WORDS", ""))
    name = ctx.command.name
    if name not in words:
        return None
    after = words[words.index(name) + 1:]
    return next((w for w in after if not w.startswith("-")), None)


def complete_target(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """A deployment name or a profile file."""
    names = [CompletionItem(n) for n in deployments() if n.startswith(incomplete)]
    files = [CompletionItem(p) for p in sorted(glob.glob(incomplete + "*"))
             if p.endswith((".yaml", ".yml")) or os.path.isdir(p)]
    return names + files


def complete_server(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """The servers of the profile (or deployment) already on the command line."""
    given: Any = ctx.params.get("profile") or ctx.params.get("target") or ctx.params.get("profiles")
    if isinstance(given, (list, tuple)):
        given = given[0] if given else None
    given = given or _first_argument(ctx)
    if not given:
        return []
    given = str(given)
    if given.endswith((".yaml", ".yml")) or os.path.sep in given:
        names = _profile_servers(given)
    else:
        names = _recorded_servers(given)
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]
