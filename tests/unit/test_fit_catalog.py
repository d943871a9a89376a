"""Fit without the model file: the model catalog, hybrid (linear-attention / convolution) layers,
split GGUFs, vLLM/SGLang memory fractions, and regression checks against published figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator import catalog
from orchestrator.facts.model import gather, split_parts
from orchestrator.facts.types import ModelFacts
from orchestrator.pipeline import build_plan
from orchestrator.plan import fit
from orchestrator.profile import load

GIB = 2**30
MIB = 2**20


def _profile(tmp_path: Path, gpu: str, **server: object) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"name": "p", "hardware": {"gpu": gpu}, "servers": [{"name": "s", **server}]}))
    return p


# --------------------------------------------------------------------------- the catalog

def test_every_catalog_entry_is_complete() -> None:
    required = ("block_count", "context_length", "attention.head_count", "attention.head_count_kv",
                "attention.key_length", "embedding_length")
    for entry in catalog.models():
        assert entry.source and entry.match, entry.name
        missing = [k for k in required if k not in entry.metadata]
        assert not missing, f"{entry.name}: {missing}"
        if entry.metadata.get("expert_count"):
            assert entry.active_params_b and entry.active_params_b < entry.params_b, entry.name


@pytest.mark.parametrize("name", ["Qwen3.6-35B-A3B", "Qwen3.6-27B", "LFM2.5-8B-A1B", "MiniCPM5-1B"])
def test_the_issue_models_are_in_the_catalog(name: str) -> None:
    entry = catalog.find_model(f"/models/{name}-Q4_K_M.gguf")
    assert entry is not None and entry.name == name


def test_longest_match_wins() -> None:
    assert catalog.find_model("Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf").name == "Qwen3-Coder-30B-A3B"  # type: ignore[union-attr]
    assert catalog.find_model("Qwen3-32B-AWQ").name == "Qwen3-32B"  # type: ignore[union-attr]
    assert catalog.find_model("Totally-Unknown-7B.gguf") is None


def test_absent_file_uses_the_catalog_and_says_so() -> None:
    f = gather("/nonexistent/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf")
    assert f.source == "catalog" and not f.exists and f.size_is_estimate
    assert f.size_bytes == 22_850_000_000  # the published UD-Q4_K_XL size
    assert f.n_layers == 40 and f.is_moe and f.has_mtp is None
    assert any("estimated from catalog" in n for n in f.notes)
    # experts are ~92% of the parameters: 3 x 2048 x 512 x 256 experts x 40 layers
    assert f.metadata["tensors.expert_bytes"] == int(22_850_000_000 * 3 * 2048 * 512 * 256 * 40 / 35e9)


def test_quant_without_published_size_is_params_times_bits() -> None:
    f = gather("/nonexistent/Qwen3.6-27B-Q3_K_M.gguf")
    assert f.source == "catalog" and f.size_bytes == int(27.78 * 1e9 * 3.91 / 8)
    assert any("assumed" in n for n in f.notes)


def test_hf_reference_uses_the_catalog() -> None:
    f = gather("meta-llama/Llama-3.1-8B-Instruct", is_hf=True)
    assert f.source == "catalog" and f.format == "hf" and f.size_bytes == int(8.03 * 1e9 * 16 / 8)


def test_present_file_wins_over_the_catalog(tmp_path: Path) -> None:
    from tests.unit.test_fit import write_gguf

    path = write_gguf(tmp_path / "Qwen3.6-27B-Q3_K_M.gguf", "llama", layers=2, embd=32, heads=4, kv_heads=2,
                      head_dim=8)
    f = gather(str(path))
    assert f.source == "file" and f.n_layers == 2 and not f.size_is_estimate


# --------------------------------------------------------------------------- hybrid layers

def test_qwen36_hybrid_kv_counts_only_the_attention_layers() -> None:
    f = gather("/nonexistent/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf")
    assert fit.attention_layers(f) == [2] * 10 and fit.recurrent_layers(f) == 30
    ctx = 65536
    kv = 10 * ctx * 2 * (256 + 256) * 2  # 10 layers x 2 KV heads x (K 256 + V 256) x f16
    # Gated DeltaNet state per layer and sequence, f32: conv 3 x (4096 + 2 x 16 x 128) + state 128 x 4096
    state = 30 * (3 * (4096 + 2 * 16 * 128) + 128 * 4096) * 4
    assert fit.kv_cache_bytes(f, "llama.cpp", ctx, 1, "f16") == kv + state
    assert fit.kv_cache_bytes(f, "llama.cpp", ctx, 2, "f16") == 2 * (kv + state)


def test_lfm2_per_layer_kv_heads_and_short_convolution_state() -> None:
    f = gather("/nonexistent/LFM2.5-8B-A1B-Q4_K_M.gguf")
    assert fit.attention_layers(f) == [8] * 6 and fit.recurrent_layers(f) == 18
    per_token = 6 * 8 * (64 + 64) * 2
    state = 18 * 2048 * (3 - 1) * 4
    assert fit.kv_cache_bytes(f, "llama.cpp", 4096, 1, "f16") == 4096 * per_token + state


def test_hybrid_gguf_written_with_gguf_library(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "hybrid.gguf"
    w = gguf.GGUFWriter(str(path), "qwen35")
    w.add_block_count(8)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(16)
    w.add_value_length(16)
    w.add_full_attention_interval(4)
    w.add_ssm_conv_kernel(4)
    w.add_ssm_inner_size(128)
    w.add_ssm_state_size(16)
    w.add_ssm_group_count(2)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = gather(str(path))
    assert fit.attention_layers(f) == [2, 2]  # layers 3 and 7
    state = 6 * (3 * (128 + 2 * 2 * 16) + 16 * 128) * 4
    assert fit.kv_cache_bytes(f, "llama.cpp", 1000, 1, "f16") == 2 * 1000 * 2 * 32 * 2 + state


def test_hf_config_layer_types_mark_linear_attention_layers(tmp_path: Path) -> None:
    d = tmp_path / "Hybrid-1B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3_5ForCausalLM"], "num_hidden_layers": 4, "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "linear_num_value_heads": 4, "linear_value_head_dim": 16, "linear_key_head_dim": 16,
        "linear_num_key_heads": 2, "linear_conv_kernel_dim": 4}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 123456}}))
    f = gather(str(d))
    assert f.size_bytes == 123456
    assert fit.attention_layers(f) == [2] and fit.recurrent_layers(f) == 3
    assert fit.hf_kv_per_sequence(f, 1000, "f16") == 1000 * 2 * 64 * 2 + 3 * (3 * (64 + 2 * 2 * 16) + 16 * 64) * 4


@pytest.mark.parametrize(("dtype_key", "dtype", "quant", "params"), [
    ("dtype", "bfloat16", None, 0.0005),          # transformers 5 writes "dtype"
    ("torch_dtype", "float32", None, 0.00025),
    ("torch_dtype", "bfloat16", {"quant_method": "awq"}, None),   # packed weights: bytes say nothing of the count
])
def test_hf_parameters_from_the_safetensors_bytes_at_the_configs_dtype(tmp_path: Path, dtype_key: str, dtype: str,
                                                                       quant: dict | None, params: float | None) -> None:
    """A directory whose name gives no size: the parameter count (what prefill FLOPs are predicted
    from) is its safetensors' bytes at the config's dtype."""
    d = tmp_path / "my-model"
    d.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
           "num_attention_heads": 4, "vocab_size": 100, dtype_key: dtype}
    if quant:
        cfg["quantization_config"] = quant
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes(b"\0" * 1_000_000)
    f = gather(str(d))
    assert f.params_b == params
    if params:
        assert any("safetensors' 1,000,000 bytes" in n for n in f.notes)


# --------------------------------------------------------------------------- split GGUF

def test_split_gguf_sums_the_tensors_of_every_part(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "Big.gguf"), "llama", split_max_tensors=2)
    w.add_block_count(3)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    for i in range(5):
        w.add_tensor(f"blk.{i}.w", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    parts = sorted(tmp_path.glob("Big-*-of-*.gguf"))
    assert len(parts) == 3 and split_parts(parts[0]) == parts
    f = gather(str(parts[0]))
    assert f.size_bytes == 5 * 64 * 64 * 2 and f.n_layers == 3
    assert any("split GGUF: 3 parts" in n for n in f.notes)
    parts[2].unlink()
    partial = gather(str(parts[0]))
    assert partial.size_bytes == 4 * 64 * 64 * 2 and any("missing" in n for n in partial.notes)


# --------------------------------------------------------------------------- published figures

def test_llama31_8b_kv_matches_published_figures() -> None:
    # kvplan / performance reference: 128 KiB per token f16; 32k: 4.00 GiB f16, 2.12 q8_0, 1.12 q4_0; 128k: 16 GiB
    f = gather("/nonexistent/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf")
    assert fit.kv_bytes_per_token_all(f, "f16") == 131072
    assert fit.kv_cache_bytes(f, "llama.cpp", 32768, 1, "f16") == 4 * GIB
    assert round(fit.kv_cache_bytes(f, "llama.cpp", 32768, 1, "q8_0") / GIB, 2) == 2.12
    assert round(fit.kv_cache_bytes(f, "llama.cpp", 32768, 1, "q4_0") / GIB, 2) == 1.12
    assert fit.kv_cache_bytes(f, "llama.cpp", 131072, 1, "f16") == 16 * GIB


def test_qwen3_30b_a3b_kv_matches_published_figure() -> None:
    # performance reference: Qwen3-30B-A3B (48 L, 4 kv, 128): 96 KiB per token, 3.00 GiB at 32k f16
    f = gather("/nonexistent/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf")
    assert fit.kv_bytes_per_token_all(f, "f16") == 96 * 1024
    assert fit.kv_cache_bytes(f, "llama.cpp", 32768, 1, "f16") == 3 * GIB


def test_deepseek_r1_mla_kv_matches_ik_llama_log() -> None:
    # ik_llama.cpp PR #259 log: "KV self size = 1166.62 MiB, c^KV (q8_0)" for DeepSeek-R1 at 32,768 context
    f = ModelFacts("DeepSeek-R1", "gguf", "", False, "Q4_K_M", 671, 37, None, True, arch="deepseek2", n_layers=61,
                   metadata={"block_count": 61, "attention.kv_lora_rank": 512, "rope.dimension_count": 64,
                             "attention.head_count": 128, "attention.head_count_kv": 128})
    assert round(fit.kv_cache_bytes(f, "ik_llama", 32768, 1, "q8_0") / MIB, 2) == 1166.62


def test_gemma3_27b_sliding_window_matches_published_figure() -> None:
    # performance reference (gguf-parser-go formula): Gemma-3-27B (62 L, 16 kv, hd 128), window 1024:
    # 32k f16 is 3.1 GiB SWA-aware (15.5 all-full), 128k is 10.6 GiB (62 all-full)
    f = ModelFacts("gemma-3-27b", "gguf", "", False, None, 27, 27, None, True, arch="gemma3", n_layers=62,
                   metadata={"block_count": 62, "attention.head_count": 32, "attention.head_count_kv": 16,
                             "attention.key_length": 128, "attention.value_length": 128,
                             "attention.sliding_window": 1024})
    assert round(fit.kv_cache_bytes(f, "llama.cpp", 32768, 1, "f16") / GIB, 1) == 3.1
    assert round(fit.kv_cache_bytes(f, "llama.cpp", 131072, 1, "f16") / GIB, 1) == 10.6
    assert round(fit.kv_cache_bytes(f, "ik_llama", 32768, 1, "f16") / GIB, 1) == 15.5


def test_qwen36_35b_q4_k_xl_at_128k_runs_on_12gb_with_experts_offloaded(tmp_path: Path) -> None:
    # smeltcore.com RTX 4070 (12 GB) recipe: the 22.85 GB UD-Q4_K_XL GGUF serves a 128K context with the
    # expert tensors in system RAM
    p = _profile(tmp_path, "rtx-4070", engine="llama.cpp", context=131072,
                 model={"path": "/models/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"})
    sp = build_plan(load(p), detect=False).servers[0]
    est = sp.estimate
    assert est.verdict == "fits with offload" and est.source == "estimated from catalog"
    assert est.total_bytes + fit.FIT_MARGIN_BYTES <= 12 * GIB
    assert any(f.name in ("-cmoe", "-ncmoe") for f in sp.flags)


# --------------------------------------------------------------------------- vLLM / SGLang memory fraction

def _hf(tmp_path: Path, gpu: str, engine: str, context: int) -> Path:
    return _profile(tmp_path, gpu, engine=engine, context=context, model={"path": "/models/Meta-Llama-3.1-8B-Instruct"})


def test_memory_fraction_keeps_the_default_when_it_fits(tmp_path: Path) -> None:
    sp = build_plan(load(_hf(tmp_path, "rtx-3090", "vllm", 32768)), detect=False).servers[0]
    flags = {f.name: f for f in sp.flags}   # vLLM 0.32.0's own default, 0.92 (config/cache.py), is left to it
    assert "--gpu-memory-utilization" not in flags and sp.estimate.verdict == "fits"
    assert sp.settings.memory_fraction == 0.92 and any("left to vLLM" in n and "0.92" in n for n in sp.notes)
    assert any("holds" in n for n in sp.estimate.notes)


def test_sglang_fraction_is_left_to_sglang_and_its_reserve_counted(tmp_path: Path) -> None:
    """SGLang 0.5.23 computes its default from the GPU's memory (arg_groups/memory_hook.py): ~0.71 on a
    24 GB card, where the plan used to pin 0.85 and count activations inside it."""
    sp = build_plan(load(_hf(tmp_path, "rtx-3090", "sglang", 8192)), detect=False).servers[0]
    assert "--mem-fraction-static" not in {f.name for f in sp.flags}
    fraction = sp.settings.memory_fraction
    assert fraction is not None and 0.70 <= fraction <= 0.73
    assert fit.sglang_default_fraction(8 * GIB, 1, 1) == pytest.approx(0.52, abs=0.03)
    assert fit.sglang_default_fraction(141 * GIB, 1, 8) > 0.9
    est = sp.estimate
    assert est.compute_bytes == fit.sglang_reserved_bytes(24 * GIB, 1, 1)   # outside the fraction
    assert est.weights_bytes + est.kv_cache_bytes <= fraction * 24 * GIB + 1


@pytest.mark.parametrize("engine,flag,value", [("vllm", "--gpu-memory-utilization", "0.95"),
                                               ("sglang", "--mem-fraction-static", "0.89")])
def test_memory_fraction_is_raised_from_the_estimate(tmp_path: Path, engine: str, flag: str, value: str) -> None:
    # 8B bf16 (15.0 GiB) + one 49k-token sequence (6 GiB) + activations 1.5 GiB = 22.5 of 24 GiB: vLLM 0.94
    # (activations inside its share); SGLang's fraction holds weights and KV only: 0.88, activations on top
    sp = build_plan(load(_hf(tmp_path, "rtx-3090", engine, 49152)), detect=False).servers[0]
    f = {f.name: f for f in sp.flags}[flag]
    assert f.value == value and "raised" in f.reason
    assert sp.estimate.verdict == "fits"


def test_vllm_that_cannot_hold_one_sequence_does_not_fit(tmp_path: Path) -> None:
    from orchestrator.errors import ProfileError

    with pytest.raises(ProfileError) as exc:
        build_plan(load(_hf(tmp_path, "rtx-3090", "vllm", 131072)), detect=False)
    assert "does not fit" in str(exc.value) and "kv_cache: fp8" in str(exc.value)
