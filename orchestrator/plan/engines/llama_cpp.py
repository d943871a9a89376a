"""llama.cpp `llama-server` rules. Syntax verified against b11434 (`llama-server --help`).

ik_llama.cpp shares most of these (see ik_llama.py); the rules that differ say so.
"""

from __future__ import annotations

from orchestrator.plan.engines.base import Ctx, Rule, api_key_env, bind_host, port, user_args
from orchestrator.plan.model import Flag
from orchestrator.plan.versions import explain_missing, supports

QUANTIZED_KV = {"q8_0", "q4_0", "q6_0", "q8_KV"}


def model(ctx: Ctx) -> Flag:
    if ctx.facts.location.startswith("hf:"):
        return Flag("-hf", ctx.model_arg, "model from the profile (hf reference, fetched by the engine)")
    return Flag("-m", ctx.model_arg, "model file from the profile", container_value=ctx.model_container)


def alias(ctx: Ctx) -> Flag:
    return Flag("-a", ctx.served_name, "the name clients use in /v1/models and requests")


def context(ctx: Ctx) -> Flag:
    s = ctx.server
    total = s.context * s.parallel
    if s.parallel > 1:
        why = (f"{s.context} tokens per sequence × {s.parallel} slots: llama-server splits -c evenly "
               "across slots, so each slot gets the profile's context")
    else:
        why = f"{s.context} tokens per sequence, one slot"
    return Flag("-c", str(total), why)


def slots(ctx: Ctx) -> Flag:
    return Flag("-np", str(ctx.server.parallel), f"{ctx.server.parallel} concurrent sequence(s) (profile parallel)")


def threads(ctx: Ctx) -> Flag | None:
    if ctx.server.threads:
        return Flag("-t", str(ctx.server.threads), "CPU threads from the profile")
    return None


def gpu_layers(ctx: Ctx, all_value: str = "all") -> Flag | None:
    off = ctx.offload
    if off.mode == "cpu":
        return None
    if off.mode == "layers":
        return Flag("-ngl", str(off.layers), off.reason)
    if off.mode in ("moe_all", "moe_layers"):
        return Flag("-ngl", all_value, "every layer on the GPU except the MoE expert tensors placed on CPU below")
    return Flag("-ngl", all_value, off.reason)


def micro_batch(ctx: Ctx) -> Flag | None:
    """-ub: the planner's micro-batch (plan/planner.py _offload_ubatch); -b stays at its default 2048
    (common.h n_batch), which a 2048-token micro-batch does not exceed."""
    if ctx.ubatch == 512:
        return None
    return Flag("-ub", str(ctx.ubatch), "weights in system RAM are copied to the GPU once per micro-batch during "
                f"prefill: a {ctx.ubatch}-token micro-batch (default 512) spreads that copy over 4x the tokens; its larger "
                "compute buffer is counted in memory and keeps the same placement")


def split_mode(ctx: Ctx) -> Flag | None:
    """Several Pascal GPUs: -sm row (weights split by rows, every GPU works on each layer) instead of the
    default layer split, which leaves all but one GPU idle per token; reported ~3x decode on 3x P40
    (ollama #5458). b11434's -sm tensor is experimental; elsewhere the default stays."""
    if ctx.engine != "llama.cpp" or ctx.gpu_count < 2 or not ctx.cc or ctx.cc[0] != 6 \
            or ctx.offload.mode in ("moe_all", "moe_layers", "layers"):
        return None
    return Flag("-sm", "row", f"{ctx.gpu_count} × {ctx.gpu.name} ({ctx.gpu.sm}): split weights by rows so every "
                "GPU works on each token (the default layer split runs them one after another); reported "
                "~3x decode on 3x P40 (ollama #5458)")


def moe_offload(ctx: Ctx) -> Flag | None:
    off = ctx.offload
    if off.mode == "moe_all":
        return Flag("-cmoe", None, off.reason)
    if off.mode == "moe_layers":
        return Flag("-ncmoe", str(off.layers), off.reason)
    return None


def flash_attention(ctx: Ctx) -> Flag:
    quantized_v = ctx.kv_cache in QUANTIZED_KV
    need = "; required for a quantized V cache" if quantized_v else ""
    acc = ctx.gpu.accelerator
    if ctx.on_cpu:
        return Flag("-fa", "on", f"CPU backend has FlashAttention kernels{need}; it keeps the KV working set small")
    if acc == "cuda":
        # ggml-cuda/fattn.cu: tensor-core kernels where the GPU has them, else the tile kernel (the vector
        # kernel for small batches); common.cuh treats every GPU but sm_61 as fast-FP16.
        if ctx.gpu.tensor_cores:
            tc = "with tensor-core kernels"
        elif ctx.cc is not None and (ctx.cc < (6, 0) or ctx.cc == (6, 1)):
            tc = f"with the tile and vector kernels in FP32 ({ctx.gpu.sm} has no fast FP16)"
        else:
            tc = "with the FP16 tile and vector kernels (no tensor cores)"
        return Flag("-fa", "on", f"{ctx.gpu.describe()}; FlashAttention kernels are supported {tc}{need}")
    if acc in ("metal", "rocm"):
        return Flag("-fa", "on", f"{ctx.gpu.describe()}; FlashAttention is supported on this backend{need}")
    if acc == "sycl":
        return Flag("-fa", "on" if quantized_v else "auto", f"{ctx.gpu.name} through the SYCL backend; FA kernels "
                    "depend on the build and device" + (need or ", so let the engine decide"))
    value = "on" if quantized_v else "auto"
    return Flag("-fa", value, f"{ctx.gpu.describe()}; FA support depends on the driver (coopmat2/subgroup ops)"
                + (need or ", so let the engine decide"))


# Measured (docs/quality.md, Gemma 3 270M, 2-core CPU): llama.cpp b11434 processed a 32k prompt
# 2.4x (q8_0) and 4.4x (q4_0) slower than with an f16 cache; ik_llama.cpp's q4_0 cache ran at 205 tok/s.
CPU_QUANT_KV_PREFILL = {"q8_0": 2.4, "q4_0": 4.4}


def kv_types(ctx: Ctx) -> list[Flag] | None:
    if ctx.kv_cache in ("f16",):
        return None
    slower = CPU_QUANT_KV_PREFILL.get(ctx.kv_cache)
    if ctx.engine == "llama.cpp" and ctx.on_cpu and slower and ctx.server.context > 8192:
        ctx.notes.append(f"{ctx.kv_cache} KV on CPU: llama.cpp's attention dequantizes the cache for every "
                         f"token; a 32k prompt took {slower}x as long as with f16 (measured, docs/quality.md). "
                         "Keep f16 when it fits, or use ik_llama.cpp, whose CPU kernels do not pay this")
    return [Flag("-ctk", ctx.kv_cache, ctx.kv_reason), Flag("-ctv", ctx.kv_cache, ctx.kv_reason)]


def speculative(ctx: Ctx) -> list[Flag] | None:
    sp = ctx.server.speculative
    if sp.method == "none":
        return None
    spec_type = ctx.caps["spec_methods"][sp.method]
    n = str(sp.tokens)
    out: list[Flag] = []
    typed = ctx.version is None or supports(ctx.caps, ctx.version, "--spec-type", spec_type) is not False
    if not typed and sp.method != "draft":
        assert ctx.version is not None
        ctx.error(("speculative", "method"), explain_missing(ctx.caps, ctx.version, "--spec-type", spec_type),
                  f"install a newer build (orchestrate engines install {ctx.engine}) or use method draft or ngram")
        return None
    if ctx.draft_arg:
        why = f"{sp.method} draft model from the profile"
        if not typed:
            why += f"; this build ({ctx.version.version if ctx.version else ''}) drafts with it without --spec-type"
        out.append(Flag("-md", ctx.draft_arg, why, container_value=ctx.draft_container))
        if ctx.offload.mode != "cpu":
            out.append(Flag("-ngld", "all", "keep the draft model on the GPU: it runs every step"))
    why = {
        "draft": "a small draft model proposes tokens the main model verifies in one batch",
        "eagle3": "EAGLE-3 head predicts tokens from the target's hidden states",
        "mtp": "the model's own multi-token-prediction (NextN) layers draft tokens",
        "ngram": "drafts from n-grams already in the context (no extra model); pays off on repetitive text",
    }[sp.method]
    if typed:
        out.append(Flag("--spec-type", spec_type, why))
    if sp.method != "ngram":
        out.append(Flag("--spec-draft-n-max", n, f"up to {n} draft tokens per step (profile speculative.tokens)"))
    return out


def fit_off(ctx: Ctx) -> Flag | None:
    """--fit (on by default in every build from b9093) re-decides -ngl, -c and tensor placement when
    they are left at their defaults. The plan sets them from its own estimate, so pin it off: the same
    profile then places the same layers on builds with and without --fit, and with future defaults."""
    if ctx.on_cpu or (ctx.version is not None and supports(ctx.caps, ctx.version, "--fit") is False):
        return None
    return Flag("--fit", "off", "the plan places layers and experts from its own memory estimate (see memory); "
                "--fit defaults to on in newer builds, so it is pinned off to keep that placement on every build")


def prompt_cache(ctx: Ctx) -> list[Flag] | None:
    if not ctx.server.prefix_cache:
        return [Flag("--no-cache-prompt", None, "prefix_cache: false in the profile")]
    out = []
    if ctx.swa_full:
        out.append(Flag("--swa-full", None, ctx.swa_full))
    if ctx.facts.metadata.get("attention.sliding_window") and not ctx.swa_full:
        ctx.notes.append("prefix cache: a sliding-window model without --swa-full (it would not fit) reuses "
                         "cached prompts only from context checkpoints; --cache-reuse is not supported there")
        return out or None
    if fit_recurrent(ctx):
        ctx.notes.append("prefix cache: this hybrid model's recurrent state cannot be shifted, so cached prompts "
                         "are reused from context checkpoints and --cache-reuse is left out (llama-server "
                         "disables it for such models)")
        return out or None
    out.append(Flag("--cache-reuse", "256", "prefix_cache: reuse cached KV chunks of ≥256 tokens across "
                    "requests by shifting (prompt caching itself is on by default)"))
    return out


def fit_recurrent(ctx: Ctx) -> bool:
    from orchestrator.plan.fit import recurrent_layers

    return recurrent_layers(ctx.facts) > 0


def metrics(ctx: Ctx) -> Flag:
    return Flag("--metrics", None, "expose Prometheus /metrics for status and bench (returns 501 otherwise)")


RULES: list[Rule] = [
    model, alias, bind_host, port, api_key_env, context, slots, threads, gpu_layers, split_mode, moe_offload,
    micro_batch, fit_off,
    flash_attention, kv_types, speculative, prompt_cache, metrics, user_args,
]
