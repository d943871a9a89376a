from __future__ import annotations

import os
from pathlib import Path

from orchestrator import plancache
from orchestrator.pipeline import build_plan
from orchestrator.profile import load

PROFILE = """name: cached
hardware: {gpu: %s}
servers:
  - name: s
    model: {path: %s}
    context: 2048
"""


def setup(tmp_path: Path, gpu: str = "rtx-3090") -> tuple[Path, dict[str, str], Path]:
    model = tmp_path / "m-Q4_K_M.gguf"
    model.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)  # a GGUF v3 header, no tensors
    profile = tmp_path / "p.yaml"
    profile.write_text(PROFILE % (gpu, model))
    environ = {"HOME": str(tmp_path), "ORCHESTRATOR_CACHE": str(tmp_path / "cache"),
               "ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    return profile, environ, model


def test_hit_returns_the_same_plan(tmp_path: Path) -> None:
    profile, environ, _ = setup(tmp_path)
    plan = build_plan(load(profile), environ=environ, detect=False)
    assert plancache.load(str(profile), environ) is None
    plancache.store(str(profile), environ, plan, auto_detected=False)
    cached = plancache.load(str(profile), environ)
    assert cached is not None and cached.to_dict() == plan.to_dict()


def test_profile_env_or_model_change_misses(tmp_path: Path) -> None:
    profile, environ, model = setup(tmp_path)
    plan = build_plan(load(profile), environ=environ, detect=False)
    plancache.store(str(profile), environ, plan, auto_detected=False)
    assert plancache.load(str(profile), {**environ, "ORCHESTRATOR_STATE_DIR": "/elsewhere"}) is None
    model.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)  # a GGUF v3 header, no tensors
    assert plancache.load(str(profile), environ) is None
    plancache.store(str(profile), environ, plan, auto_detected=False)
    profile.write_text(profile.read_text().replace("2048", "4096"))
    assert plancache.load(str(profile), environ) is None


def test_auto_detected_hardware_is_not_cached(tmp_path: Path) -> None:
    profile, environ, _ = setup(tmp_path, gpu="auto")
    plan = build_plan(load(profile), environ=environ, detect=False)
    plancache.store(str(profile), environ, plan, auto_detected=True)
    assert not (tmp_path / "cache" / "plans").exists() or not os.listdir(tmp_path / "cache" / "plans")
