"""Memory estimate: weights + KV cache + compute buffers, against VRAM (or RAM on CPU).

Pure functions of ModelFacts and the server's settings. The formulas follow what the engine
versions the plan targets allocate (checked against their own logs in tests/e2e/test_fit_accuracy.py):
  llama.cpp b11434  KV: non-SWA layers hold n_ctx cells (all slots); sliding-window layers hold
                    min(n_ctx_seq, pad256(n_swa + n_ubatch)) cells per slot.
                    compute: n_ubatch x 4 B x (2 n_ff + 4 n_embd + 3 n_head x d_k) + the FA mask
                    (n_ctx_seq x n_ubatch x 2 B); output buffer n_vocab x 4 B per slot.
  ik_llama 55d3c05bf KV: every layer holds n_ctx cells (no sliding-window cache);
                    compute: the full-vocabulary logits of a micro-batch, n_ubatch x (n_vocab + n_embd) x 4 B.
  vLLM / SGLang     weights + KV pool + activations must fit the memory fraction of each GPU.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.facts.types import ModelFacts
from orchestrator.plan.model import GIB, Change, FitEstimate

MIB = 2**20
N_UBATCH = 512
# Bytes per cached K/V element by KV dtype (ggml block sizes: q8_0 34 B / 32, q4_0 18 B / 32, q6_0 26 B / 32).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q6_0": 26 / 32,
            "q8_KV": 1.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}
# Sliding-window layer pattern by architecture, where the GGUF does not carry it:
# every Nth layer is a global (full-context) layer (llama.cpp src/llama-model.cpp set_swa_pattern).
SWA_PATTERN = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5, "exaone4": 4}
GPU_RUNTIME_BYTES = int(0.5 * GIB)   # CUDA/ROCm context and driver reservations per GPU
FIT_MARGIN_BYTES = 1 * GIB           # headroom, as llama.cpp's --fit-target default






def _int(meta: dict[str, Any], key: str, default: int = 0) -> int:
    value = meta.get(key, default)
    if isinstance(value, list):  # per-layer arrays: use the largest
        value = max(value) if value else default
    return int(value or default)


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def swa_layers(facts: ModelFacts) -> int:
    """How many layers use a sliding window (0 when the model has none)."""
    meta = facts.metadata
    n_layers = _int(meta, "block_count")
    if not meta.get("attention.sliding_window") or not n_layers:
        return 0
    pattern = meta.get("attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return sum(1 for p in pattern if p)
    every = int(pattern) if pattern else SWA_PATTERN.get(facts.arch or "", 0)
    if not every:
        return 0
    return n_layers - n_layers // every


# Hybrid architectures whose GGUF may omit full_attention_interval (llama.cpp's default for them is 4).
HYBRID_INTERVAL = {"qwen35": 4, "qwen35moe": 4, "qwen3next": 4}


def _per_elem(kv: str) -> float:
    return KV_BYTES.get(kv, 2.0)


def kv_bytes_per_token(facts: ModelFacts, kv: str) -> float:
    """Bytes of K+V one token occupies in one full-attention layer (the model's largest KV head count)."""
    meta = facts.metadata
    per_elem = _per_elem(kv)
    if meta.get("attention.kv_lora_rank"):  # MLA: compressed latent + rope part
        return (_int(meta, "attention.kv_lora_rank") + _int(meta, "rope.dimension_count")) * per_elem
    n_head = _int(meta, "attention.head_count", 1)
    n_kv = _int(meta, "attention.head_count_kv", n_head)
    d_k = _int(meta, "attention.key_length") or _int(meta, "embedding_length") // max(n_head, 1)
    d_v = _int(meta, "attention.value_length") or d_k
    return n_kv * (d_k + d_v) * per_elem


def attention_layers(facts: ModelFacts) -> list[int]:
    """KV heads of each layer that holds a KV cache. Linear-attention, state-space and convolution
    layers of hybrid models (Qwen3.5/3.6 Gated DeltaNet, LFM2 short convolutions, Mamba) hold none."""
    meta = facts.metadata
    n_layers = _int(meta, "block_count")
    n_head = _int(meta, "attention.head_count", 1)
    n_kv = meta.get("attention.head_count_kv")
    if isinstance(n_kv, list):
        return [int(x) for x in n_kv[:n_layers] if int(x) > 0]
    kv = int(n_kv or n_head)
    recurrent = meta.get("attention.recurrent_layers")
    if isinstance(recurrent, list):
        return [kv for r in recurrent[:n_layers] if not r]
    interval = _int(meta, "full_attention_interval") or HYBRID_INTERVAL.get(facts.arch or "", 0)
    if interval:
        return [kv for i in range(n_layers) if (i + 1) % interval == 0]
    return [kv] * n_layers


def recurrent_layers(facts: ModelFacts) -> int:
    meta = facts.metadata
    if not (meta.get("ssm.state_size") or meta.get("ssm.inner_size") or meta.get("shortconv.l_cache")):
        return 0
    return _int(meta, "block_count") - len(attention_layers(facts))


def recurrent_state_bytes(facts: ModelFacts, n_seq: int) -> int:
    """Fixed per-sequence state of the recurrent layers, f32 (llama.cpp llama_hparams::n_embd_r/n_embd_s):
    short convolution (LFM2): n_embd x (l_cache - 1); Mamba / Gated DeltaNet:
    (d_conv - 1) x (d_inner + 2 n_group d_state) + d_state x d_inner."""
    n = recurrent_layers(facts)
    if not n:
        return 0
    meta = facts.metadata
    if meta.get("shortconv.l_cache"):
        per_layer = _int(meta, "embedding_length") * (_int(meta, "shortconv.l_cache") - 1)
    else:
        d_conv, d_inner = _int(meta, "ssm.conv_kernel"), _int(meta, "ssm.inner_size")
        d_state, groups = _int(meta, "ssm.state_size"), _int(meta, "ssm.group_count")
        per_layer = max(d_conv - 1, 0) * (d_inner + 2 * groups * d_state) + d_state * d_inner
    return n * max(n_seq, 1) * per_layer * 4


def kv_bytes_per_token_all(facts: ModelFacts, kv: str) -> float:
    """Bytes of K+V one token occupies across all layers that hold a KV cache."""
    meta = facts.metadata
    layers = attention_layers(facts)
    if meta.get("attention.kv_lora_rank") or not layers:
        return len(layers) * kv_bytes_per_token(facts, kv)
    one_head = kv_bytes_per_token(facts, kv) / max(max(layers), 1)
    return sum(layers) * one_head


def kv_cache_bytes(facts: ModelFacts, engine: str, n_ctx_seq: int, n_seq: int, kv: str,
                   n_ubatch: int = N_UBATCH, swa_full: bool = False) -> int:
    """KV cache for n_seq sequences of n_ctx_seq tokens, plus the recurrent state of hybrid models.
    llama.cpp keeps only the window of sliding-window layers unless --swa-full (ik_llama keeps all)."""
    layers = attention_layers(facts)
    per_token = kv_bytes_per_token_all(facts, kv) / len(layers) if layers else 0.0
    n_swa = _int(facts.metadata, "attention.sliding_window")
    swa = min(swa_layers(facts), len(layers)) if engine == "llama.cpp" and not swa_full else 0
    full = len(layers) - swa
    total = full * n_ctx_seq * n_seq * per_token
    if swa:
        cells = min(n_ctx_seq, _pad(n_swa + n_ubatch))
        total += swa * cells * n_seq * per_token
    return int(total) + recurrent_state_bytes(facts, n_seq)


def compute_bytes(facts: ModelFacts, engine: str, n_ctx_seq: int, n_seq: int, flash_attention: bool = True,
                  n_ubatch: int = N_UBATCH, swa_full: bool = False) -> int:
    meta = facts.metadata
    n_embd = _int(meta, "embedding_length")
    n_ff = _int(meta, "feed_forward_length", 4 * n_embd)
    n_head = _int(meta, "attention.head_count", 1)
    d_k = _int(meta, "attention.key_length") or n_embd // max(n_head, 1)
    n_vocab = _int(meta, "tokenizer.tokens_count", 32000)
    output = n_vocab * 4 * n_seq
    if engine == "ik_llama":
        return n_ubatch * (n_vocab + n_embd) * 4 + output
    graph = n_ubatch * 4 * (2 * n_ff + 4 * n_embd + 3 * n_head * d_k)
    if flash_attention:
        graph += n_ctx_seq * n_ubatch * 2
        if swa_full and swa_layers(facts):
            graph += n_ctx_seq * n_ubatch * 2   # the sliding-window layers' mask now spans the whole cache too
    else:
        graph += n_head * n_ctx_seq * n_ubatch * 4
    return graph + output


def estimate_gguf(facts: ModelFacts, engine: str, context: int, parallel: int, kv: str, on_cpu: bool,
                  device_bytes: int | None, offload_mode: str, offload_layers: int | None,
                  flash_attention: bool = True, swa_full: bool = False, n_ubatch: int = N_UBATCH) -> FitEstimate:
    weights = facts.size_bytes or 0
    have_shape = bool(facts.metadata.get("block_count"))
    kv_b = kv_cache_bytes(facts, engine, context, parallel, kv, n_ubatch, swa_full=swa_full) if have_shape else 0
    comp = (compute_bytes(facts, engine, context, parallel, flash_attention, n_ubatch, swa_full=swa_full)
            if have_shape else 0)
    overhead = 0 if on_cpu else GPU_RUNTIME_BYTES
    host = 0
    moved = ""
    experts = int(facts.metadata.get("tensors.expert_bytes") or 0)
    n_layers = _int(facts.metadata, "block_count")
    if offload_mode == "moe_all":
        host = experts or int(weights * (1 - (facts.active_params_b or 0) / (facts.params_b or 1)))
        moved = "all MoE expert tensors to system RAM"
    elif offload_mode == "moe_layers" and offload_layers:
        per_layer = (experts or weights) / max(_int(facts.metadata, "tensors.expert_layers") or n_layers, 1)
        host = int(per_layer * offload_layers)
        moved = f"expert tensors of {offload_layers} layers to system RAM"
    elif offload_mode == "layers" and offload_layers is not None and n_layers:
        host = int(weights * (n_layers - offload_layers) / n_layers)
        moved = f"{n_layers - offload_layers} of {n_layers} layers to system RAM"
    device_total = weights - host + kv_b + comp + overhead
    source = _source(facts)
    notes = [*facts.notes, *([] if have_shape else
                             ["layer/head counts unknown (no model file): KV cache and compute not counted"])]
    if not on_cpu and have_shape:
        notes.append("compute buffers follow the formulas measured on CPU builds; GPU backends may need more "
                     "(0.3-1.5 GiB published for <= 32k context), which the 1 GiB fit margin absorbs")
    if device_bytes is None:
        verdict = "unknown"
    elif device_total + (0 if on_cpu else FIT_MARGIN_BYTES) <= device_bytes:
        verdict = "fits with offload" if host else "fits"
    else:
        verdict = "does not fit"
    est = FitEstimate(weights, kv_b, comp, overhead, device_total, device_bytes, "CPU" if on_cpu else "GPU",
                      verdict, moved, host, source, notes=notes)
    if verdict == "does not fit":
        est.changes = suggest(facts, engine, context, parallel, kv, kv_b, weights, experts)
    return est


def _source(facts: ModelFacts) -> str:
    if facts.source == "catalog":
        return "estimated from catalog"
    return "name estimate" if facts.size_is_estimate else "file"


def suggest(facts: ModelFacts, engine: str, context: int, parallel: int, kv: str, kv_b: int, weights: int,
            experts: int) -> list[Change]:
    """Concrete changes ranked by cost (cheapest first), each with the memory it saves."""
    out: list[Change] = []
    if kv in ("f16", "bf16"):
        q8 = kv_cache_bytes(facts, engine, context, parallel, "q8_0")
        out.append(Change("kv_cache: q8_0 (near-lossless)", kv_b - q8))
    if context >= 8192:
        half = kv_cache_bytes(facts, engine, context // 2, parallel, kv)
        out.append(Change(f"context: {context // 2}", kv_b - half))
    if parallel > 1:
        one = kv_cache_bytes(facts, engine, context, 1, kv)
        out.append(Change("parallel: 1", kv_b - one))
    if experts:
        out.append(Change("offload: auto (MoE experts to system RAM)", experts))
    if facts.quant and facts.quant.upper() not in ("Q3_K_M", "Q2_K", "IQ2_XXS"):
        out.append(Change("a smaller quant (e.g. Q3_K_M)", int(weights * (1 - 3.91 / 8.5))
                          if facts.quant.upper() == "Q8_0" else int(weights * 0.2)))
    return [c for c in out if c.saves_bytes > 0]


ACTIVATION_BYTES = int(1.5 * GIB)   # vLLM/SGLang activations, CUDA graphs and allocator slack per GPU


def hf_kv_per_sequence(facts: ModelFacts, context: int, kv: str) -> int:
    """KV (+ recurrent state) one sequence of `context` tokens needs in vLLM/SGLang: f16/bf16 or fp8."""
    if not _int(facts.metadata, "block_count"):
        return 0
    dtype_bytes = 1.0 if kv.startswith("fp8") else 2.0
    per_token = kv_bytes_per_token_all(facts, "f16") / 2 * dtype_bytes
    return int(per_token * context) + recurrent_state_bytes(facts, 1)


def hf_required_fraction(facts: ModelFacts, context: int, kv: str, device_bytes: int, gpu_count: int,
                         activations_inside: bool = True) -> float | None:
    """The smallest memory fraction with which vLLM/SGLang can start: weights + activations + the KV of
    one full-length sequence (both engines refuse to start when the pool cannot hold max_model_len).
    SGLang's fraction holds weights and the KV pool only (activations_inside=False)."""
    if not facts.size_bytes or not device_bytes:
        return None
    activations = ACTIVATION_BYTES * max(gpu_count, 1) if activations_inside else 0
    need = facts.size_bytes + activations + hf_kv_per_sequence(facts, context, kv)
    return need / device_bytes


# SGLang 0.5.23 srt/arg_groups/memory_hook.py _handle_gpu_memory_settings: by GPU memory (MiB), the
# chunked-prefill size and the decode CUDA-graph batch cap (tp < 4, tp >= 4).
SGLANG_CAPACITY = ((20 * 1024, 2048, 8, 8), (35 * 1024, 4096, 48, 160), (60 * 1024, 4096, 32, 160),
                   (90 * 1024, 8192, 256, 512), (160 * 1024, 8192, 256, 512), (math.inf, 16384, 512, 512))


def sglang_reserved_bytes(gpu_bytes: int, tp: int, parallel: int) -> int:
    """What SGLang 0.5.23 keeps outside --mem-fraction-static on each GPU when it computes the default:
    512 MiB + 1.5 MiB per activation token (max(chunked prefill, 2048)) + tp/8 GiB + 2 MiB per decode
    CUDA-graph batch size (capped at --max-running-requests), at least 10 GiB on GPUs over 60 GiB
    (memory_hook.py:281-342, reserve_for_graph_mb). Prefill-graph and DeepEP reserves are left out."""
    mib = gpu_bytes / MIB
    _, chunk, bs_small, bs_large = next(row for row in SGLANG_CAPACITY if mib < row[0])
    max_bs = min(bs_small if tp < 4 else bs_large, max(parallel, 1))
    reserved = 512 + 1.5 * max(chunk, 2048) + tp / 8 * 1024 + 2 * max_bs
    if mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return int(reserved * MIB)


def sglang_default_fraction(gpu_bytes: int, tp: int, parallel: int) -> float:
    """SGLang 0.5.23's own --mem-fraction-static when none is given: (gpu - reserved) / gpu, 3 decimals."""
    return round((gpu_bytes - sglang_reserved_bytes(gpu_bytes, tp, parallel)) / gpu_bytes, 3)


def estimate_hf(facts: ModelFacts, context: int, parallel: int, kv: str, device_bytes: int | None,
                gpu_count: int, fraction: float, on_cpu: bool = False, reserve_bytes: int | None = None) -> FitEstimate:
    """vLLM/SGLang on GPUs take fraction x VRAM up front: weights and activations first, and whatever
    remains becomes the KV pool. It must hold at least one sequence of `context` tokens; `parallel`
    sequences of full length need `parallel` times that, and beyond the pool the engine queues
    requests. On CPU (RAM) vLLM's KV cache is sized for context x parallel instead."""
    weights = facts.size_bytes or 0
    one_seq = hf_kv_per_sequence(facts, context, kv)
    known = bool(_int(facts.metadata, "block_count"))
    activations = ACTIVATION_BYTES * max(gpu_count, 1) if reserve_bytes is None else reserve_bytes
    notes = list(facts.notes)
    if not known:
        notes.append("layer/head counts unknown (no config.json and not in the catalog): KV per sequence not counted")
    if on_cpu:
        kv_b = one_seq * parallel
        total = weights + kv_b + activations
        verdict = "unknown" if device_bytes is None else ("fits" if total <= device_bytes else "does not fit")
        est = FitEstimate(weights, kv_b, activations, 0, total, device_bytes, "CPU", verdict, "", 0,
                          _source(facts), notes=notes)
        if verdict == "does not fit" and known:
            est.changes = [c for c in (
                Change(f"context: {context // 2}", kv_b // 2) if context >= 8192 else None,
                Change(f"parallel: {max(1, parallel // 2)}", kv_b // 2) if parallel > 1 else None,
            ) if c is not None]
        return est
    budget = int(device_bytes * fraction) if device_bytes else None
    inside = reserve_bytes is None
    if inside:
        notes.append(f"vLLM takes {fraction:.2f} of GPU memory up front; the KV pool is what remains after "
                     "weights and activations")
    else:
        notes.append(f"SGLang's --mem-fraction-static {fraction:.2f} holds weights and the KV pool; activations "
                     f"and CUDA graphs ({activations / GIB:.2f} GiB) come on top")
    if budget is None:
        kv_b, verdict = one_seq * parallel, "unknown"
    else:
        pool = budget - weights - (activations if inside else 0)
        kv_b = max(pool, 0)
        room = inside or device_bytes is None or budget + activations <= device_bytes * 1.0005  # 3-decimal rounding
        verdict = "fits" if pool > 0 and pool >= one_seq and room else "does not fit"
        if verdict == "fits" and one_seq:
            seqs = pool // one_seq
            notes.append(f"KV pool {pool / GIB:.2f} GiB holds {seqs} sequence(s) of {context} tokens"
                         + (f" at once; with parallel {parallel} the engine queues the rest when all are long"
                            if seqs < parallel else ""))
    total = weights + kv_b + activations
    est = FitEstimate(weights, kv_b, activations, 0, total, budget if inside else device_bytes, "GPU", verdict,
                      "", 0, _source(facts), notes=notes)
    if verdict == "does not fit" and known:
        est.changes = [c for c in (
            Change("kv_cache: fp8", one_seq // 2) if not kv.startswith("fp8") else None,
            Change(f"context: {context // 2}", one_seq // 2) if context >= 8192 else None,
            Change("a quantized checkpoint (AWQ/GPTQ 4-bit: about 1/4 of bf16 weights)", weights * 3 // 4)
            if (facts.quant or "BF16").upper() in ("BF16", "F16", "FP16") else None,
        ) if c is not None]
    return est


def gib(n: float) -> float:
    return round(n / GIB, 3)


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b) if b else 0
