"""Tool calls and reasoning output: the profile's `tools`, catalog/parsers.yaml, the engines' flags.
The names themselves are checked against the engines' registries in tests/contract."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import catalog
from orchestrator.errors import ProfileError
from tests.unit.test_engine_rules import _flags
from tests.unit.test_engine_rules import _plan as plan_one


def _plan(engine: str, path: str, gpu: str = "h100-sxm", **server: Any) -> Any:
    return plan_one(engine, gpu, path, **server)


@pytest.mark.parametrize("path,tool,reasoning", [
    ("/m/Qwen3-Coder-30B-A3B-Instruct", "qwen3_coder", None),
    ("/m/Qwen3.6-35B-A3B", "qwen3_coder", "qwen3"),
    ("/m/Qwen3-8B", "hermes", "qwen3"),
    ("/m/Meta-Llama-3.1-8B-Instruct", "llama3_json", None),
    ("/m/DeepSeek-R1-0528", "deepseek_v3", "deepseek_r1"),
    ("/m/gpt-oss-120b", "openai", "openai_gptoss"),
])
def test_vllm_gets_the_familys_parsers(path: str, tool: str, reasoning: str | None) -> None:
    flags = _flags(_plan("vllm", path))
    assert "--enable-auto-tool-choice" in flags and flags["--tool-call-parser"] == tool
    assert flags.get("--reasoning-parser") == reasoning


def test_sglang_gets_its_own_names() -> None:
    flags = _flags(_plan("sglang", "/m/DeepSeek-R1-0528"))
    assert flags["--tool-call-parser"] == "deepseekv3" and flags["--reasoning-parser"] == "deepseek-r1"
    assert "--enable-auto-tool-choice" not in flags   # a vLLM switch; SGLang has none


def test_an_unknown_family_gets_no_flags_and_a_note_saying_how() -> None:
    sp = _plan("vllm", "/m/Totally-Unknown-7B")
    assert not {"--tool-call-parser", "--reasoning-parser", "--enable-auto-tool-choice"} & set(_flags(sp))
    assert any("no tool-call or reasoning parser is known" in n and "tools: NAME" in n for n in sp.notes)


def test_tools_off_and_a_named_parser() -> None:
    assert "--tool-call-parser" not in _flags(_plan("vllm", "/m/Qwen3-8B", tools="off"))
    named = _flags(_plan("vllm", "/m/Qwen3-8B", tools="qwen3_xml"))
    assert named["--tool-call-parser"] == "qwen3_xml" and named["--reasoning-parser"] == "qwen3"


def test_a_parser_name_the_engine_lacks_is_an_error_with_close_names() -> None:
    with pytest.raises(ProfileError) as exc:
        _plan("vllm", "/m/Qwen3-8B", tools="qwen3-coder")
    text = str(exc.value)
    assert "tools" in text and "no tool-call parser 'qwen3-coder'" in text and "qwen3_coder" in text


def test_an_older_engine_than_the_names_were_read_in_gets_a_note() -> None:
    sp = _plan("vllm", "/m/Qwen3-8B", engine_version="0.20.0")
    assert "--tool-call-parser" not in _flags(sp)
    assert any("were read in vLLM 0.32.0" in n for n in sp.notes)


def test_gguf_engines_take_the_template_and_ik_needs_jinja() -> None:
    ik = _plan("ik_llama", "/m/Qwen3-8B-Q4_K_M.gguf", gpu="rtx-3090")
    assert "--jinja" in _flags(ik)
    assert "--jinja" not in _flags(_plan("ik_llama", "/m/Qwen3-8B-Q4_K_M.gguf", gpu="rtx-3090", tools="off"))
    assert "--jinja" not in _flags(_plan("llama.cpp", "/m/Qwen3-8B-Q4_K_M.gguf", gpu="rtx-3090"))  # on by default
    with pytest.raises(ProfileError) as exc:
        _plan("llama.cpp", "/m/Qwen3-8B-Q4_K_M.gguf", gpu="rtx-3090", tools="hermes")
    assert "chat template" in str(exc.value)


def test_the_families_are_ordered_most_specific_first() -> None:
    """A fragment of an earlier family must not be inside a later family's fragment's names: the more
    specific family (Qwen3-Coder) is found before the general one (Qwen3)."""
    assert catalog.parser_family("Qwen3-Coder-480B-A35B")["family"] == "Qwen3-Coder"  # type: ignore[index]
    assert catalog.parser_family("Qwen3-235B-A22B")["family"] == "Qwen3"  # type: ignore[index]
    assert catalog.parser_family("DeepSeek-V3.1-Terminus")["family"] == "DeepSeek-V3.1"  # type: ignore[index]
    assert catalog.parser_family("Magistral-Small-2509")["family"] == "Magistral"  # type: ignore[index]
    families = catalog.parsers()["families"]
    for i, earlier in enumerate(families):
        for later in families[i + 1:]:
            for frag in later["match"]:
                assert not any(e in frag for e in earlier["match"]), (earlier["family"], later["family"])
