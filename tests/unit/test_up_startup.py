"""`up` on a plan-cache hit spawns the engine before importing what it does not need for that:
the profile schema (pydantic), the catalog's YAML, the planner, psutil, the other commands. The
engine is tests/fake_engine.py behind a launcher script; what is imported is read at the moment
the engine's process is spawned, in the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.unit.test_fit import write_gguf

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fake_engine.py"

AT_SPAWN = """
import json, subprocess, sys
seen = sys.argv[1]
_init = subprocess.Popen.__init__
def hook(self, args, *a, **k):
    if args and str(args[0]).endswith("fake-llama-server"):
        with open(seen, "w") as fh:
            json.dump(sorted(sys.modules), fh)
    _init(self, args, *a, **k)
subprocess.Popen.__init__ = hook
profile = sys.argv[2]
sys.argv = ["orchestrate", "up", profile]
from orchestrator.cli import main
main()
"""

NOT_BEFORE_SPAWN = ("pydantic", "yaml", "psutil", "orchestrator.profile", "orchestrator.catalog",
                    "orchestrator.plan.planner", "orchestrator.facts.gather", "orchestrator.cli.measure_cmds",
                    "orchestrator.cli.engine_cmds", "orchestrator.provision.builds")


def test_up_on_a_plan_cache_hit_spawns_before_the_heavy_imports(tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "m.gguf", "llama", layers=2, embd=32, heads=4, kv_heads=2, head_dim=8)
    launcher = tmp_path / "fake-llama-server"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    launcher.chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "startup", "hardware": {"gpu": "cpu"}, "servers": [{
        "name": "s", "engine": "llama.cpp", "binary": str(launcher), "model": {"path": str(model)},
        "port": port, "health": {"timeout": 20}}]}))
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(tmp_path / "state"),
           "ORCHESTRATOR_CACHE": str(tmp_path / "cache")}
    seen = tmp_path / "modules.json"
    runs = []
    try:
        for _ in range(2):   # the first run plans and fills the plan cache; the second is the hit
            up = subprocess.run([sys.executable, "-c", AT_SPAWN, str(seen), str(profile)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
            assert up.returncode == 0, up.stdout + up.stderr
            subprocess.run([sys.executable, "-m", "orchestrator", "down", str(profile)], env=env, cwd=ROOT,
                           capture_output=True, timeout=60)
            runs.append(json.loads(seen.read_text()))
        miss, hit = runs
        assert "pydantic" in miss and "orchestrator.plan.planner" in miss   # planning needs them
        assert "orchestrator.runtime.process" in hit
        loaded = [m for m in NOT_BEFORE_SPAWN if m in hit]
        assert loaded == [], loaded
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "down", str(profile)], env=env, cwd=ROOT,
                       capture_output=True, timeout=60)
