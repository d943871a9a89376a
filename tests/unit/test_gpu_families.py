"""Plans on the newer GPU families: each case says which engine rule decides, and fails when the
catalog entry or the rule gives the architecture the wrong treatment."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.errors import ProfileError
from tests.unit.test_engine_rules import _flags
from tests.unit.test_engine_rules import _plan as plan_one

GGUF = "/m/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf"
HF = "/m/Meta-Llama-3.1-8B-Instruct"


def _plan(engine: str, gpu: str, **server: Any) -> Any:
    """test_engine_rules' planner helper, with a GGUF for the llama.cpp engines and HF weights otherwise."""
    return plan_one(engine, gpu, GGUF if engine in ("llama.cpp", "ik_llama") else HF, **server)


def _reason(sp: Any, name: str) -> str:
    return next(f.reason for f in sp.flags if f.name == name)


BLACKWELL = ["b200", "b300", "gb200", "rtx-pro-6000-blackwell", "gb10"]


@pytest.mark.parametrize("gpu", BLACKWELL)
def test_blackwell_llama_cpp_uses_the_cuda_tensor_core_fa_kernels(gpu: str) -> None:
    """ggml-cuda/fattn.cu: the mma (tensor-core) kernels serve every sm80+ GPU, Blackwell included;
    the CUDA 12.8 image covers sm50 and newer."""
    sp = _plan("llama.cpp", gpu, kv_cache="q8_0")
    assert _flags(sp)["-fa"] == "on" and "tensor-core kernels" in _reason(sp, "-fa")
    assert sp.image == "ghcr.io/ggml-org/llama.cpp:server-cuda"


@pytest.mark.parametrize("gpu", BLACKWELL + ["h20", "l20"])
def test_fp8_kv_is_taken_on_blackwell_hopper_and_ada(gpu: str) -> None:
    """vLLM 0.32 FlashInfer takes fp8 KV on sm80-sm121; SGLang's fp8 floor is sm89."""
    assert _flags(_plan("vllm", gpu, kv_cache="fp8"))["--kv-cache-dtype"] == "fp8_e4m3"
    assert _flags(_plan("sglang", gpu, kv_cache="fp8"))["--kv-cache-dtype"] == "fp8_e4m3"


@pytest.mark.parametrize("gpu", ["b200", "rtx-pro-6000-blackwell", "gb10"])
def test_ik_image_is_not_picked_past_its_cuda_targets(gpu: str) -> None:
    """The ik image is built for 75/80/86/89 (docker/ik_llama-cuda.Containerfile; engines.yaml max_cc 8.9)."""
    assert _plan("ik_llama", gpu).image is None


def test_cdna2_mi210_runs_llama_cpp_and_vllm_not_sglang_and_has_no_fp8() -> None:
    """SGLang 0.5.23 knows gfx942/gfx950/gfx1250 only; CDNA2 has no FP8 matrix math."""
    assert _plan("llama.cpp", "mi210").image == "ghcr.io/ggml-org/llama.cpp:server-rocm"
    assert _plan("vllm", "mi210").image == "vllm/vllm-openai-rocm:v0.32.0"
    with pytest.raises(ProfileError, match="CDNA3 and newer"):
        _plan("sglang", "mi210")
    with pytest.raises(ProfileError, match="fp8 KV cache needs a GPU with fp8 support"):
        _plan("vllm", "mi210", kv_cache="fp8")


def test_cdna3_mi325x_gets_the_mi30x_sglang_image_and_fp8() -> None:
    sp = _plan("sglang", "mi325x", kv_cache="fp8")
    assert sp.image == "lmsysorg/sglang:v0.5.23-rocm720-mi30x" and _flags(sp)["--kv-cache-dtype"] == "fp8_e4m3"


@pytest.mark.parametrize("gpu", ["mi350x", "mi355x"])
def test_cdna4_is_accepted_by_sglang_but_never_given_the_mi30x_image(gpu: str) -> None:
    """gfx950 is in SGLang's kernels; the mi30x image is built for gfx942 only."""
    sp = _plan("sglang", gpu)
    assert sp.image != "lmsysorg/sglang:v0.5.23-rocm720-mi30x"
    assert _flags(_plan("vllm", gpu, kv_cache="fp8"))["--kv-cache-dtype"] == "fp8_e4m3"


@pytest.mark.parametrize("gpu", ["radeon-pro-w7900", "ryzen-ai-max-395"])
def test_rdna3_cards_run_llama_cpp_rocm_and_are_sent_from_sglang_to_vllm(gpu: str) -> None:
    sp = _plan("llama.cpp", gpu)
    assert sp.image == "ghcr.io/ggml-org/llama.cpp:server-rocm" and _flags(sp)["-fa"] == "on"
    with pytest.raises(ProfileError, match="use engine: vllm"):
        _plan("sglang", gpu)


@pytest.mark.parametrize("gpu", ["arc-b570", "arc-pro-b50", "arc-pro-b60"])
def test_xe2_cards_run_llama_cpp_sycl_and_leave_fa_to_it_for_f16(gpu: str) -> None:
    """llama.cpp's SYCL FA kernels depend on build and device: auto for f16, on for a quantized V cache."""
    sp = _plan("llama.cpp", gpu)
    assert sp.image == "ghcr.io/ggml-org/llama.cpp:server-intel" and _flags(sp)["-fa"] == "auto"
    assert _flags(_plan("llama.cpp", gpu, kv_cache="q8_0"))["-fa"] == "on"
    with pytest.raises(ProfileError, match="does not run on"):
        _plan("sglang", gpu)


@pytest.mark.parametrize("gpu,working_set", [("apple-m1", 10.67), ("apple-m2-pro", 21.33),
                                             ("apple-m3-pro", 24.0), ("apple-m5", 21.33)])
def test_apple_base_and_pro_chips_plan_against_the_metal_working_set(gpu: str, working_set: float) -> None:
    sp = _plan("llama.cpp", gpu)
    assert sp.image is None and _flags(sp)["-fa"] == "on"
    assert any(f"planned against {working_set:g} GB" in n for n in sp.notes), sp.notes
    with pytest.raises(ProfileError, match="does not run on"):
        _plan("vllm", gpu)



@pytest.mark.parametrize("gpu", ["arc-b580", "arc-pro-b60"])
def test_intel_gpus_get_the_intel_speed_default_not_the_cpu_one(gpu: str) -> None:
    """Gpu.accelerator is 'sycl' for Intel; the speed defaults were keyed 'intel' and fell back to CPU's."""
    from orchestrator import catalog
    from orchestrator.plan.speed import default_efficiency
    eff = default_efficiency("llama.cpp", catalog.gpus()[gpu].accelerator)
    assert eff.decode == 0.45 and "Intel" in eff.basis


MOE_35B = "/m/Qwen3.6-35B-A3B-Q4_K_M.gguf"   # ~20 GiB at Q4_K_M (catalog size)


def test_offload_on_unified_memory_warns_that_ram_is_the_same_pool() -> None:
    """On Apple silicon, GB10 and Strix Halo the 'system RAM' that -ncmoe moves experts to is the GPU's
    own memory: 9.5 GiB on a 16 GB M1's GPU plus 11.5 GiB of experts is more than the machine has."""
    sp = plan_one("llama.cpp", "apple-m1", MOE_35B, context=8192)
    assert sp.estimate.host_bytes > 0
    assert any("unified memory" in w and "more than its 16 GB" in w for w in sp.warnings), sp.warnings


@pytest.mark.parametrize("gpu", ["rtx-3060-12gb", "apple-m4-max", "gb10"])
def test_no_unified_memory_warning_for_discrete_cards_or_when_nothing_is_offloaded(gpu: str) -> None:
    sp = plan_one("llama.cpp", gpu, MOE_35B, context=8192)
    assert not [w for w in sp.warnings if "unified memory" in w]
