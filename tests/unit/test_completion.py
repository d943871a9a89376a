"""Shell completion through the installed `orchestrate` script, as bash asks it (click's protocol):
commands, profile files, deployment names from the state dir, server names from the profile or the
deployment's records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(sys.executable).with_name("orchestrate")


def complete(words: str, cwd: Path, state: Path) -> list[tuple[str, str]]:
    parts = words.split(" ")
    env = {**os.environ, "_ORCHESTRATE_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(parts) - 1), "ORCHESTRATOR_STATE_DIR": str(state)}
    p = subprocess.run([str(SCRIPT)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if line]   # no candidates: one empty line
    return [tuple(line.split(",", 1)) for line in lines]  # type: ignore[misc]


@pytest.fixture
def where(tmp_path: Path) -> tuple[Path, Path]:
    if not SCRIPT.exists():
        pytest.skip("the orchestrate script is not installed beside this Python")
    state = tmp_path / "state"
    (state / "deployments").mkdir(parents=True)
    (state / "deployments" / "homelab.json").write_text(json.dumps({"servers": {"coder": {}, "chat": {}}}))
    (state / "deployments" / "quickstart.json").write_text(json.dumps({"servers": {"gemma": {}}}))
    (tmp_path / "pair.yaml").write_text(yaml.safe_dump({"name": "pair", "servers": [
        {"name": "big", "model": {"path": "/m/a.gguf"}}, {"name": "small", "model": {"path": "/m/b.gguf"}}]}))
    (tmp_path / "notes.txt").write_text("")
    return tmp_path, state


def test_commands(where: tuple[Path, Path]) -> None:
    got = complete("orchestrate do", *where)
    assert ("plain", "doctor") in got and ("plain", "down") in got and all(v.startswith("do") for _, v in got)


def test_profile_arguments_complete_as_files(where: tuple[Path, Path]) -> None:
    assert complete("orchestrate plan p", *where) == [("file", "p")]   # the shell lists the files


def test_deployment_names_and_profiles_for_down(where: tuple[Path, Path]) -> None:
    assert complete("orchestrate down ", *where) == [("plain", "homelab"), ("plain", "quickstart"),
                                                     ("plain", "pair.yaml"), ("plain", "state")]
    assert complete("orchestrate logs qu", *where) == [("plain", "quickstart")]


def test_server_names(where: tuple[Path, Path]) -> None:
    assert complete("orchestrate up pair.yaml --server ", *where) == [("plain", "big"), ("plain", "small")]
    assert complete("orchestrate logs homelab --server c", *where) == [("plain", "chat"), ("plain", "coder")]
    assert complete("orchestrate down missing --server ", *where) == []
