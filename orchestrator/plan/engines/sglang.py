"""SGLang rules. Syntax verified against SGLang 0.5.23 (python/sglang/srt/server_args.py)."""

from __future__ import annotations

from orchestrator.plan.engines import base
from orchestrator.plan.engines.base import Ctx, Rule, api_key_file, bind_host, port, user_args
from orchestrator.plan.model import EnvVar, Flag

KV_DTYPES = {"f16": "auto", "bf16": "bf16", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def model(ctx: Ctx) -> Flag:
    return Flag("--model-path", ctx.model_arg, "model from the profile", container_value=ctx.model_container)


def served_name(ctx: Ctx) -> Flag:
    return Flag("--served-model-name", ctx.served_name, "the name clients use in /v1/models and requests")


def context_length(ctx: Ctx) -> Flag:
    return Flag("--context-length", str(ctx.server.context), "tokens per sequence (profile context)")


def max_running(ctx: Ctx) -> Flag:
    return Flag("--max-running-requests", str(ctx.server.parallel), "concurrent sequence(s) (profile parallel)")


SGLANG_DIST_PORT = 20000   # rendezvous port on the leader (SGLang's multi-node examples)


def tensor_parallel(ctx: Ctx) -> list[Flag]:
    total = ctx.total_gpus
    if ctx.nodes == 1:
        return [Flag("--tp-size", str(total), f"shard the model over the {total} GPUs this server uses")] \
            if total > 1 else []
    n = str(ctx.nodes)
    return [Flag("--tp-size", str(total), f"shard the model over all {total} GPUs: {ctx.gpu_count} on each of "
                                          f"{n} nodes"),
            Flag("--nnodes", n, f"the {n} nodes of the LeaderWorkerSet group run one SGLang instance"),
            Flag("--node-rank", base.LWS_WORKER_INDEX, base.NODE_RANK_WHY),
            Flag("--dist-init-addr", f"{base.LWS_LEADER_ADDRESS}:{SGLANG_DIST_PORT}",
                 "torch.distributed rendezvous at the leader pod")]


def memory_fraction(ctx: Ctx) -> Flag | None:
    """SGLang 0.5.23 computes its default from the GPU's memory at start (srt/arg_groups/memory_hook.py):
    the plan leaves it to SGLang unless the GPU is shared or the model needs more, and counts what SGLang
    keeps outside the fraction (activations, CUDA graphs) on top of it."""
    if ctx.on_cpu:
        return None
    from orchestrator.plan import fit
    from orchestrator.plan.model import GIB

    gpu_bytes = int(ctx.gpu.vram_gb * GIB)
    tp = max(ctx.total_gpus, 1)
    default = fit.sglang_default_fraction(gpu_bytes, tp, ctx.server.parallel)
    ctx.mem_reserve = fit.sglang_reserved_bytes(gpu_bytes, tp, ctx.server.parallel) * tp
    why = (f"≈{default:.2f}, which SGLang {ctx.caps['verified_version']} computes from {ctx.gpu.vram_gb:g} GB "
           "at start")
    return base.memory_fraction(ctx, "--mem-fraction-static", default, why, inside=False)


def kv_cache(ctx: Ctx) -> Flag | None:
    value = KV_DTYPES[ctx.kv_cache]
    if value == "auto":
        return None
    return Flag("--kv-cache-dtype", value, ctx.kv_reason)


def radix_cache(ctx: Ctx) -> Flag | None:
    if ctx.server.prefix_cache:
        return None
    return Flag("--disable-radix-cache", None, "prefix_cache: false in the profile (radix cache is on by default)")


def speculative(ctx: Ctx) -> list[Flag] | None:
    sp = ctx.server.speculative
    if sp.method == "none":
        return None
    algo = ctx.caps["spec_methods"][sp.method]
    out = [Flag("--speculative-algorithm", algo, f"speculative method {sp.method} → SGLang {algo}")]
    if ctx.draft_arg and algo != "NGRAM":   # n-gram drafting has no model (the planner warns)
        out.append(Flag("--speculative-draft-model-path", ctx.draft_arg, "draft / EAGLE head from the profile",
                        container_value=ctx.draft_container))
    if algo == "NGRAM":
        ctx.notes.append("SGLang's n-gram drafting ignores speculative.tokens: it verifies up to 12 draft tokens "
                         "per step in a BFS tree (its --speculative-num-draft-tokens default)")
    else:
        out += [
            Flag("--speculative-num-steps", str(sp.tokens), f"{sp.tokens} drafting steps (profile speculative.tokens)"),
            Flag("--speculative-eagle-topk", "1", "chain drafting (topk 1) works with every attention backend"),
            Flag("--speculative-num-draft-tokens", str(sp.tokens + 1), "steps + 1 tokens verified per round"),
        ]
    return out


def tool_calls(ctx: Ctx) -> list[Flag] | None:
    """OpenAI-style tool use and thinking models: SGLang parses tool calls and reasoning only with
    --tool-call-parser / --reasoning-parser (server_args.py; both default to none)."""
    tp = ctx.tools
    if tp is None:
        return None
    out: list[Flag] = []
    if tp.tool:
        out.append(Flag("--tool-call-parser", tp.tool, f"turns the model's tool-call output into tool_calls: {tp.reason}"))
    if tp.reasoning:
        out.append(Flag("--reasoning-parser", tp.reasoning,
                        f"moves the model's thinking out of content into reasoning_content: {tp.reason}"))
    return out or None


def cpu_threads(ctx: Ctx) -> EnvVar | None:
    """SGLang's CPU backend binds its OpenMP threads from SGLANG_CPU_OMP_THREADS_BIND (srt/utils/
    numa_utils.py init_threads_binding; default "all": one rank per NUMA node)."""
    threads = ctx.server.threads
    if not ctx.on_cpu or threads is None:
        return None
    cores = "0" if threads == 1 else f"0-{threads - 1}"
    return EnvVar("SGLANG_CPU_OMP_THREADS_BIND", cores,
                  f"threads: {threads}: SGLang's CPU worker runs {threads} OpenMP thread(s) bound to cores {cores}")


def metrics(ctx: Ctx) -> Flag:
    return Flag("--enable-metrics", None, "expose Prometheus /metrics for status and bench")


def trust_remote_code(ctx: Ctx) -> Flag | None:
    if ctx.server.model.trust_remote_code:
        return Flag("--trust-remote-code", None, "opted in by the profile: runs Python code shipped with the model")
    return None


RULES: list[Rule] = [
    model, served_name, bind_host, port, api_key_file, context_length, max_running, tensor_parallel, memory_fraction,
    kv_cache, radix_cache, speculative, tool_calls, cpu_threads, metrics, trust_remote_code, user_args,
]
