"""Planning does no I/O: plan(profile, facts) runs every shipped profile with subprocesses, sockets and
file opens blocked, and gives the same Plan the whole pipeline gives.

The facts are gathered first (hardware, models, and the installed engine builds with their --version,
--help and parser answers, where this machine has them); only then is the world switched off.
"""

from __future__ import annotations

import builtins
import io
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.pipeline import build_plan, gather
from orchestrator.plan.planner import plan
from orchestrator.profile import load

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted([*ROOT.glob("profiles/*.yaml"), *ROOT.glob("examples/*.yaml")])
ENVIRON = {"HOME": "/home/user", "ORCHESTRATOR_STATE_DIR": "/var/lib/orchestrator"}


class WorldTouched(AssertionError):
    pass


def _forbid(what: str) -> Any:
    def refuse(*args: object, **kwargs: object) -> None:
        raise WorldTouched(f"the planner tried to {what}: {args[:2]!r}")
    return refuse


@pytest.fixture
def no_world(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Blocks what planning must never do; yields a switch that turns the block on."""
    def block() -> None:
        monkeypatch.setattr(subprocess, "Popen", _forbid("start a process"))
        monkeypatch.setattr(subprocess, "run", _forbid("run a process"))
        monkeypatch.setattr(os, "system", _forbid("run a shell"))
        monkeypatch.setattr(socket, "socket", _forbid("open a socket"))
        monkeypatch.setattr(socket, "create_connection", _forbid("connect"))
        monkeypatch.setattr(builtins, "open", _forbid("open a file"))
        monkeypatch.setattr(io, "open", _forbid("open a file"))
        monkeypatch.setattr(os, "open", _forbid("open a file"))
        monkeypatch.setattr(os, "stat", _forbid("stat a file"))
        monkeypatch.setattr(os, "listdir", _forbid("list a folder"))
        monkeypatch.setattr(os, "scandir", _forbid("list a folder"))
    return block


def test_the_block_is_real(no_world: Any) -> None:
    """A control: with the block on, each of these fails (so the test below can fail too)."""
    no_world()
    for attempt in (lambda: subprocess.run(["true"]), lambda: socket.socket(), lambda: open(__file__),
                    lambda: Path(__file__).read_text(), lambda: os.stat(__file__)):
        with pytest.raises(WorldTouched):
            attempt()


@pytest.mark.parametrize("detect", [False, True], ids=["golden-facts", "this-machine"])
@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_plan_does_no_io(profile: Path, detect: bool, no_world: Any) -> None:
    rel = profile.relative_to(ROOT)
    expected = build_plan(load(rel), environ=ENVIRON, detect=detect, enforce_fit=False).to_dict()
    loaded = load(rel)
    facts = gather(loaded, environ=ENVIRON, detect=detect)
    no_world()
    got = plan(loaded, facts, enforce_fit=False)
    assert got.to_dict() == expected
