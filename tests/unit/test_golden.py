"""Golden files: every profile in profiles/ and examples/ planned and rendered for every target.

Refresh with `pytest tests/unit/test_golden.py --update-golden` and review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import OrchestratorError
from orchestrator.pipeline import build_plan
from orchestrator.plan.explain import explain
from orchestrator.profile import load
from orchestrator.render import render

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
PROFILES = sorted([*ROOT.glob("profiles/*.yaml"), *ROOT.glob("examples/*.yaml")])
OUTPUTS = {"plan.txt": None, "command.sh": ("command", False), "command.json": ("command", True),
           "docker.sh": ("docker", False), "compose.yaml": ("compose", False), "k8s.yaml": ("k8s", False),
           "llama-swap.yaml": ("llama-swap", False)}


def produce(profile: Path) -> dict[str, str]:
    rel = profile.relative_to(ROOT)
    plan = build_plan(load(rel if not rel.is_absolute() else profile), detect=False,
                      environ={"HOME": "/home/user", "ORCHESTRATOR_STATE_DIR": "/var/lib/orchestrator"})
    out: dict[str, str] = {}
    for name, spec in OUTPUTS.items():
        if spec is None:
            out[name] = explain(plan)
            continue
        try:
            out[name] = render(plan, *spec)
        except OrchestratorError as exc:
            out[name] = f"error: {exc}\n"
    return out


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_golden(profile: Path, update_golden: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    folder = GOLDEN / profile.stem
    produced = produce(profile)
    if update_golden:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in produced.items():
            (folder / name).write_text(text)
    for name, text in produced.items():
        expected = (folder / name)
        assert expected.exists(), f"missing {expected}; run pytest --update-golden"
        assert text == expected.read_text(), f"{profile.name} {name} differs from {expected} (--update-golden to accept)"


@pytest.mark.parametrize("profile", PROFILES[:3], ids=[p.stem for p in PROFILES[:3]])
def test_render_is_deterministic(profile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert produce(profile) == produce(profile)


def test_every_golden_folder_has_a_profile() -> None:
    stems = {p.stem for p in PROFILES}
    stale = [d.name for d in GOLDEN.iterdir() if d.is_dir() and d.name not in stems] if GOLDEN.exists() else []
    assert not stale, f"golden folders without a profile: {stale}"
