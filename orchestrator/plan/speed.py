"""Predicted tokens per second, batch 1: the decode roofline (bytes read per token over memory
bandwidth) and a prefill model from compute (FLOPs per token over the device's FLOPS), each times an
efficiency factor per engine and backend. Pure functions of ModelFacts, the GPU's catalog entry, the
host's measured or assumed figures and the memory estimate; every figure says how it was made.

Decode reads every weight once per token except the token-embedding table (one row, unless the
table doubles as the output matrix), only the active share of MoE experts, and the KV cache of the
tokens before it. Weights the plan keeps in system RAM are read at the host's bandwidth.
Prefill needs 2 FLOPs per active weight per token plus attention (QK and AV: 4 x d_k x heads per
earlier token per attention layer); llama.cpp copies weights kept in RAM to the GPU for each
micro-batch of a prompt (op offload), so those cross PCIe once per 512 tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.catalog import Gpu
from orchestrator.facts.types import ModelFacts
from orchestrator.plan import fit

N_UBATCH = fit.N_UBATCH
PCIE_GBS = 25.0          # PCIe 4.0 x16 in practice (32 GB/s raw): weights offloaded to RAM cross it in prefill
HOST_BANDWIDTH_GBS = 60.0  # dual-channel DDR5-4800 is 76.8 GB/s raw; used when the host was not measured


@dataclass(frozen=True)
class Efficiency:
    """Achieved share of the roofline: decode of memory bandwidth, prefill of peak FLOPS."""

    decode: float
    prefill: float
    basis: str             # where the factors come from: a default and its reason, or saved bench runs
    calibrated: bool = False
    # CPU: the host bandwidth (GB/s) and compute (TFLOPS) measured during the runs the factors were
    # calibrated on; the factors are shares of these, so predictions apply them to these, not to a
    # figure measured later on a machine whose load has changed.
    host_bandwidth_gbs: float | None = None
    host_tflops: float | None = None


# Defaults by backend family (Gpu.accelerator) for the GGUF engines, before any measurement here.
DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "cuda": Efficiency(0.63, 0.9, "default for CUDA: decode 0.63 = llama.cpp's tg128 on a Tesla P40 (llama 7B "
                       "Q4_0, 56.8 t/s x 3.83 GB / 346 GB/s; llama.cpp PR #4766); prefill 0.9 of the FP16 "
                       "figure: pp512 of llama 8B Q4_0 on an RTX 4090 is 10,359 t/s = 166 TFLOPS at 2 FLOPs "
                       "per weight, 1.0x its 165 TFLOPS (int8 tensor-core MMQ; llama.cpp PR #7676)"),
    "rocm": Efficiency(0.55, 0.5, "default for ROCm: a round figure below CUDA's, not measured"),
    "metal": Efficiency(0.7, 0.5, "default for Metal: a round figure, not measured"),
    # "sycl", not "intel": Gpu.accelerator names Intel GPUs by backend (SYCL), so an "intel" key was never read.
    "sycl": Efficiency(0.45, 0.3, "default for Intel GPUs (SYCL): a round figure, not measured"),
    "cpu": Efficiency(0.6, 0.5, "default for CPU: decode 0.6 of the host's parallel-read bandwidth, prefill "
                      "0.5 of its float32 matmul FLOPS; round figures, not measured"),
}
# vLLM / SGLang at batch 1 on a GPU launch more kernels per token than llama.cpp (CUDA graphs help).
PYTHON_ENGINE_DECODE = 0.8   # times the backend default


def default_efficiency(engine: str, accelerator: str) -> Efficiency:
    base = DEFAULT_EFFICIENCY.get(accelerator, DEFAULT_EFFICIENCY["cpu"])
    if engine in ("vllm", "sglang"):
        return Efficiency(round(base.decode * PYTHON_ENGINE_DECODE, 3), base.prefill,
                          f"{base.basis}; x{PYTHON_ENGINE_DECODE} for {engine}'s per-token overhead at batch 1")
    return base


@dataclass(frozen=True)
class Host:
    """The machine beside the GPU (or the whole machine on CPU): memory bandwidth and compute."""

    bandwidth_gbs: float = HOST_BANDWIDTH_GBS
    bandwidth_source: str = (f"assumed {HOST_BANDWIDTH_GBS:g} GB/s (dual-channel DDR5); this machine was not "
                             "measured")
    gflops: float | None = None
    gflops_source: str = "not measured"
    pcie_gbs: float = PCIE_GBS


@dataclass(frozen=True)
class Speed:
    decode_tps: float | None
    prefill_tps: float | None
    decode_how: str
    prefill_how: str
    efficiency: Efficiency
    depth: int                       # tokens before the decoded one (KV read per step)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_bytes(facts: ModelFacts, kv_cache: str, depth: int) -> tuple[int, int, str] | None:
    """(weight bytes read per decoded token, KV bytes, how): every weight except the token-embedding
    table (read one row per token unless it doubles as the output matrix), only the active share of
    MoE experts; KV of `depth` earlier tokens (sliding-window layers: the window)."""
    meta = facts.metadata
    total = int(meta.get("tensors.bytes") or 0) or int(facts.size_bytes or 0)
    if not total:
        return None
    read = total
    parts = ["file's tensors" if meta.get("tensors.bytes") else
             ("catalog size estimate" if facts.size_is_estimate else "file size")]
    embd = int(meta.get("tensors.token_embd_bytes") or 0)
    if embd and not meta.get("tensors.output_tied", False):
        read -= embd
        parts.append(f"token embedding ({embd / 2**20:.0f} MiB) read one row per token")
    experts = int(meta.get("tensors.expert_bytes") or 0)
    n_exp, used = int(meta.get("expert_count") or 0), int(meta.get("expert_used_count") or 0)
    if experts and n_exp and used:
        read -= experts - experts * used // n_exp
        parts.append(f"MoE: {used} of {n_exp} experts per token")
    elif facts.is_moe and facts.params_b and facts.active_params_b:
        read = int(read * facts.active_params_b / facts.params_b)
        parts.append(f"MoE: {facts.active_params_b:g}B of {facts.params_b:g}B parameters active")
    kv = fit.kv_cache_bytes(facts, "llama.cpp", depth, 1, kv_cache, n_ubatch=0) if meta.get("block_count") else 0
    parts.append(f"KV of {depth} tokens {kv / 2**20:.1f} MiB ({kv_cache})")
    return read, kv, f"weights {read / 2**20:,.0f} MiB (" + "; ".join(parts) + ")"


def host_read_bytes(facts: ModelFacts, host_bytes: int, offload_mode: str) -> int:
    """Of the weights kept in system RAM, the bytes one decoded token reads."""
    n_exp, used = int(facts.metadata.get("expert_count") or 0), int(facts.metadata.get("expert_used_count") or 0)
    if offload_mode in ("moe_all", "moe_layers") and n_exp and used:
        return host_bytes * used // n_exp
    return host_bytes


def flops_per_token(facts: ModelFacts, depth: int) -> tuple[float, str] | None:
    """FLOPs one prompt token costs at an average depth of `depth` earlier tokens."""
    active = facts.active_params_b or facts.params_b
    if not active:
        return None
    weights = 2 * active * 1e9
    meta = facts.metadata
    attn = 0.0
    if meta.get("block_count"):
        layers = len(fit.attention_layers(facts))
        n_head = fit._int(meta, "attention.head_count", 1)
        d_k = fit._int(meta, "attention.key_length") or fit._int(meta, "embedding_length") // max(n_head, 1)
        attn = 4.0 * layers * n_head * d_k * depth
    how = f"2 x {active:g}B active weights" + (f" + attention at depth {depth}" if attn else "")
    return weights + attn, how


def _device(gpu: Gpu, gpu_count: int, engine: str, host: Host) -> tuple[float | None, str, float | None, str]:
    """(bandwidth GB/s, its source, TFLOPS, its source) of what runs the model."""
    if gpu.is_cpu:
        return (host.bandwidth_gbs, host.bandwidth_source, host.gflops / 1000 if host.gflops else None,
                host.gflops_source)
    scale = gpu_count if engine in ("vllm", "sglang") and gpu_count > 1 else 1
    how = f" x {scale} GPUs (tensor parallel)" if scale > 1 else ""
    if gpu_count > 1 and scale == 1:
        how = f" (layer split over {gpu_count} GPUs: one token passes them in turn)"
    bw = gpu.bandwidth_gbs * scale if gpu.bandwidth_gbs else None
    tflops = gpu.fp16_tflops * scale if gpu.fp16_tflops else None
    tf_how = f"{gpu.name} FP16 {gpu.fp16_tflops:g} TFLOPS (GPU catalog){how}" if gpu.fp16_tflops else "unknown"
    if gpu.fp16_tflops is not None and gpu.fp16_tflops < 1.0:
        tflops, tf_how = None, (f"unknown: {gpu.name}'s FP16 rate ({gpu.fp16_tflops:g} TFLOPS) is not what "
                                "llama.cpp runs on (INT8/FP32 kernels), and the catalog has no figure for those")
    return bw, f"{gpu.name} {gpu.bandwidth_gbs:g} GB/s (GPU catalog){how}", tflops, tf_how


def predict(facts: ModelFacts, gpu: Gpu, gpu_count: int, engine: str, kv_cache: str, host: Host,
            efficiency: Efficiency, prompt_tokens: int = 512, host_bytes: int = 0,
            offload_mode: str = "all") -> Speed:
    """Batch-1 decode after a prompt of `prompt_tokens`, and prefill of that prompt."""
    bw, bw_how, tflops, tf_how = _device(gpu, gpu_count, engine, host)
    if gpu.is_cpu and efficiency.host_bandwidth_gbs:
        bw = efficiency.host_bandwidth_gbs
        bw_how = f"{bw:g} GB/s (measured during the calibration runs)"
    if gpu.is_cpu and efficiency.host_tflops:
        tflops = efficiency.host_tflops
        tf_how = f"{tflops * 1000:g} GFLOPS (measured during the calibration runs)"
    kv = "f16" if kv_cache in ("auto", "bf16") else kv_cache
    got = decode_bytes(facts, kv, prompt_tokens)
    decode = prefill = None
    decode_how = "unknown: the model's size is unknown"
    if got and bw:
        read, kv_b, how = got
        on_host = 0 if gpu.is_cpu else min(host_read_bytes(facts, host_bytes, offload_mode), read)
        seconds = (read - on_host + kv_b) / (bw * 1e9 * efficiency.decode)
        decode_how = f"{how} over {bw_how} x {efficiency.decode:g} efficiency"
        if on_host:
            seconds += on_host / (host.bandwidth_gbs * 1e9 * DEFAULT_EFFICIENCY["cpu"].decode)
            decode_how += (f"; {on_host / 2**20:,.0f} MiB of it in system RAM over {host.bandwidth_source} x "
                           f"{DEFAULT_EFFICIENCY['cpu'].decode:g}")
        decode = round(1 / seconds, 1)
    elif got:
        decode_how = f"unknown: no memory bandwidth for {gpu.name}"
    flops = flops_per_token(facts, prompt_tokens // 2)
    prefill_how = "unknown: the model's parameter count is unknown"
    if flops and tflops:
        per_token = flops[0] / (tflops * 1e12 * efficiency.prefill)
        prefill_how = (f"{flops[0] / 1e9:,.1f} GFLOP per token ({flops[1]}) over {tf_how} x "
                       f"{efficiency.prefill:g} efficiency")
        if host_bytes and not gpu.is_cpu:
            per_token += host_bytes / (host.pcie_gbs * 1e9 * N_UBATCH)
            prefill_how += (f"; {host_bytes / 2**30:.1f} GiB in RAM cross PCIe ({host.pcie_gbs:g} GB/s assumed) "
                            f"once per {N_UBATCH}-token micro-batch")
        prefill = round(1 / per_token, 1)
    elif flops:
        prefill_how = f"unknown compute: {tf_how}"
    return Speed(decode, prefill, decode_how, prefill_how, efficiency, prompt_tokens)
