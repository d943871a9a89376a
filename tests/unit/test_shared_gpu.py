"""Servers that share a GPU are planned against what the others leave (plan/budget.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import ProfileError
from orchestrator.pipeline import build_plan
from orchestrator.plan import fit
from orchestrator.plan.explain import explain_fit
from orchestrator.profile import load

GIB = 2**30
ROOT = Path(__file__).resolve().parents[2]
CODER = {"name": "coder", "engine": "llama.cpp", "context": 65536, "kv_cache": "q8_0", "parallel": 2, "port": 8080,
         "model": {"path": "/models/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf"}}
CHAT = {"name": "chat", "engine": "ik_llama", "gpus": [0], "context": 8192, "kv_cache": "q8_0", "port": 8081,
        "model": {"path": "/models/gemma-3-4b-it-Q4_K_M.gguf"}}
VLLM = {"name": "chat", "engine": "vllm", "context": 8192, "parallel": 4, "port": 8000,
        "model": {"path": "/models/Qwen2.5-7B-Instruct-AWQ"}}


def _write(tmp_path: Path, gpu: str, servers: list[dict[str, Any]], count: int = 1) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": gpu, "count": count}, "servers": servers}))
    return p


def test_the_old_homelab_order_is_an_error_naming_the_gpu_the_shares_and_the_fixes(tmp_path: Path) -> None:
    # coder first takes 23 GiB of the 24 GiB card; chat (3.8 GiB) cannot fit in what it leaves
    with pytest.raises(ProfileError) as exc:
        build_plan(load(_write(tmp_path, "rtx-3090", [CODER, CHAT])), detect=False)
    text = str(exc.value)
    assert "servers[1]" in text and "GPU 0 (NVIDIA GeForce RTX 3090, 24.00 GiB)" in text
    assert "coder 24.00 GiB + chat 4.78 GiB = 28.78 GiB" in text
    assert "list chat before coder" in text and "--target llama-swap" in text and "--ignore-fit" in text


def test_ignore_fit_still_plans_and_says_how_far_over(tmp_path: Path) -> None:
    plan = build_plan(load(_write(tmp_path, "rtx-3090", [CODER, CHAT])), detect=False, enforce_fit=False)
    assert [s.name for s in plan.servers] == ["coder", "chat"]
    (gpu,) = plan.gpus
    assert gpu.used_bytes > gpu.total_bytes and "over by" in gpu.summary()
    assert any("cannot hold its servers" in w for w in plan.warnings)


def test_the_later_server_offloads_into_what_the_earlier_leaves(tmp_path: Path) -> None:
    alone = build_plan(load(_write(tmp_path, "rtx-3090", [CODER])), detect=False).servers[0]
    plan = build_plan(load(_write(tmp_path, "rtx-3090", [CHAT, CODER])), detect=False)
    chat, coder = plan.servers
    ncmoe = {f.name: f for f in coder.flags}["-ncmoe"]
    assert int(ncmoe.value or 0) > int({f.name: f for f in alone.flags}["-ncmoe"].value or 0)
    assert "left by chat on GPU 0" in ncmoe.reason
    assert coder.estimate is not None and chat.estimate is not None
    assert coder.estimate.available_bytes == 24 * GIB - chat.estimate.total_bytes - fit.FIT_MARGIN_BYTES
    (gpu,) = plan.gpus
    assert gpu.used_bytes <= gpu.total_bytes
    assert "GPU 0 (NVIDIA GeForce RTX 3090, 24.00 GiB): chat 4.78 GiB + coder" in explain_fit(plan)


def test_vllm_fraction_is_what_a_llama_cpp_server_on_the_card_leaves(tmp_path: Path) -> None:
    coder = {**CODER, "model": {"path": "/models/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"}, "context": 32768, "parallel": 1}
    plan = build_plan(load(_write(tmp_path, "rtx-4090", [coder, VLLM])), detect=False)
    gguf, vllm = plan.servers
    util = {f.name: f for f in vllm.flags}["--gpu-memory-utilization"]
    assert float(util.value or 0) < 0.90 and "shares GPU 0 with coder" in util.reason
    assert gguf.estimate is not None and vllm.estimate is not None and vllm.estimate.verdict == "fits"
    total = gguf.estimate.total_bytes + fit.FIT_MARGIN_BYTES + float(util.value or 0) * 24 * GIB
    assert total <= 24 * GIB


def test_servers_on_different_gpus_each_have_their_own(tmp_path: Path) -> None:
    a = {**VLLM, "name": "a", "gpus": [0], "port": 8000}
    b = {**VLLM, "name": "b", "gpus": [1], "port": 8001}
    plan = build_plan(load(_write(tmp_path, "rtx-4090", [a, b], count=2)), detect=False)
    for sp in plan.servers:   # alone on its GPU: vLLM's own default, no flag
        assert "--gpu-memory-utilization" not in {f.name for f in sp.flags}
        assert sp.settings is not None and sp.settings.memory_fraction == 0.92
    assert all(len(g.shares) == 1 for g in plan.gpus)


def test_two_vllm_servers_on_one_gpu_split_the_default_share(tmp_path: Path) -> None:
    a = {**VLLM, "name": "a", "port": 8000}
    b = {**VLLM, "name": "b", "port": 8001}
    plan = build_plan(load(_write(tmp_path, "rtx-4090", [a, b])), detect=False)
    assert [{f.name: f.value for f in sp.flags}["--gpu-memory-utilization"] for sp in plan.servers] == ["0.46"] * 2


def test_sglang_beside_llama_cpp_counts_what_it_keeps_outside_its_fraction(tmp_path: Path) -> None:
    coder = {**CODER, "model": {"path": "/models/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"}, "context": 32768, "parallel": 1}
    sg = {**VLLM, "engine": "sglang"}
    plan = build_plan(load(_write(tmp_path, "rtx-4090", [coder, sg])), detect=False)
    (gpu,) = plan.gpus
    sglang = plan.servers[1]
    frac = float({f.name: f.value for f in sglang.flags}["--mem-fraction-static"] or 0)
    reserve = fit.sglang_reserved_bytes(24 * GIB, 1, 4)
    share = next(s for s in gpu.shares if s.server == "chat")
    assert share.bytes == int(frac * 24 * GIB) + reserve and gpu.used_bytes <= gpu.total_bytes


@pytest.mark.parametrize("profile", sorted([*ROOT.glob("profiles/*.yaml"), *ROOT.glob("examples/*.yaml")]),
                         ids=lambda p: p.stem)
def test_every_shipped_profile_fits_on_each_gpu(profile: Path) -> None:
    plan = build_plan(load(profile), detect=False, environ={"HOME": "/home/user"})
    for gpu in plan.gpus:
        assert gpu.used_bytes <= gpu.total_bytes, gpu.summary()
