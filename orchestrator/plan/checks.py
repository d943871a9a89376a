"""Impossible combinations, found before any flag is written: each a Problem with the field, what
is wrong and how to fix it. Engine quirks that only one engine has stay with its rules."""

from __future__ import annotations

import difflib
from typing import Any, NamedTuple

from orchestrator import catalog
from orchestrator.catalog import GGUF_ENGINES, Gpu
from orchestrator.errors import Problem, shown
from orchestrator.facts.types import EngineVersion
from orchestrator.plan import versions
from orchestrator.plan.engines.base import Ctx
from orchestrator.plan.model import K8S_NAME_MAX, Flag, container_name, is_loopback
from orchestrator.profile import Profile, Server

# vLLM / SGLang refuse a context beyond the model's max_position_embeddings unless this env var is 1.
LONG_CONTEXT_ENV = {"vllm": "VLLM_ALLOW_LONG_MAX_MODEL_LEN", "sglang": "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"}


def check_profile(profile: Profile, gpu: Gpu, gpu_count: int) -> list[Problem]:
    problems: list[Problem] = []
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, int] = {}
    for i, s in enumerate(profile.servers):
        if s.name in seen_names:
            problems.append(Problem(("servers", i, "name"), f"server name {s.name!r} is already used by servers[{seen_names[s.name]}]",
                                    "give every server its own name"))
        seen_names.setdefault(s.name, i)
        if s.port in seen_ports:
            problems.append(Problem(("servers", i, "port"), f"port {s.port} is already used by servers[{seen_ports[s.port]}]",
                                    "give every server its own port"))
        seen_ports.setdefault(s.port, i)
        joined = container_name(profile.name, s.name)
        if len(joined) > K8S_NAME_MAX:
            problems.append(Problem(("servers", i, "name"), f"the container and Kubernetes name {joined!r} has "
                                    f"{len(joined)} characters; DNS labels allow {K8S_NAME_MAX}",
                                    "shorten the deployment name or this server's name"))
        if not is_loopback(s.host) and not s.api_key_env:
            problems.append(Problem(("servers", i, "host"), f"host {s.host} exposes the server beyond this machine without an API key",
                                    "set api_key_env: NAME_OF_VAR (holding the key), or use host: 127.0.0.1"))
        if isinstance(s.gpus, list):
            if gpu.is_cpu:
                problems.append(Problem(("servers", i, "gpus"), "GPU indices given but hardware.gpu is cpu",
                                        "remove gpus: or set hardware.gpu to your GPU"))
            elif max(s.gpus) >= gpu_count:
                problems.append(Problem(("servers", i, "gpus"), f"GPU index {max(s.gpus)} but hardware.count is {gpu_count}",
                                        f"use indices 0..{gpu_count - 1} or raise hardware.count"))
        w = s.workload
        if w is not None and w.depth + w.prompt_tokens + w.gen_tokens > s.context:
            need = w.depth + w.prompt_tokens + w.gen_tokens
            depth = f"{w.depth} tokens of depth + " if w.depth else ""
            problems.append(Problem(("servers", i, "workload", "depth" if w.depth else "prompt_tokens"),
                                    f"a workload request of {depth}{w.prompt_tokens} prompt + {w.gen_tokens} "
                                    f"generated tokens does not fit this server's context of {s.context} tokens per "
                                    f"sequence", f"raise context to at least {need}, or shorten the workload"))
        if w is not None and w.concurrency is not None and w.concurrency > s.parallel:
            problems.append(Problem(("servers", i, "workload", "concurrency"), f"workload concurrency "
                                    f"{w.concurrency} is more than parallel {s.parallel}: requests past {s.parallel} "
                                    "would queue and every candidate would measure the queue",
                                    f"raise parallel to {w.concurrency}, or lower the workload's concurrency"))
    names = {s.name for s in profile.servers}
    for i, s in enumerate(profile.servers):
        for d in s.depends_on:
            if d not in names or d == s.name:
                problems.append(Problem(("servers", i, "depends_on"), f"depends_on names {shown(d)}, "
                                        + ("the server itself" if d == s.name else "which is not a server of this profile"),
                                        f"use one of: {', '.join(sorted(names - {s.name})) or '(no other server)'}"))
    if _has_cycle({s.name: [d for d in s.depends_on if d in names] for s in profile.servers}):
        problems.append(Problem(("servers",), "depends_on forms a cycle", "remove one depends_on entry of the loop"))
    return problems


def check_target(profile: Profile, target: str) -> list[Problem]:
    """The exposure rule on what a render target makes reachable: the k8s target binds every server
    on the pod's network and gives it a Service, so any pod of the cluster can reach it."""
    if target != "k8s":
        return []
    gateway = [] if profile.gateway is None or profile.gateway.api_key_env else [
        Problem(("gateway",), "--target k8s makes the gateway reachable from every pod of the cluster (a Service; "
                "the container binds 0.0.0.0) and it has no API key",
                "set gateway.api_key_env: NAME (the manifests take the key from the Secret "
                "DEPLOYMENT--gateway-api-key), or render another target")]
    return gateway + [Problem(("servers", i, "api_key_env"),
                    "--target k8s makes this server reachable from every pod of the cluster (a Service; the "
                    "container binds 0.0.0.0) and it has no API key",
                    "set api_key_env: NAME (the manifests take the key from the Secret DEPLOYMENT--SERVER-api-key), "
                    "or render another target to keep it on this machine")
            for i, s in enumerate(profile.servers) if not s.api_key_env]


def _has_cycle(graph: dict[str, list[str]]) -> bool:
    state: dict[str, int] = {}

    def visit(n: str) -> bool:
        if state.get(n) == 1:
            return True
        if state.get(n) == 2:
            return False
        state[n] = 1
        if any(visit(d) for d in graph.get(n, [])):
            return True
        state[n] = 2
        return False

    return any(visit(n) for n in graph)


def check_nodes(ctx: Ctx) -> None:
    n = ctx.server.nodes
    if n == 1:
        return
    if ctx.engine not in ("vllm", "sglang"):
        ctx.error(("nodes",), f"{ctx.caps['display']} serves from one machine; nodes: {n} needs vLLM or SGLang",
                  "set engine: vllm or engine: sglang with an HF-format model, or remove nodes:")
    elif ctx.gpu.is_cpu:
        ctx.error(("nodes",), f"nodes: {n} spans GPU machines; hardware.gpu is cpu",
                  "set hardware.gpu to the GPU of each node, or remove nodes:")


def check_server(ctx: Ctx) -> None:
    """Every check of one server, in the order the user reads them."""
    for check in (check_owned, check_hardware, check_nodes, check_model, check_kv, check_speculative, check_tools,
                  check_warnings):
        check(ctx)


def owned_option(caps: dict[str, Any], arg: str) -> tuple[str, str] | None:
    """(the option, the profile field that sets it) when `arg` names an option the plan owns: exactly,
    as --name=value, and for argparse engines also as a unique prefix (--ho) or with underscores."""
    owned: dict[str, str] = caps.get("owned_options") or {}
    if not arg.startswith("-"):
        return None
    name = arg.split("=", 1)[0]
    if name in owned:
        return name, owned[name]
    if caps.get("option_parser") == "argparse" and name.startswith("--") and len(name) >= 4:
        name = "--" + name[2:].replace("_", "-")
        for option, field in owned.items():
            if option.startswith(name):
                return option, field
    return None


def _owned_hint(option: str, field: str) -> str:
    if field == "api_key_env":
        return ("put the key in an environment variable and name it in api_key_env: the plan passes it by "
                "environment or a 0600 file, never in argv (where ps and logs show it)")
    return (f"remove {option} from extra_args and set {field}: in the profile (the plan, status, health checks "
            "and the exposure rule read it there)")


def check_owned(ctx: Ctx) -> None:
    """extra_args and env may not set what the plan sets from profile fields: where the server listens
    and how it takes its key."""
    caps = ctx.caps
    for j, arg in enumerate(ctx.server.extra_args):
        found = owned_option(caps, arg)
        if found:
            option, field = found
            ctx.error(("extra_args", j), f"{option} is set by the plan from {field}", _owned_hint(option, field))
    owned_env: dict[str, str] = caps.get("owned_env") or {}
    for name in ctx.server.env:
        if name in owned_env:
            ctx.error(("env", name), f"{name} is set by the plan from {owned_env[name]}",
                      _owned_hint(name, owned_env[name]))


def check_tools(ctx: Ctx) -> None:
    """A `tools: NAME` the engine cannot take (plan/decisions.py)."""
    from orchestrator.plan.decisions import check_tools as tools_problem

    version = ctx.version.version if ctx.version else str(ctx.caps["verified_version"])
    found = tools_problem(ctx.server, ctx.engine, version, ctx.caps)
    if found:
        ctx.error(("tools",), *found)


def check_hardware(ctx: Ctx) -> None:
    """The engine runs on this accelerator and GPU generation."""
    caps, gpu, engine = ctx.caps, ctx.gpu, ctx.engine
    disp = caps["display"]
    acc = gpu.accelerator
    if acc not in caps["accelerators"]:
        ctx.error(("engine",), f"{disp} does not run on {gpu.name} ({acc})",
                  "pick llama.cpp, which runs on CUDA, ROCm, Vulkan, Metal, SYCL and CPU")
    gfx = caps.get("rocm_gfx")
    if gfx and gpu.vendor == "amd" and gpu.gfx_target not in gfx:
        ctx.error(("engine",), f"{disp} {caps['verified_version']} runs on AMD Instinct CDNA3 and newer only "
                  f"({', '.join(gfx)} in its kernels); {gpu.describe()}",
                  "use engine: vllm (its ROCm build covers MI250 and Radeon RX 7000/9000) or llama.cpp with a "
                  "GGUF model")
    if gpu.cc and engine in ("vllm", "sglang", "ik_llama"):
        minimum = catalog.parse_cc(caps["min_compute_capability"])
        legacy = caps.get("legacy_compute_capability")
        if gpu.cc < minimum:
            if legacy and gpu.cc >= catalog.parse_cc(legacy):
                ctx.warnings.append(
                    f"{gpu.describe()}: official {disp} wheels and images since CUDA 12.8 are not built for sm70; "
                    f"use a {disp} build compiled with CUDA 12.6 or older and TORCH_CUDA_ARCH_LIST including 7.0 "
                    "(a source build or a community sm70 build). The plan uses fp16, Triton attention and no fp8.")
            elif engine == "ik_llama":
                ctx.warnings.append(f"{gpu.describe()}: ik_llama.cpp supports only Turing+ CUDA fully; llama.cpp is "
                                    "the safer choice here")
            else:
                ctx.error(("engine",), f"{disp} needs compute capability ≥ {caps['min_compute_capability']}; "
                          f"{gpu.describe()}", "use llama.cpp (engine: llama.cpp) with a GGUF model on this GPU")


def check_model(ctx: Ctx) -> None:
    """The engine reads this model's format and serves the asked context."""
    s, caps, engine = ctx.server, ctx.caps, ctx.engine
    disp = caps["display"]
    fmt = ctx.facts.format
    field = "path" if s.model.path else "hf"
    if ctx.facts.defect:
        ctx.error(("model", field), f"{ctx.facts.location} {_defect(ctx.facts.defect)}",
                  "give a complete model: a .gguf file (all of it: download it again) or an HF folder with "
                  "config.json and its safetensors")
        return
    if ctx.draft is not None and ctx.draft.defect:
        ctx.error(("speculative", "draft_model"), f"{ctx.draft.location} {_defect(ctx.draft.defect)}",
                  "give a complete draft model (download it again)")
    if fmt not in caps["formats"]:
        want = "a .gguf file" if fmt == "hf" else "an HF-format directory (config.json + safetensors)"
        ctx.error(("model", "path" if s.model.path else "hf"), f"{disp} cannot load a {fmt.upper()} model",
                  f"give {want}, or choose an engine that reads {fmt.upper()}")
    trained = ctx.facts.trained_context
    if engine in LONG_CONTEXT_ENV and trained and s.context > trained:
        allow = LONG_CONTEXT_ENV[engine]
        if s.env.get(allow) == "1":
            ctx.warnings.append(f"context {s.context} is beyond the model's trained {trained} tokens ({allow}=1): "
                                "output past that depends on the model's RoPE scaling")
        else:
            ctx.error(("context",), f"context {s.context} is longer than the model's trained context ({trained} "
                      f"tokens, config.json); {disp} refuses to start with it",
                      f"use context: {trained} or less, or set env: {{{allow}: '1'}} if the model's RoPE scaling "
                      "covers more")


def _defect(what: str) -> str:
    return what if what.startswith("is ") else f"is not a usable model file: {what}"


def check_kv(ctx: Ctx) -> None:
    s, caps, gpu, engine = ctx.server, ctx.caps, ctx.gpu, ctx.engine
    disp = caps["display"]
    kv = ctx.kv_cache
    if kv not in ("f16",) and kv not in caps["kv_types"]:
        alt = "q8_0 (half of f16)" if engine in GGUF_ENGINES else "fp8 (half of bf16) or auto"
        ctx.error(("kv_cache",), f"{disp} has no {s.kv_cache} KV cache", f"use {alt}")
    if engine in ("vllm", "sglang") and kv.startswith("fp8") and not gpu.is_cpu:
        # vLLM 0.32: FlashInfer stores fp8/fp8_e4m3/fp8_e5m2 KV on sm80-sm121 (v1/attention/backends/
        # flashinfer.py supported_kv_cache_dtypes, supports_compute_capability) and the selector skips the
        # backends that cannot; Triton needs sm89 for it. SGLang's rule is kept at sm89 (not verified lower).
        floor = (8, 0) if engine == "vllm" else (8, 9)
        if not gpu.fp8 and not (gpu.cc and gpu.cc >= floor) and gpu.vendor == "nvidia":
            need = "sm80+ (FlashInfer)" if engine == "vllm" else "sm89+ with fp8 support"
            ctx.error(("kv_cache",), f"{disp}'s fp8 KV cache needs an {need} GPU; {gpu.describe()}",
                      "use kv_cache: auto on this GPU")
        elif not gpu.fp8 and gpu.vendor != "nvidia":
            ctx.error(("kv_cache",), f"fp8 KV cache needs a GPU with fp8 support; {gpu.describe()}",
                      "use kv_cache: auto on this GPU")
    if engine in ("vllm", "sglang") and kv == "bf16" and not gpu.is_cpu and not gpu.bf16:
        # vLLM 0.32 v1/attention/backends/triton_attn.py: "bfloat16 KV cache is not supported ... requires SM80+"
        ctx.error(("kv_cache",), f"a bf16 KV cache needs bf16 arithmetic (sm80+); {gpu.describe()}, where "
                  f"{disp} runs fp16 weights and attention",
                  "use kv_cache: auto (fp16 here) or f16")


def check_speculative(ctx: Ctx) -> None:
    s, caps, engine = ctx.server, ctx.caps, ctx.engine
    method = s.speculative.method
    if method == "none":
        return
    if method not in (caps.get("spec_methods") or {}):
        hint = {"eagle": "use eagle3 with an EAGLE-3 head, or mtp/draft",
                "eagle3": "ik_llama's eagle3 is a stub: use llama.cpp, vLLM or SGLang for EAGLE-3"}.get(
                    method, "pick another method")
        ctx.error(("speculative", "method"),
                  f"{caps['display']} {caps['verified_version']} does not support speculative method {method!r}", hint)
    if method in ("draft", "eagle", "eagle3") and not s.speculative.draft_model:
        what = "an EAGLE head" if method.startswith("eagle") else "a draft model"
        ctx.error(("speculative", "draft_model"), f"speculative method {method} needs {what}",
                  "set speculative.draft_model to its path or hf reference")
    if method == "ngram" and s.speculative.draft_model:
        ctx.warnings.append("speculative.draft_model is ignored by ngram drafting")
    if method == "mtp" and ctx.facts.has_mtp is False:
        ctx.error(("speculative", "method"), f"{ctx.facts.name} has no MTP (nextn) layers",
                  "use method draft with a small draft model, or ngram")
    if method == "mtp" and ctx.facts.has_mtp is None and not ctx.facts.exists:
        ctx.notes.append("MTP needs the model's NextN layers; the model file is not here to check")
    if ctx.offload.mode in ("moe_all", "moe_layers", "layers"):
        ctx.warnings.append("speculative decoding while weights sit on the CPU: every drafted token also runs "
                            "the verify pass through CPU-resident experts, so the gain shrinks or turns into a "
                            "loss; measure with and without (orchestrate bench)")
    if engine == "ik_llama" and s.parallel > 1:
        ctx.warnings.append(f"ik_llama.cpp speculative decoding is single-stream: with parallel {s.parallel} "
                            "newer ik builds refuse to start and this one may drop the draft stage; use parallel: 1")


def check_warnings(ctx: Ctx) -> None:
    """Settings that run, but not as the user may think."""
    s, engine = ctx.server, ctx.engine
    if s.model.trust_remote_code:
        if engine in GGUF_ENGINES:
            ctx.warnings.append("trust_remote_code has no effect on GGUF engines")
        else:
            ctx.warnings.append("trust_remote_code: the model's own Python code will run inside the server")
    if s.kv_cache == "q4_0":
        ctx.warnings.append("q4_0 KV cache: measurable quality loss at long context; prefer q8_0 unless memory-bound "
                            "(measure it: orchestrate eval --baseline-kv f16)")
    if not ctx.facts.exists and ctx.facts.location and not s.model.hf:
        ctx.warnings.append(f"model file {ctx.facts.location} is not on this machine (fine for plan/render; "
                            "`up` needs it)")
    if ctx.gpu.vendor == "apple":
        ctx.notes.append(f"Apple GPU memory: planned against {ctx.gpu.working_set_gb:g} GB, macOS's default Metal "
                         f"working set of the {ctx.gpu.vram_gb:g} GB configuration (recommendedMaxWorkingSetSize, "
                         "which llama.cpp's Metal backend reports as the GPU's memory); with a raised limit (sudo "
                         "sysctl iogpu.wired_limit_mb=N) the plan leaves the difference unused")
    if s.runtime == "process" and s.image:
        ctx.warnings.append("image is used only by the docker runtime and the docker/compose/k8s renderers")


class Option(NamedTuple):
    """One option the server will be started with. arg is its index in the profile's extra_args
    (the user wrote it), None when a rule of the planner emits it."""

    name: str
    value: str | None
    arg: int | None = None


def options(flags: list[Flag], extra_args: list[str]) -> list[Option]:
    """Every option the server will be started with: the rules' flags and the profile's extra_args
    (a typo there fails the same way at start-up)."""
    out = [Option(f.name, f.value) for f in flags if f.name.startswith("-")]
    for i, arg in enumerate(extra_args):
        if arg.startswith("-") and not arg.lstrip("-").replace(".", "").isdigit():
            nxt = extra_args[i + 1] if i + 1 < len(extra_args) and not extra_args[i + 1].startswith("-") else None
            out.append(Option(arg, nxt, i))
    return out


def unknown_option(server: Server, index: int, engine: str, target: EngineVersion, option: Option) -> Problem:
    """The problem for an option the targeted build does not take. One the user wrote is theirs to
    correct, at its own extra_args entry; one a rule emits needs another build (or another setting)."""
    caps = catalog.engine(engine)
    if option.arg is not None:
        return unknown_user_option(index, caps, target, option)
    return Problem(("servers", index, "engine_version" if server.engine_version else "engine"),
                   versions.explain_missing(caps, target, option.name, option.value),
                   f"install {caps['display']} {caps['verified_version']} (orchestrate engines install {engine}), "
                   "pin engine_version, or drop the setting that needs it")


def closest_options(name: str, known: frozenset[str] | None) -> list[str]:
    """The options of the build's --help nearest to a mistyped one (difflib), best first: up to
    three, and only those about as close as the best (--ctx-szie: --ctx-size, not --batch-size)."""
    if not known:
        return []
    near = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.6)
    if not near:
        return []
    best = difflib.SequenceMatcher(None, name, near[0]).ratio()
    return [c for c in near if difflib.SequenceMatcher(None, name, c).ratio() >= best - 0.1][:3]


def unknown_user_option(index: int, caps: dict[str, Any], target: EngineVersion, option: Option) -> Problem:
    """An extra_args option the targeted build does not take: the closest options it does know, or
    the version that added (or removed) it when the catalog's flag_history knows the option."""
    assert option.arg is not None
    path = ("servers", index, "extra_args", option.arg)
    entry = versions.history(caps, option.name, option.value)
    hint = "correct or remove it"
    if entry is None:
        message = f"{caps['display']} {target.version} does not take {option.name} (not in its --help)"
        near = closest_options(option.name, target.flags)
        if near:
            hint = f"did you mean {' or '.join(near)}? {hint}"
        return Problem(path, message, hint)
    since = entry.get("since")
    if since and versions.at_least(target.engine, target.version, since, caps) is False:
        newest = str(caps["verified_version"])
        hint += f", or run {caps['display']} {since} or newer"
        if versions.at_least(target.engine, newest, since, caps):
            hint += f" (orchestrate engines install {target.engine} builds {newest})"
    return Problem(path, versions.explain_missing(caps, target, option.name, option.value), hint)


def check_flags_known(ctx: Ctx, flags: list[Flag]) -> None:
    """Every option the plan emits must be one the targeted build takes: its --help when it was
    probed, else the catalog's version ranges. A miss names the flag, the version and the fix.
    Options neither can judge are put to the build's own parser before up (pipeline.verify_flags)."""
    target, caps = ctx.version, ctx.caps
    if target is None:
        return
    verified = str(caps["verified_version"])
    for option in options(flags, list(ctx.server.extra_args)):
        if versions.supports(caps, target, option.name, option.value) is False:
            ctx.problems.append(unknown_option(ctx.server, ctx.index, ctx.engine, target, option))
    if target.version != verified:
        checked = ("every flag was checked against its --help" if target.flags is not None else
                   "its --help was not available here, so only the catalog's version ranges were checked")
        ctx.notes.append(f"targets {caps['display']} {target.describe()}; the rules were verified against "
                         f"{verified} and {checked}")
