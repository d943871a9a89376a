"""ik_llama.cpp `llama-server` rules. Syntax verified against ik 55d3c05bf (2026-04-13).

Differences from mainline that matter here: `-ngl` takes a number (no `all`),
speculative decoding uses `-mtp` / `-md` with `--draft-max` (upstream moved to
`--spec-type TYPE:k=v` in 2026-06), there is no `--cache-reuse`, fused MoE is on by
default and `-fmoe` is rejected, the API key comes only from `--api-key-file`.
"""

from __future__ import annotations

from orchestrator.facts.types import ModelFacts
from orchestrator.plan.engines import llama_cpp as mainline
from orchestrator.plan.engines.base import Ctx, Rule, api_key_file, bind_host, port, user_args
from orchestrator.plan.model import Flag


def model(ctx: Ctx) -> Flag:
    return Flag("-m", ctx.model_arg, "model file from the profile", container_value=ctx.model_container)


def alias(ctx: Ctx) -> Flag:
    return Flag("-a", ctx.served_name, "the name clients use in /v1/models and requests (ik takes one alias)")


def flash_attention_breaks(on_cpu: bool, parallel: int, model: ModelFacts) -> bool:
    """ik 55d3c05bf's CPU FlashAttention with several slots on a sliding-window model (seen with
    Gemma 3 270M, -np 2): GGML_ASSERT(S > 0) in iqk_fa_templates.h on a chat request, and
    non-deterministic output before that. The planner asks this too (the fit counts FA's buffers)."""
    return on_cpu and parallel > 1 and bool(model.metadata.get("attention.sliding_window"))


def swa_multi_slot(ctx: Ctx) -> bool:
    return flash_attention_breaks(ctx.on_cpu, ctx.server.parallel, ctx.facts)


def flash_attention(ctx: Ctx) -> Flag:
    if swa_multi_slot(ctx):
        if ctx.kv_cache in mainline.QUANTIZED_KV:
            ctx.error(("kv_cache",), f"ik_llama.cpp {ctx.caps['verified_version']} crashes with FlashAttention on CPU "
                      f"when a sliding-window model ({ctx.facts.arch}) runs {ctx.server.parallel} slots, and a "
                      f"{ctx.kv_cache} V cache needs FlashAttention",
                      "use parallel: 1, kv_cache: f16, or engine: llama.cpp")
        return Flag("-fa", "off", f"this ik build's CPU FlashAttention aborts (GGML_ASSERT S > 0) with "
                    f"{ctx.server.parallel} slots on a sliding-window model ({ctx.facts.arch}); f16 KV runs without it")
    return mainline.flash_attention(ctx)


def gpu_layers(ctx: Ctx) -> Flag | None:
    return mainline.gpu_layers(ctx, all_value="999")


def staged_syntax(ctx: Ctx) -> bool:
    """ik from 2026-06 (007d64009, PR #1908) takes repeated --spec-type TYPE:key=value stages and refuses
    -mtp, --draft-max and --spec-ngram-size-* (common/common.cpp @ 8337e4c)."""
    from orchestrator.plan.versions import supports

    return ctx.version is not None and supports(ctx.caps, ctx.version, "-mtp") is False


def speculative_stages(ctx: Ctx) -> list[Flag]:
    """--spec-type mtp:n_max=N / draft:n_max=N (with -md) / ngram-simple:ngram_size_m=N."""
    sp = ctx.server.speculative
    n = str(sp.tokens)
    why = f"this ik build's staged syntax (--spec-type TYPE:key=value, from 2026-06); up to {n} draft tokens"
    if sp.method == "ngram":
        return [Flag("--spec-type", f"{ctx.caps['spec_methods']['ngram']}:ngram_size_m={n}",
                     f"drafts from n-grams already in the context (no extra model); {why}")]
    out: list[Flag] = []
    if sp.method == "draft":
        out.append(Flag("-md", ctx.draft_arg, "draft model from the profile", container_value=ctx.draft_container))
        if ctx.offload.mode != "cpu":
            out.append(Flag("-ngld", "999", "keep the draft model on the GPU: it runs every step"))
    what = "the model's own multi-token-prediction (NextN) layers draft tokens" if sp.method == "mtp" else \
        "a small draft model proposes tokens the main model verifies"
    out.append(Flag("--spec-type", f"{sp.method}:n_max={n}", f"{what}; {why}"))
    return out


def speculative(ctx: Ctx) -> list[Flag] | None:
    sp = ctx.server.speculative
    if sp.method == "none":
        return None
    if staged_syntax(ctx):
        return speculative_stages(ctx)
    n = str(sp.tokens)
    out: list[Flag] = []
    if sp.method == "ngram":   # common/common.cpp --spec-type: drafting from the context, no draft model
        return [Flag("--spec-type", ctx.caps["spec_methods"]["ngram"],
                     "drafts from n-grams already in the context (no extra model); pays off on repetitive text"),
                Flag("--spec-ngram-size-m", n, f"draft m-grams of {n} tokens (profile speculative.tokens)")]
    if sp.method == "mtp":
        out.append(Flag("-mtp", None, "the model's own multi-token-prediction (NextN) layers draft tokens "
                        "(this ik build's syntax; newer ik uses --spec-type mtp:n_max=N)"))
    else:
        out.append(Flag("-md", ctx.draft_arg, "draft model from the profile", container_value=ctx.draft_container))
        if ctx.offload.mode != "cpu":
            out.append(Flag("-ngld", "999", "keep the draft model on the GPU: it runs every step"))
    out.append(Flag("--draft-max", n, f"up to {n} draft tokens per step (profile speculative.tokens)"))
    return out


def prompt_cache(ctx: Ctx) -> Flag | None:
    if not ctx.server.prefix_cache:
        return Flag("-cram", "0", "prefix_cache: false in the profile: no host-memory prompt cache")
    if ctx.facts.metadata.get("attention.sliding_window"):
        ctx.notes.append("prefix cache: on sliding-window models this ik_llama.cpp build re-processes a prompt that "
                         "diverges from a cached one inside it (\"forcing full prompt re-processing\"; measured by "
                         "orchestrate bench, --ctx-checkpoints did not help) and has no --swa-full; llama.cpp with "
                         "--swa-full reuses such prefixes")
    return None


def mla(ctx: Ctx) -> list[Flag] | None:
    if ctx.facts.arch in ("deepseek2", "deepseek32", "deepseek4", "glm-dsa") and not ctx.on_cpu:
        return [Flag("-mla", "3", "MLA model: mode 3 keeps the compressed latent KV cache (smallest KV) "
                     "with fast prefill"),
                Flag("-amb", "512", "cap the attention scratch buffer at 512 MiB for long contexts")]
    return None


def jinja(ctx: Ctx) -> Flag | None:
    """Tool calls and reasoning output come from the model's Jinja chat template (common/chat.cpp); this
    build renders prompts with its built-in templates unless --jinja (common.h: use_jinja = false)."""
    if ctx.server.tools == "off":
        return None
    return Flag("--jinja", None, "tools: auto: OpenAI-style tool calls and reasoning_content need the model's "
                "Jinja chat template, which this ik_llama.cpp build uses only with --jinja")


RULES: list[Rule] = [
    model, alias, bind_host, port, api_key_file, mainline.context, mainline.slots, mainline.threads, gpu_layers,
    mainline.moe_offload, mainline.micro_batch, flash_attention, mainline.kv_types, mla,
    speculative, prompt_cache, jinja, mainline.metrics, user_args,
]
