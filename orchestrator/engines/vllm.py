"""vLLM rules. Syntax verified against vLLM 0.32.0 (vllm/engine/arg_utils.py, make_arg_parser)."""

from __future__ import annotations

import json

from ..plan import Flag
from . import base
from .base import Ctx, Rule, api_key_env, bind_host, port, user_args

KV_DTYPES = {"f16": "auto", "bf16": "bfloat16", "fp8": "fp8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def model(ctx: Ctx) -> Flag:
    return Flag("", ctx.model_arg, "model from the profile (positional MODEL)", container_value=ctx.model_container)


def served_name(ctx: Ctx) -> Flag:
    return Flag("--served-model-name", ctx.served_name, "the name clients use in /v1/models and requests")


def max_model_len(ctx: Ctx) -> Flag:
    return Flag("--max-model-len", str(ctx.server.context), "tokens per sequence (profile context)")


def max_num_seqs(ctx: Ctx) -> Flag:
    return Flag("--max-num-seqs", str(ctx.server.parallel), "concurrent sequence(s) (profile parallel)")


def tensor_parallel(ctx: Ctx) -> Flag | None:
    if ctx.gpu_count > 1:
        return Flag("--tensor-parallel-size", str(ctx.gpu_count),
                    f"shard the model over the {ctx.gpu_count} GPUs this server uses")
    return None


def memory_fraction(ctx: Ctx) -> Flag | None:
    return base.memory_fraction(ctx, "--gpu-memory-utilization", 0.90,
                                "weights + KV pool may use 90% of each GPU's memory, leaving room for the CUDA "
                                "context and graphs")


def dtype(ctx: Ctx) -> Flag | None:
    if not ctx.on_cpu and not ctx.gpu.bf16:
        return Flag("--dtype", "float16", f"{ctx.gpu.describe()}: no bf16 (needs sm80), run weights in fp16")
    return None


def attention_backend(ctx: Ctx) -> Flag | None:
    cc = ctx.cc
    if cc is None:
        return None
    if cc < (8, 0):
        return Flag("--attention-backend", "TRITON_ATTN",
                    f"{ctx.gpu.describe()}: FLASH_ATTN and FLASHINFER need sm80+, Triton runs everywhere")
    return None


def kv_cache(ctx: Ctx) -> Flag | None:
    value = KV_DTYPES[ctx.kv_cache]
    if value == "auto":
        return None
    return Flag("--kv-cache-dtype", value, ctx.kv_reason)


def prefix_caching(ctx: Ctx) -> Flag:
    if ctx.server.prefix_cache:
        return Flag("--enable-prefix-caching", None, "prefix_cache: reuse KV blocks of shared prompt prefixes")
    return Flag("--no-enable-prefix-caching", None, "prefix_cache: false in the profile")


def speculative(ctx: Ctx) -> Flag | None:
    sp = ctx.server.speculative
    if sp.method == "none":
        return None
    method = ctx.caps["spec_methods"][sp.method]
    cfg: dict[str, object] = {"method": method, "num_speculative_tokens": sp.tokens}
    container_cfg = dict(cfg)
    if ctx.draft_arg:
        cfg["model"] = ctx.draft_arg
        container_cfg["model"] = ctx.draft_container or ctx.draft_arg
    if method == "ngram":
        cfg["prompt_lookup_max"] = container_cfg["prompt_lookup_max"] = 5
    why = {"mtp": "the checkpoint's own MTP layers draft tokens",
           "ngram": "prompt-lookup drafting from n-grams in the context",
           }.get(method, f"{method} drafter from the profile")
    return Flag("--speculative-config", json.dumps(cfg, sort_keys=True),
                f"{why}; {sp.tokens} tokens per step",
                container_value=json.dumps(container_cfg, sort_keys=True))


def trust_remote_code(ctx: Ctx) -> Flag | None:
    if ctx.server.model.trust_remote_code:
        return Flag("--trust-remote-code", None, "opted in by the profile: runs Python code shipped with the model")
    return None


RULES: list[Rule] = [
    model, served_name, bind_host, port, api_key_env, max_model_len, max_num_seqs, tensor_parallel, memory_fraction,
    dtype, attention_backend, kv_cache, prefix_caching, speculative, trust_remote_code, user_args,
]
