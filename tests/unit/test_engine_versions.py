"""Engine version handling without running an engine: version strings, --help parsing, version
order and the catalog's flag history (pinned engine_version with no binary at hand)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator import catalog
from orchestrator.errors import ProfileError
from orchestrator.facts.engine_probe import help_options, parse_version
from orchestrator.facts.types import EngineVersion
from orchestrator.pipeline import build_plan
from orchestrator.plan.versions import order_key, supports
from orchestrator.profile import load

LLAMA_HELP = """\
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
--spec-type none,draft-simple,draft-mtp,ngram-simple
                                        comma-separated list of types of speculative decoding to use
--draft, --draft-n, --draft-max N       the argument has been removed. use --spec-draft-n-max or
                                        --spec-ngram-mod-n-max
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM, either an exact number,
                                        'auto', or 'all' (default: auto); see also --fit-target
"""


def test_version_strings_of_both_engines() -> None:
    assert parse_version("llama.cpp", "version: 0.6.0-dev (build 11434, commit b11434)\nbuilt with GNU") == "b11434"
    assert parse_version("llama.cpp", "version: 9093 (b9093)") == "b9093"
    assert parse_version("ik_llama", "version: 0 (55d3c05bf)\nbuilt with GNU 12.2.0") == "55d3c05bf"
    assert parse_version("llama.cpp", "llama-server: unknown option") is None


def test_help_options_skip_removed_ones_and_descriptions() -> None:
    opts = help_options(LLAMA_HELP)
    assert {"-fa", "--flash-attn", "--spec-type", "-ngl", "--gpu-layers", "--n-gpu-layers"} <= opts
    assert "--draft-max" not in opts and "--draft" not in opts  # listed only to say they were removed
    assert "--fit-target" not in opts and "--spec-ngram-mod-n-max" not in opts  # mentioned in descriptions


def test_version_order() -> None:
    ik = catalog.engine("ik_llama")
    assert order_key("llama.cpp", "b9093", {}) < order_key("llama.cpp", "b11434", {})  # type: ignore[operator]
    assert order_key("ik_llama", "55d3c05bf", ik) == (2026, 4, 13)
    assert order_key("ik_llama", "2026-08-15", ik) == (2026, 8, 15)
    assert order_key("ik_llama", "deadbeef", ik) is None
    assert order_key("vllm", "0.32.0", {}) == (0, 32, 0)


def test_catalog_ranges_decide_without_a_binary() -> None:
    caps = catalog.engine("llama.cpp")
    old, new = EngineVersion("llama.cpp", "b9093", "pinned"), EngineVersion("llama.cpp", "b11434", "pinned")
    assert supports(caps, old, "--spec-type", "draft-mtp") is False
    assert supports(caps, new, "--spec-type", "draft-mtp") is True
    assert supports(caps, new, "--draft-max") is False
    assert supports(caps, new, "-ngl") is None  # no record: nothing to say without --help
    probed = EngineVersion("llama.cpp", "b11434", "binary", help_options(LLAMA_HELP), LLAMA_HELP)
    assert supports(caps, probed, "--spec-type", "draft-mtp") is True   # the help lists it
    assert supports(caps, probed, "--spec-type", "draft-eagle3") is False  # this help does not
    assert supports(caps, probed, "--metrics") is False  # not in this (short) help


def _profile(tmp_path: Path, **server: object) -> Path:
    p = tmp_path / "p.yaml"
    spec = {"name": "s", "engine": "llama.cpp", "model": {"path": "/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"}, **server}
    p.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": "rtx-3090"}, "servers": [spec]}))
    return p


def test_pinned_old_llama_cpp_refuses_mtp_and_names_the_version(tmp_path: Path) -> None:
    p = _profile(tmp_path, engine_version="b9093", speculative={"method": "mtp", "tokens": 2})
    with pytest.raises(ProfileError) as exc:
        build_plan(load(p), detect=False)
    msg = str(exc.value)
    assert "b9093 does not take --spec-type draft-mtp" in msg and "b9246" in msg and "speculative.method" in msg


def test_pinned_old_llama_cpp_drafts_without_spec_type(tmp_path: Path) -> None:
    p = _profile(tmp_path, engine_version="b9093", model={"path": "/m/Qwen3-32B-Q4_K_M.gguf"},
                 speculative={"method": "draft", "draft_model": "/m/Qwen3-0.6B-Q8_0.gguf", "tokens": 4})
    sp = build_plan(load(p), detect=False).servers[0]
    args = sp.args()
    assert sp.engine_version == "b9093" and sp.engine_version_source == "engine_version in the profile"
    assert "--spec-type" not in args and args[args.index("-md") + 1] == "/m/Qwen3-0.6B-Q8_0.gguf"
    assert args[args.index("--spec-draft-n-max") + 1] == "4"
    assert any("verified against b11434" in n for n in sp.notes)
    new = build_plan(load(_profile(tmp_path, model={"path": "/m/Qwen3-32B-Q4_K_M.gguf"}, speculative={
        "method": "draft", "draft_model": "/m/Qwen3-0.6B-Q8_0.gguf"})), detect=False).servers[0]
    assert new.args()[new.args().index("--spec-type") + 1] == "draft-simple"


def test_pinned_newer_ik_llama_gets_the_staged_syntax_and_rejects_the_old_mtp_flag(tmp_path: Path) -> None:
    p = _profile(tmp_path, engine="ik_llama", engine_version="2026-08-15", speculative={"method": "mtp"})
    sp = build_plan(load(p), detect=False).servers[0]
    assert "-mtp" not in sp.args() and sp.args()[sp.args().index("--spec-type") + 1].startswith("mtp:n_max=")
    p = _profile(tmp_path, engine="ik_llama", engine_version="2026-08-15", extra_args=["-mtp"])
    with pytest.raises(ProfileError) as exc:
        build_plan(load(p), detect=False)
    msg = str(exc.value)
    assert "ik_llama.cpp 2026-08-15 does not take -mtp" in msg and "--spec-type" in msg


def test_gpu_plans_pin_fit_off_and_cpu_plans_do_not(tmp_path: Path) -> None:
    sp = build_plan(load(_profile(tmp_path)), detect=False).servers[0]
    assert sp.args()[sp.args().index("--fit") + 1] == "off"
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump({"name": "c", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "s", "engine": "llama.cpp", "model": {"path": "/m/Qwen3-8B-Q4_K_M.gguf"}}]}))
    assert "--fit" not in build_plan(load(cpu), detect=False).servers[0].args()
