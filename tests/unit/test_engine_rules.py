"""Rules the engines' own source decided (issue: plans that are wrong today). Each case states what
the engine's source says, and fails on the rule it replaced."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from orchestrator.errors import ProfileError
from orchestrator.pipeline import build_plan
from orchestrator.profile import load_text


def _plan(engine: str, gpu: str, path: str = "/m/Meta-Llama-3.1-8B-Instruct", **server: Any):
    doc = {"name": "p", "hardware": {"gpu": gpu},
           "servers": [{"name": "s", "engine": engine, "model": {"path": path}, **server}]}
    return build_plan(load_text(yaml.safe_dump(doc), "t.yaml"), environ={"HOME": "/h"}, detect=False,
                      enforce_fit=False).servers[0]


def _flags(sp: Any) -> dict[str, str | None]:
    return {f.name: f.value for f in sp.flags}


@pytest.mark.parametrize("gpu", ["a100-80gb", "a10", "rtx-3090"])
def test_vllm_fp8_kv_runs_on_ampere(gpu: str) -> None:
    """vLLM 0.32 FlashInfer takes fp8 KV on sm80-sm121 (v1/attention/backends/flashinfer.py)."""
    assert _flags(_plan("vllm", gpu, kv_cache="fp8"))["--kv-cache-dtype"] == "fp8_e4m3"


@pytest.mark.parametrize("gpu", ["tesla-v100-sxm2-32gb", "tesla-t4", "rtx-2080-ti"])
def test_bf16_kv_without_bf16_is_refused_with_the_reason(gpu: str) -> None:
    """vLLM 0.32 triton_attn.py: 'bfloat16 KV cache is not supported ... requires SM80+'."""
    with pytest.raises(ProfileError) as exc:
        _plan("vllm", gpu, kv_cache="bf16")
    assert "bf16 KV cache needs bf16 arithmetic (sm80+)" in str(exc.value) and "kv_cache: auto" in str(exc.value)


@pytest.mark.parametrize("gpu", ["tesla-v100-sxm2-32gb", "tesla-t4"])
def test_vllm_picks_its_own_attention_backend_below_sm80(gpu: str) -> None:
    """TRITON_ATTN was forced: redundant for MHA models (FA and FlashInfer need sm80, so vLLM picks
    Triton) and rejected for MLA models, where vLLM would pick TRITON_MLA."""
    assert "--attention-backend" not in _flags(_plan("vllm", gpu))


def test_sglang_keeps_its_per_model_backend_on_hopper() -> None:
    """SGLang 0.5.23 already picks fa3 on Hopper (model_override_base.py) and silently falls back to
    triton for fp8_e5m2 (overrides.py); a forced fa3 overrode per-model defaults."""
    for kv in ("auto", "fp8_e5m2"):
        assert "--attention-backend" not in _flags(_plan("sglang", "h100-sxm", kv_cache=kv))


def test_sglang_on_cpu_binds_the_profiles_threads() -> None:
    """SGLang reads SGLANG_CPU_OMP_THREADS_BIND (srt/utils/numa_utils.py); the profile's threads were dropped."""
    sp = _plan("sglang", "cpu", threads=4)
    assert {e.name: e.value for e in sp.env}["SGLANG_CPU_OMP_THREADS_BIND"] == "0-3"


@pytest.mark.parametrize("gpu,text", [
    ("tesla-p100-16gb", "FP16 tile and vector kernels"),   # sm_60 is fast-FP16 in ggml-cuda/common.cuh
    ("tesla-p40", "sm_61 has no fast FP16"),
])
def test_pascal_flash_attention_reason(gpu: str, text: str) -> None:
    fa = next(f for f in _plan("llama.cpp", gpu, path="/m/x-7B-Q4_K_M.gguf").flags if f.name == "-fa")
    assert text in fa.reason


@pytest.mark.parametrize("version,default", [("0.32.0", 0.92), ("0.34.0", 1.0)])
def test_vllm_memory_default_is_the_versions_and_is_not_pinned(version: str, default: float) -> None:
    """0.32.0: gpu_memory_utilization defaults to 0.92 (config/cache.py:102), not the 0.90 the plan
    pinned as 'the default'; 0.34.0: unset, 1.0 with the extensible KV cache (cache.py:216-235)."""
    sp = _plan("vllm", "rtx-4090", path="/m/Qwen2.5-7B-Instruct-AWQ", context=8192, engine_version=version)
    assert "--gpu-memory-utilization" not in _flags(sp)
    assert sp.settings is not None and sp.settings.memory_fraction == default
    assert any(f"its default {default:.2f} in vLLM {version}" in n for n in sp.notes)


def test_vllm_on_a_shared_gpu_still_gets_its_share_on_0_34() -> None:
    doc = {"name": "p", "hardware": {"gpu": "rtx-4090"}, "servers": [
        {"name": n, "engine": "vllm", "engine_version": "0.34.0", "port": p, "context": 8192,
         "model": {"path": "/m/Qwen2.5-7B-Instruct-AWQ"}} for n, p in (("a", 8000), ("b", 8001))]}
    plan = build_plan(load_text(yaml.safe_dump(doc), "t.yaml"), environ={"HOME": "/h"}, detect=False)
    assert [_flags(sp)["--gpu-memory-utilization"] for sp in plan.servers] == ["0.46", "0.46"]


@pytest.mark.parametrize("gpu", ["rx-7900-xtx", "rx-9070-xt", "mi250"])
def test_sglang_on_amd_before_cdna3_is_refused_with_vllm_suggested(gpu: str) -> None:
    """SGLang 0.5.23's srt/ knows gfx942, gfx950 and gfx1250 only; these cards got the MI300 image."""
    with pytest.raises(ProfileError) as exc:
        _plan("sglang", gpu)
    assert "CDNA3 and newer only" in str(exc.value) and "engine: vllm" in str(exc.value)


def test_sglang_on_mi300x_keeps_the_mi30x_image() -> None:
    sp = _plan("sglang", "mi300x")
    assert sp.image == "lmsysorg/sglang:v0.5.23-rocm720-mi30x"
    assert _plan("vllm", "rx-7900-xtx").engine == "vllm"


def test_ik_ngram_speculation_is_planned_without_a_draft_model() -> None:
    """ik 55d3c05bf parses --spec-type ngram-simple|ngram-map-k|... (common/common.cpp:1058-1075) and
    builds n-gram drafters without a draft model; the planner refused 'ngram'. The real parser takes the
    argv in tests/contract/test_engine_parsers.py (ik_llama-ngram)."""
    flags = _flags(_plan("ik_llama", "rtx-3090", path="/m/Qwen3-8B-Q4_K_M.gguf",
                         speculative={"method": "ngram", "tokens": 4}))
    assert flags["--spec-type"] == "ngram-simple" and flags["--spec-ngram-size-m"] == "4" and "-md" not in flags


def test_apple_memory_is_the_metal_working_set_not_the_whole_ram() -> None:
    """llama.cpp Metal reports recommendedMaxWorkingSetSize as the device's memory (ggml-metal-device.m)
    and only warns past it: a 107 GiB model did 'fit in 128 GiB' with all layers on the GPU."""
    sp = _plan("llama.cpp", "apple-m4-max", path="/m/Qwen3-235B-A22B-Q3_K_M.gguf", context=16384)
    assert sp.estimate is not None and sp.estimate.available_bytes == 96 * 2**30
    assert sp.settings is not None and sp.settings.offload != "all"
    assert any("Metal" in n and "96 GB" in n for n in sp.notes)


@pytest.mark.parametrize("gpu", ["arc-a770-16gb", "arc-b580"])
def test_intel_arc_runs_llama_cpp_through_sycl(gpu: str) -> None:
    """Gpu.accelerator was 'intel', which no engine lists: every engine was refused, with a hint naming
    llama.cpp's SYCL backend. llama.cpp b11434 publishes server-intel (.devops/intel.Dockerfile, SYCL)."""
    sp = _plan("llama.cpp", gpu, path="/m/Qwen3-8B-Q4_K_M.gguf", runtime="docker")
    assert sp.accelerator == "sycl" and sp.image == "ghcr.io/ggml-org/llama.cpp:server-intel"
    assert sp.gpu_access().devices == ("/dev/dri",)
    assert "SYCL" in next(f for f in sp.flags if f.name == "-fa").reason


def test_vllm_on_intel_uses_its_xpu_platform_and_fp16_on_the_a770() -> None:
    """vllm/platforms/xpu.py (0.32.0) refuses bf16 on the Arc A770 and asks for --dtype=half."""
    assert _flags(_plan("vllm", "arc-a770-16gb"))["--dtype"] == "float16"
    b580 = _plan("vllm", "arc-b580", path="/m/Qwen2.5-7B-Instruct-AWQ", context=4096)
    assert "--dtype" not in _flags(b580) and any("XPU" in n for n in b580.notes)


def test_the_sycl_build_uses_oneapi_compilers() -> None:
    from orchestrator.errors import ProvisionError
    from orchestrator.provision.builds import cmake_options

    opts = cmake_options("llama.cpp", "sycl", None, portable=True)
    assert "-DGGML_SYCL=ON" in opts and "-DCMAKE_CXX_COMPILER=icpx" in opts
    with pytest.raises(ProvisionError):
        cmake_options("ik_llama", "sycl", None, portable=True)


@pytest.mark.parametrize("method,extra,want", [
    ("mtp", {}, "mtp:n_max=2"),
    ("ngram", {}, "ngram-simple:ngram_size_m=2"),
    ("draft", {"draft_model": "/m/Qwen3-0.6B-Q8_0.gguf"}, "draft:n_max=2"),
])
def test_ik_from_2026_06_gets_the_staged_spec_syntax(method: str, extra: dict[str, str], want: str) -> None:
    """ik 007d64009 (2026-06) refuses -mtp/--draft-max/--spec-ngram-size-* and takes repeated --spec-type
    TYPE:key=value stages (common/common.cpp @ 8337e4c); every newer ik with speculation was refused."""
    sp = _plan("ik_llama", "rtx-3090", path="/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf", engine_version="8337e4c",
               speculative={"method": method, "tokens": 2, **extra})
    flags = _flags(sp)
    assert flags["--spec-type"] == want
    assert not {"-mtp", "--draft-max", "--spec-ngram-size-m"} & set(flags)
    old = _flags(_plan("ik_llama", "rtx-3090", path="/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf",
                       speculative={"method": "mtp", "tokens": 2}))
    assert "-mtp" in old and old["--draft-max"] == "2"


@pytest.mark.parametrize("arg", ["--no-mmap", "--mlock"])
def test_llama_cpp_load_flags_removed_in_b11434_are_caught(arg: str) -> None:
    """b11434 replaced --mmap/--no-mmap/--mlock/-dio with -lm/--load-mode (common/arg.cpp); b9093 has them."""
    with pytest.raises(ProfileError) as exc:
        _plan("llama.cpp", "rtx-3090", path="/m/Qwen3-8B-Q4_K_M.gguf", extra_args=[arg])
    assert "removed by b11434" in str(exc.value) and "-lm" in str(exc.value)
    assert _plan("llama.cpp", "rtx-3090", path="/m/Qwen3-8B-Q4_K_M.gguf", extra_args=[arg],
                 engine_version="b9093") is not None


def test_a_larger_micro_batch_when_experts_sit_in_system_ram() -> None:
    """Prefill copies CPU-resident weights to the GPU once per micro-batch (llama.cpp PR #13386): with
    -ncmoe the plan takes -ub 2048 when its compute buffer fits the same placement, and counts it."""
    path = "/m/Qwen3.6-35B-A3B-UD-Q4_K_XL.gguf"
    sp = _plan("llama.cpp", "rtx-4060", path=path, context=32768, kv_cache="q8_0")
    assert _flags(sp)["-ub"] == "2048" and "-ncmoe" in _flags(sp)
    from orchestrator.facts.model import gather
    from orchestrator.plan import fit

    model = gather(path.replace("/m/", "/nonexistent/"))
    assert sp.estimate is not None
    assert sp.estimate.compute_bytes == fit.compute_bytes(model, "llama.cpp", 32768, 1, True, 2048)
    # f16 KV at the same context leaves no room for the larger buffer without moving more experts
    assert "-ub" not in _flags(_plan("llama.cpp", "rtx-4060", path=path, context=32768))
    assert "-ub" not in _flags(_plan("llama.cpp", "rtx-4090", path="/m/Qwen3-8B-Q4_K_M.gguf"))   # all on the GPU


def test_several_pascal_gpus_split_by_rows() -> None:
    doc = {"name": "p", "hardware": {"gpu": "tesla-p40", "count": 3},
           "servers": [{"name": "s", "engine": "llama.cpp", "model": {"path": "/m/Qwen3-32B-Q4_K_M.gguf"}}]}
    sp = build_plan(load_text(yaml.safe_dump(doc), "t.yaml"), environ={"HOME": "/h"}, detect=False).servers[0]
    assert _flags(sp)["-sm"] == "row"
    assert "-sm" not in _flags(_plan("llama.cpp", "tesla-p40", path="/m/Qwen3-8B-Q4_K_M.gguf"))   # one GPU
