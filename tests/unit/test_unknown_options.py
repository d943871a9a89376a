"""Options the targeted build does not take: the user's own (extra_args) are blamed at their entry,
with the build's nearest options or the version that added them; the rules' keep the engine field
and the install/pin fix. The --help text here is the input the planner reads (an EngineVersion
without a binary, as gathered from a build that lists these options); the contract tests
(tests/contract/test_engine_versions.py) do the same against real builds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import ProfileError
from orchestrator.facts.engine_probe import help_options
from orchestrator.facts.types import EngineVersion
from orchestrator.pipeline import build_plan, gather
from orchestrator.plan.checks import closest_options
from orchestrator.plan.planner import plan
from orchestrator.profile import load

HELP = """\
-m,    --model FNAME                    model path to load
-a,    --alias STRING                   set model name aliases, comma-separated
--host HOST                             ip address to listen
--port PORT                             port to listen (default: 8080)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
--cache-reuse N                         min chunk size to attempt reusing from the cache via KV shifting
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
-ctk,  --cache-type-k TYPE              KV cache data type for K
--spec-draft-n-max N                    number of tokens to draft for speculative decoding (default: 16)
"""


def _write(tmp_path: Path, **server: object) -> Path:
    spec = {"name": "s", "engine": "llama.cpp", "model": {"path": "/m/Qwen3-8B-Q4_K_M.gguf"}, **server}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": "cpu"}, "servers": [spec]}, sort_keys=False))
    return p


def _plan_with_help(profile: Path, help_text: str, version: str = "b11434") -> None:
    loaded = load(str(profile))
    facts = gather(loaded, detect=False)
    facts = replace(facts, versions={"s": EngineVersion("llama.cpp", version, "a build's --version",
                                                        help_options(help_text), help_text)})
    plan(loaded, facts)


def _line_of(profile: Path, text: str) -> int:
    return next(i for i, line in enumerate(profile.read_text().splitlines(), 1) if text in line)


def test_a_typo_in_extra_args_is_blamed_on_its_entry_with_the_nearest_options(tmp_path: Path) -> None:
    p = _write(tmp_path, extra_args=["--metrics", "--ctx-szie", "8192"])
    with pytest.raises(ProfileError) as exc:
        _plan_with_help(p, HELP)
    (problem,) = exc.value.problems
    assert problem.field == "servers[0].extra_args[1]" and problem.line == _line_of(p, "--ctx-szie")
    assert problem.message == "llama.cpp b11434 does not take --ctx-szie (not in its --help)"
    assert problem.hint == "did you mean --ctx-size? correct or remove it"
    assert "install" not in problem.hint and "engine_version" not in problem.hint


def test_an_option_nothing_resembles_gets_only_the_fix(tmp_path: Path) -> None:
    p = _write(tmp_path, extra_args=["--zzzzqqq"])
    with pytest.raises(ProfileError) as exc:
        _plan_with_help(p, HELP)
    assert str(exc.value.problems[0]).endswith("servers[0].extra_args[0]: llama.cpp b11434 does not take "
                                               "--zzzzqqq (not in its --help) — correct or remove it")


def test_an_extra_args_option_of_a_newer_build_names_the_version_that_added_it(tmp_path: Path) -> None:
    # pinned, no binary: the catalog's flag_history decides (as for the container runtimes)
    for runtime in ("process", "docker"):
        p = _write(tmp_path, engine_version="b9093", runtime=runtime, extra_args=["--spec-type", "draft-mtp"])
        with pytest.raises(ProfileError) as exc:
            build_plan(load(str(p)), detect=False)
        (problem,) = exc.value.problems
        assert problem.field == "servers[0].extra_args[0]", runtime
        assert "llama.cpp b9093 does not take --spec-type draft-mtp; it arrived in b9246" in problem.message
        assert problem.hint.startswith("correct or remove it, or run llama.cpp b9246 or newer")


def test_a_removed_option_in_extra_args_names_its_replacement(tmp_path: Path) -> None:
    p = _write(tmp_path, extra_args=["--draft-max", "4"])
    with pytest.raises(ProfileError) as exc:
        build_plan(load(str(p)), detect=False)
    (problem,) = exc.value.problems
    assert problem.field == "servers[0].extra_args[0]" and "use --spec-draft-n-max" in problem.message
    assert problem.hint == "correct or remove it"


def test_an_option_a_rule_emits_keeps_the_engine_field_and_the_install_fix(tmp_path: Path) -> None:
    p = _write(tmp_path, extra_args=["--metrics"])
    lacking = "\n".join(line for line in HELP.splitlines() if not line.startswith("--cache-reuse"))
    with pytest.raises(ProfileError) as exc:
        _plan_with_help(p, lacking)
    (problem,) = exc.value.problems
    assert problem.field == "servers[0].engine" and problem.line == _line_of(p, "engine: llama.cpp")
    assert problem.message.startswith("llama.cpp b11434 does not take --cache-reuse 256 (not in its --help")
    assert "orchestrate engines install llama.cpp" in problem.hint and "pin engine_version" in problem.hint


def test_the_same_plan_passes_with_the_full_help(tmp_path: Path) -> None:
    _plan_with_help(_write(tmp_path, extra_args=["--ctx-size", "8192"]), HELP)  # raises on any problem


def test_closest_options() -> None:
    known = help_options(HELP)
    assert closest_options("--ctx-szie", known) == ["--ctx-size"]
    assert closest_options("--paralel", known)[0] == "--parallel"
    assert closest_options("--ctx-size", None) == []
    # only those about as close as the best: a typo of --ctx-size does not also suggest --cache-reuse
    assert closest_options("--ctx-szie", known | {"--batch-size", "--context-shift"}) == ["--ctx-size"]
