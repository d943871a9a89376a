"""What the command modules share: the one way a command fails, the --ignore-fit option, and
building the plan and the deployer. Kept out of `orchestrator.cli` itself so that the command modules
never import the package that registers them."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from orchestrator.plan.model import Plan
    from orchestrator.runtime.deployer import Deployer

IGNORE_FIT = click.option("--ignore-fit", is_flag=True, help="Plan even when the memory estimate says it won't fit.")
LOCKED = click.option("--locked", is_flag=True, help="The lock beside the profile must match this machine: "
                      "drift (or no lock) is an error instead of a fall-back to the rules.")


def fail(problems: list[str], as_json: bool = False, data: Any = None) -> NoReturn:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    for p in problems:
        click.echo(p, err=True)
    sys.exit(1)


def load_plan(profile: str, ignore_fit: bool = False, target: str | None = None, locked: bool = False) -> Plan:
    from orchestrator.pipeline import build_plan, check_target
    from orchestrator.profile import load

    loaded = load(profile)
    plan = build_plan(loaded, enforce_fit=not ignore_fit, locked=locked)
    if target:
        check_target(loaded, target)
    return plan


def make_deployer(as_json: bool = False) -> Deployer:
    """A deployer on the state dir that reports its progress on stderr (nothing with --json): events
    as lines, long steps (engine build, model download, health wait) as cli/progress shows them."""
    from orchestrator.cli.progress import display
    from orchestrator.paths import state_dir as default_state_dir
    from orchestrator.runtime.deployer import Deployer
    from orchestrator.runtime.state import StateStore

    shown = display()

    def progress(server: str, event: str, detail: str) -> None:
        if not as_json:
            shown.line(f"  [{server}] {event}" + (f": {detail}" if detail else ""))

    def meter(server: str, what: str, done: float, total: float | None, unit: str, note: str) -> None:
        if not as_json:
            shown.update(server, what, done, total, unit, note)

    return Deployer(StateStore(default_state_dir(dict(os.environ))), progress=progress, meter=meter)


def deployment_name(target: str) -> str:
    """A profile file's deployment name; anything else is taken as the name itself."""
    if target.endswith((".yaml", ".yml")) or os.path.sep in target:
        from orchestrator.profile import load

        return load(target).profile.name
    return target
