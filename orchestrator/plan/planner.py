"""plan(profile, hardware, model facts) -> Plan. Pure: detection happens before, in gather().

Decisions shared by every engine (engine choice, KV dtype, weight placement,
images, API-key mechanism, health timeouts) are made here, once, each with its
reason; engine-specific flags come from the rule lists in orchestrator/engines/.
"""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from types import ModuleType
from typing import Any

from orchestrator import catalog
from orchestrator.catalog import Gpu, UnknownGpu
from orchestrator.errors import Problem, ProfileError
from orchestrator.facts import engine_probe as engineversion
from orchestrator.facts.engine_probe import EngineVersion
from orchestrator.facts.model import ModelFacts, gather
from orchestrator.plan import fit
from orchestrator.plan.engines import ik_llama, llama_cpp, sglang, vllm
from orchestrator.plan.engines.base import Ctx, Offload, run_rules
from orchestrator.plan.model import ApiKey, EnvVar, HealthSpec, Mount, Plan, ServerPlan
from orchestrator.profile import LoadedProfile, Profile, Server, expand_path
from orchestrator.runtime.state import default_state_dir

ENGINE_MODULES: dict[str, ModuleType] = {"llama.cpp": llama_cpp, "ik_llama": ik_llama, "vllm": vllm, "sglang": sglang}
GGUF_ENGINES = ("llama.cpp", "ik_llama")
RUNTIME_OVERHEAD_GIB = 1.5   # CUDA context (~0.5 GiB) + llama.cpp's 1 GiB fit margin, per GPU
GIB = 2**30
# vLLM / SGLang refuse a context beyond the model's max_position_embeddings unless this env var is 1.
LONG_CONTEXT_ENV = {"vllm": "VLLM_ALLOW_LONG_MAX_MODEL_LEN", "sglang": "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"}


@dataclass
class Facts:
    """Everything the pure planner needs from the outside world, gathered once."""

    gpu: Gpu
    gpu_reason: str
    gpu_count: int
    models: dict[str, ModelFacts]          # by server name
    drafts: dict[str, ModelFacts]
    environ: dict[str, str]
    state_dir: str
    look_up_engines: bool = True        # find installed engine binaries (off for golden files)
    host_ram_bytes: int | None = None   # this machine's RAM (fit on CPU); None when not detected
    enforce_fit: bool = True            # a server that cannot fit is an error (--ignore-fit turns it off)
    versions: dict[str, EngineVersion] = field(default_factory=dict)  # targeted engine version by server


# --------------------------------------------------------------------------- fact gathering

def resolve_gpu(profile: Profile, detect: bool = True) -> tuple[Gpu, str, int, list[Problem]]:
    name = profile.hardware.gpu
    if name == "auto":
        from orchestrator.facts.hardware import detect_gpu

        found = detect_gpu() if detect else None
        if found is None:
            return catalog.find_gpu("cpu"), "hardware.gpu auto: no GPU detected, planning for CPU", 0, []
        gpu, count = found
        return gpu, f"hardware.gpu auto: detected {count}× {gpu.name}", count, []
    try:
        gpu = catalog.find_gpu(name)
    except UnknownGpu as exc:
        hint = (f"did you mean {', '.join(exc.suggestions)}?" if exc.suggestions
                else "run `orchestrate gpus` for the catalog")
        return catalog.find_gpu("cpu"), "", 0, [Problem(("hardware", "gpu"), f"unknown GPU {name!r}", hint)]
    count = 0 if gpu.is_cpu else profile.hardware.count
    return gpu, f"hardware.gpu {name!r} → {gpu.name}", count, []


def _model_location(server: Server, environ: dict[str, str], field: str, value: str | None,
                    problems: list[Problem], index: int) -> str | None:
    if value is None:
        return None
    try:
        return expand_path(value, environ)
    except KeyError as exc:
        problems.append(Problem(("servers", index, *field.split(".")),
                                f"environment variable {exc.args[0]} is not set",
                                f"export {exc.args[0]}=... or write the path out"))
        return None


def gather_facts(loaded: LoadedProfile, environ: dict[str, str] | None = None,
                 state_dir: str | None = None, detect: bool = True) -> Facts:
    profile = loaded.profile
    environ = dict(os.environ if environ is None else environ)
    problems: list[Problem] = []
    gpu, reason, count, gpu_problems = resolve_gpu(profile, detect)
    problems += gpu_problems
    models: dict[str, ModelFacts] = {}
    drafts: dict[str, ModelFacts] = {}
    for i, server in enumerate(profile.servers):
        m = server.model
        if (m.path is None) == (m.hf is None):
            problems.append(Problem(("servers", i, "model"), "give exactly one of model.path or model.hf",
                                    "path: a local GGUF file or HF directory; hf: org/repo[:quant]"))
            continue
        if m.hf is not None:
            models[server.name] = gather(m.hf, m.quant, is_hf=True)
        else:
            loc = _model_location(server, environ, "model.path", m.path, problems, i)
            if loc is not None:
                models[server.name] = gather(loc, m.quant)
        draft = server.speculative.draft_model
        if draft:
            loc = _model_location(server, environ, "speculative.draft_model", draft, problems, i)
            if loc is not None:
                drafts[server.name] = gather(loc) if not _looks_hf(draft) else gather(draft, is_hf=True)
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])
    ram = None
    if detect:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = None
    versions = {}
    for server in profile.servers:
        if server.name in models:
            engine = choose_engine(server, gpu, models[server.name])[0]
            versions[server.name] = resolve_version(server, engine, gpu, look_up=detect)
    return Facts(gpu, reason, count, models, drafts, environ, state_dir or default_state_dir(environ), detect, ram,
                 versions=versions)


def resolve_version(server: Server, engine: str, gpu: Gpu, look_up: bool = True) -> EngineVersion:
    """The engine version the plan targets: pinned in the profile, else the installed binary's own
    --version (process runtime), else the catalog's verified version."""
    caps = catalog.engine(engine)
    probed = None
    if look_up and server.runtime == "process":
        from orchestrator.provision.builds import locate

        found = locate(engine, gpu.accelerator, caps["process_command"][0], server.binary)
        if found.path and found.usable and engine in GGUF_ENGINES:
            probed = engineversion.probe(engine, found.path)
        elif found.path and found.usable and found.version:
            probed = EngineVersion(engine, found.version, f"the {caps['display']} package {found.path} imports")
    if server.engine_version:
        if probed and probed.version == server.engine_version:
            return replace(probed, source=f"engine_version in the profile; {probed.source}")
        return EngineVersion(engine, server.engine_version, "engine_version in the profile")
    if probed:
        return probed
    why = "no installed build found here" if look_up else "not looked up"
    return EngineVersion(engine, str(caps["verified_version"]), f"catalog default: {why}")


def _looks_hf(ref: str) -> bool:
    return not ref.startswith(("/", "~", ".", "$")) and ref.count("/") == 1 and not ref.endswith(".gguf")


# --------------------------------------------------------------------------- shared decisions

def choose_engine(server: Server, gpu: Gpu, facts: ModelFacts) -> tuple[str, str]:
    if server.engine != "auto":
        return server.engine, "engine set in the profile"
    if facts.format == "gguf":
        if gpu.is_cpu:
            return "ik_llama", ("GGUF on CPU: ik_llama.cpp's CPU kernels prefill ~1.8× faster than mainline "
                                "on this class of CPU")
        if gpu.cc and gpu.cc < (7, 5):
            return "llama.cpp", f"GGUF model; {gpu.describe()}: llama.cpp supports it, ik_llama.cpp needs Turing+"
        return "llama.cpp", "GGUF model: llama.cpp runs it on every backend"
    if gpu.vendor == "nvidia" and gpu.cc and gpu.cc >= (7, 5):
        return "vllm", f"HF-format model on {gpu.describe()}: vLLM serves it with continuous batching"
    if gpu.vendor in ("amd", "cpu"):
        return "vllm", f"HF-format model on {gpu.describe()}: vLLM has a {gpu.accelerator} backend"
    return "vllm", "HF-format model: vLLM is the default server for safetensors checkpoints"


def resolve_kv(server: Server, engine: str, gpu: Gpu) -> tuple[str, str]:
    kv = server.kv_cache
    if kv == "auto":
        return "f16", "kv_cache auto → f16/model dtype: lossless; q8_0 (llama.cpp) or fp8 (vLLM/SGLang) halves it"
    if kv == "fp8":
        kv = "fp8_e4m3" if engine in ("vllm", "sglang") else kv
    reasons = {
        "f16": "kv_cache f16 from the profile: lossless",
        "bf16": "kv_cache bf16 from the profile",
        "q8_0": "kv_cache q8_0 from the profile: half the KV memory of f16, near-lossless",
        "q4_0": "kv_cache q4_0 from the profile: a quarter of f16's KV memory; measurable quality loss",
        "fp8_e4m3": f"kv_cache {server.kv_cache} from the profile: half of bf16's KV memory on {gpu.sm}",
        "fp8_e5m2": "kv_cache fp8_e5m2 from the profile",
    }
    return kv, reasons.get(kv, f"kv_cache {kv} from the profile")


def decide_offload(server: Server, engine: str, gpu: Gpu, gpu_count: int, facts: ModelFacts,
                   runtime_gib: float = 0.0) -> Offload:
    """Where GGUF weights go. runtime_gib: KV cache + compute buffers that must sit on the GPU too."""
    if engine not in GGUF_ENGINES:
        return Offload("all", "engine holds the whole model on the GPU")
    if gpu.is_cpu:
        return Offload("cpu", "CPU-only: every layer runs on the CPU")
    vram = gpu.vram_gb * gpu_count
    size = facts.size_gib
    if size is None:
        return Offload("all", f"all layers on {gpu.name} (model size unknown: no file and no size in its name)")
    budget = vram - RUNTIME_OVERHEAD_GIB * gpu_count - runtime_gib
    kind = ("estimated from catalog" if facts.source == "catalog" else
            "estimated from the name" if facts.size_is_estimate else "from the file's tensors")
    extra = f" + KV/compute {runtime_gib:.1f} GiB" if runtime_gib else ""
    if size <= budget:
        return Offload("all", f"weights {size:.1f} GiB ({kind}){extra} fit in {vram:g} GiB VRAM: all layers on the GPU")
    if server.offload == "none":
        return Offload("all", f"offload: none in the profile (weights {size:.1f} GiB > {budget:.1f} GiB usable)")
    layers = facts.n_layers
    exact = facts.metadata.get("tensors.expert_bytes")
    if facts.is_moe and (exact or (facts.params_b and facts.active_params_b)):
        experts = exact / GIB if exact else size * (1 - (facts.active_params_b or 0) / (facts.params_b or 1))
        dense = size - experts
        expert_layers = facts.metadata.get("tensors.expert_layers") or layers
        if dense <= budget:
            need = size - budget
            if expert_layers:
                n = math.ceil(need / (experts / expert_layers))
                if n < expert_layers:
                    return Offload("moe_layers", f"MoE weights {size:.1f} GiB{extra} > {vram:g} GiB VRAM: keep the "
                                   f"expert tensors of the first {n} of {expert_layers} layers on CPU (~{need:.1f} GiB), "
                                   "everything else on the GPU", n)
            return Offload("moe_all", f"MoE weights {size:.1f} GiB ({kind}){extra} > {budget + runtime_gib:.1f} GiB "
                           f"usable VRAM: all expert tensors (~{experts:.1f} GiB) stay in system RAM, attention and "
                           f"shared weights (~{dense:.1f} GiB) on the GPU")
    if layers:
        n = max(0, int(budget / (size / layers)))
        return Offload("layers", f"weights {size:.1f} GiB{extra} > {vram:g} GiB VRAM: {n} of {layers} layers on "
                                 "the GPU, the rest on CPU", n)
    return Offload("all", f"weights {size:.1f} GiB ({kind}) exceed {budget:.1f} GiB usable VRAM and the layer "
                          "count is unknown: all layers requested on the GPU; the engine may fail to load")


def health_timeout(server: Server, engine: str, facts: ModelFacts, on_cpu: bool = False) -> tuple[int, str]:
    if server.health.timeout != "auto":
        return int(server.health.timeout), "health.timeout from the profile"
    size = facts.size_gib or 8.0
    if engine in GGUF_ENGINES:
        t = int(60 + 10 * size)
        return t, f"auto: 60 s + 10 s/GiB for {size:.1f} GiB of weights (load from disk and warm-up)"
    work = "torch.compile and warm-up" if on_cpu else "torch.compile and CUDA graph capture"
    if server.nodes > 1:   # every node loads its own share of the weights at the same time
        share = size / server.nodes
        return int(300 + 20 * share), (f"auto: 300 s + 20 s/GiB for {share:.1f} GiB, each node's share of "
                                       f"{size:.1f} GiB (weights, {work})")
    t = int(300 + 20 * size)
    return t, f"auto: 300 s + 20 s/GiB for {size:.1f} GiB (weights, {work})"


LOCAL_IMAGE_PREFIX = "localhost/orchestrator/"   # images built by `orchestrate engines image`


def choose_image(server: Server, engine: str, gpu: Gpu, caps: dict[str, object]) -> tuple[str | None, str]:
    """The profile's image, else the official image whose accelerator and GPU architectures cover this
    machine (catalog `images`, with `min_cc`/`max_cc` where an image covers only some architectures)."""
    if server.image:
        return server.image, "image set in the profile"
    images = caps["images"]
    assert isinstance(images, dict)
    acc = gpu.accelerator
    disp = caps["display"]
    build = f"orchestrate engines image {engine} --backend {acc}" if engine in ("llama.cpp", "ik_llama") else ""
    offer = f" ({build} builds one from an installed engine)" if build else ""
    candidates = [(key, spec) for key, spec in images.items()
                  if spec and (key == acc or (isinstance(spec, dict) and spec.get("accelerator") == acc))]
    if not candidates:
        return None, f"{disp} publishes no {acc} container image{offer}"
    for _key, spec in candidates:
        ref = spec if isinstance(spec, str) else spec["ref"]
        if isinstance(spec, dict) and gpu.cc:
            lo = catalog.parse_cc(str(spec.get("min_cc", "0.0")))
            hi = catalog.parse_cc(str(spec.get("max_cc", "99.9")))
            if not lo <= gpu.cc <= hi:
                continue
            return ref, f"official {disp} image for {acc} (built for {_span(spec)}; this GPU is {gpu.sm})"
        return ref, f"official {disp} image for {acc}"
    cover = ", ".join(f"{spec['ref']} ({_span(spec)})" for _, spec in candidates if isinstance(spec, dict))
    return None, f"no official {disp} image covers {gpu.describe()} (official: {cover}){offer}"


def _span(spec: dict[str, object]) -> str:
    lo = str(spec.get("min_cc", "?")).replace(".", "")
    hi = str(spec["max_cc"]).replace(".", "") if spec.get("max_cc") else "newest"
    return f"sm{lo}–{hi}"


def choose_probe_tool(image: str | None, caps: dict[str, object]) -> str:
    """What a container healthcheck can run inside the image: images we build carry busybox wget."""
    if image and image.startswith(LOCAL_IMAGE_PREFIX):
        return "wget"
    return str(caps["probe_tool"])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- checks (impossible combinations)

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
        if not _is_loopback(s.host) and not s.api_key_env:
            problems.append(Problem(("servers", i, "host"), f"host {s.host} exposes the server beyond this machine without an API key",
                                    "set api_key_env: NAME_OF_VAR (holding the key), or use host: 127.0.0.1"))
        if isinstance(s.gpus, list):
            if gpu.is_cpu:
                problems.append(Problem(("servers", i, "gpus"), "GPU indices given but hardware.gpu is cpu",
                                        "remove gpus: or set hardware.gpu to your GPU"))
            elif max(s.gpus) >= gpu_count:
                problems.append(Problem(("servers", i, "gpus"), f"GPU index {max(s.gpus)} but hardware.count is {gpu_count}",
                                        f"use indices 0..{gpu_count - 1} or raise hardware.count"))
    names = {s.name for s in profile.servers}
    for i, s in enumerate(profile.servers):
        for d in s.depends_on:
            if d not in names or d == s.name:
                problems.append(Problem(("servers", i, "depends_on"), f"depends_on names {d!r}, "
                                        + ("the server itself" if d == s.name else "which is not a server of this profile"),
                                        f"use one of: {', '.join(sorted(names - {s.name})) or '(no other server)'}"))
    if _has_cycle({s.name: [d for d in s.depends_on if d in names] for s in profile.servers}):
        problems.append(Problem(("servers",), "depends_on forms a cycle", "remove one depends_on entry of the loop"))
    return problems


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
    s, caps, gpu, engine = ctx.server, ctx.caps, ctx.gpu, ctx.engine
    disp = caps["display"]
    acc = gpu.accelerator
    if acc not in caps["accelerators"]:
        ctx.error(("engine",), f"{disp} does not run on {gpu.name} ({acc})",
                  "pick llama.cpp, which runs on CUDA, ROCm, Vulkan, Metal, SYCL and CPU")
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
    check_nodes(ctx)
    fmt = ctx.facts.format
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
    kv = ctx.kv_cache
    if kv not in ("f16",) and kv not in caps["kv_types"]:
        alt = "q8_0 (half of f16)" if engine in GGUF_ENGINES else "fp8 (half of bf16) or auto"
        ctx.error(("kv_cache",), f"{disp} has no {s.kv_cache} KV cache", f"use {alt}")
    if engine in ("vllm", "sglang") and kv.startswith("fp8") and not gpu.is_cpu:
        if not gpu.fp8 and not (engine == "vllm" and gpu.cc and gpu.cc >= (8, 9)):
            ctx.error(("kv_cache",), f"fp8 KV cache needs an sm89+ GPU with fp8 support; {gpu.describe()}",
                      "use kv_cache: auto on this GPU")
    method = s.speculative.method
    if method != "none":
        names = caps.get("spec_types") or caps.get("spec_methods") or caps.get("spec_algorithms") or {}
        if method not in names:
            hint = {"eagle": "use eagle3 with an EAGLE-3 head, or mtp/draft",
                    "eagle3": "ik_llama's eagle3 is a stub: use llama.cpp, vLLM or SGLang for EAGLE-3"}.get(method, "pick another method")
            ctx.error(("speculative", "method"), f"{disp} {caps['verified_version']} does not support speculative method {method!r}", hint)
        needs_model = method in ("draft", "eagle", "eagle3")
        if needs_model and not s.speculative.draft_model:
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
    if s.runtime == "process" and s.image:
        ctx.warnings.append("image is used only by the docker runtime and the docker/compose/k8s renderers")


# --------------------------------------------------------------------------- the planner

def _container_paths(server: Server, facts: ModelFacts, draft: ModelFacts | None) -> tuple[str | None, str | None, list[Mount]]:
    mounts: list[Mount] = []
    model_c = draft_c = None
    if not server.model.hf:
        p = PurePosixPath(facts.location)
        claim = server.model.k8s_claim
        if facts.format == "hf":
            mounts.append(Mount(str(p), f"/models/{p.name}", k8s_claim=claim))
            model_c = f"/models/{p.name}"
        else:
            mounts.append(Mount(str(p.parent), "/models", k8s_claim=claim))
            model_c = f"/models/{p.name}"
    if draft is not None and not draft.location.count(":") and server.speculative.draft_model and not _looks_hf(server.speculative.draft_model):
        d = PurePosixPath(draft.location)
        host_dir = str(d) if draft.format == "hf" else str(d.parent)
        existing = next((m for m in mounts if m.host_path == host_dir), None)
        if existing:
            draft_c = f"{existing.container_path}/{d.name}" if draft.format != "hf" else existing.container_path
        else:
            mounts.append(Mount(host_dir, "/drafts"))
            draft_c = f"/drafts/{d.name}" if draft.format != "hf" else "/drafts"
    return model_c, draft_c, mounts


def _api_key(server: Server, engine: str, profile: Profile, state_dir: str) -> ApiKey | None:
    if not server.api_key_env:
        return None
    caps = catalog.engine(engine)
    if caps.get("api_key_env"):
        return ApiKey(server.api_key_env, "env", engine_env=caps["api_key_env"])
    base = f"{state_dir}/{profile.name}/{server.name}"
    if engine == "sglang":
        return ApiKey(server.api_key_env, "config", file_flag="--config", process_path=f"{base}.sglang-auth.yaml",
                      container_path="/run/orchestrator/sglang-auth.yaml")
    return ApiKey(server.api_key_env, "file", file_flag="--api-key-file", process_path=f"{base}.api-key",
                  container_path="/run/secrets/api_key")


def _fit(server: Server, engine: str, facts: Facts, model: ModelFacts, gpu_count: int, kv: str, offload: Offload,
         fa_on: bool, flags: list[Any], swa_full: bool = False) -> fit.FitEstimate:
    if engine in GGUF_ENGINES:
        if facts.gpu.is_cpu:
            device = facts.host_ram_bytes
        else:
            device = int(facts.gpu.vram_gb * GIB) * max(gpu_count, 1)
        return fit.estimate_gguf(model, engine, server.context, server.parallel, kv, facts.gpu.is_cpu, device,
                                 offload.mode, offload.layers, fa_on, swa_full)
    fraction = next((float(f.value) for f in flags if f.name in ("--gpu-memory-utilization", "--mem-fraction-static")
                     and f.value), 0.9)
    device = facts.host_ram_bytes if facts.gpu.is_cpu else int(facts.gpu.vram_gb * GIB) * max(gpu_count, 1)
    return fit.estimate_hf(model, server.context, server.parallel, kv, device, gpu_count, fraction,
                           on_cpu=facts.gpu.is_cpu)


def decide_swa_full(server: Server, engine: str, facts: Facts, model: ModelFacts, gpu_count: int, kv: str,
                    fa_on: bool, offload: Offload, runtime_full_gib: float, extra_gib: float) -> str | None:
    """llama.cpp keeps only the window of a sliding-window layer's KV, so a request that diverges
    from a cached prompt inside the window re-processes the whole prompt, and --cache-reuse is
    disabled. With prefix caching wanted, --swa-full keeps those layers whole when the memory it
    costs fits without moving anything off the GPU. Returns the reason, or None."""
    if engine != "llama.cpp" or not server.prefix_cache or not fit.swa_layers(model):
        return None
    if offload.mode not in ("all", "cpu"):
        return None
    with_full = decide_offload(server, engine, facts.gpu, max(gpu_count, 1), model, runtime_full_gib)
    if with_full.mode != offload.mode:
        return None
    est = _fit(server, engine, facts, model, gpu_count, kv, offload, fa_on, [], swa_full=True)
    if est.verdict not in ("fits", "unknown"):
        return None
    n = fit.swa_layers(model)
    return (f"prefix_cache on a sliding-window model ({n} of {model.n_layers} layers use a "
            f"{model.metadata.get('attention.sliding_window')}-token window): keep their KV whole (+{extra_gib:.2f} "
            "GiB, counted in memory) so a new request that shares a prompt prefix reuses it; without it "
            "llama-server re-processes the prompt and disables --cache-reuse")


def plan_server(profile: Profile, index: int, facts: Facts) -> tuple[ServerPlan | None, list[Problem]]:
    server = profile.servers[index]
    model = facts.models.get(server.name)
    if model is None:
        return None, []
    engine, engine_reason = choose_engine(server, facts.gpu, model)
    caps = catalog.engine(engine)
    draft = facts.drafts.get(server.name)
    gpu_count = 0 if facts.gpu.is_cpu else (facts.gpu_count if server.gpus == "all" else len(server.gpus))
    kv, kv_reason = resolve_kv(server, engine, facts.gpu)
    fa_on = not (engine == "ik_llama" and facts.gpu.is_cpu and server.parallel > 1
                 and model.metadata.get("attention.sliding_window"))
    def runtime_gib(swa_full: bool) -> float:
        if engine not in GGUF_ENGINES or not model.metadata.get("block_count"):
            return 0.0
        return (fit.kv_cache_bytes(model, engine, server.context, server.parallel, kv, swa_full=swa_full)
                + fit.compute_bytes(model, engine, server.context, server.parallel, fa_on, swa_full=swa_full)) / GIB

    offload = decide_offload(server, engine, facts.gpu, max(gpu_count, 1), model, runtime_gib(False))
    swa_full = decide_swa_full(server, engine, facts, model, gpu_count, kv, fa_on, offload, runtime_gib(True),
                               runtime_gib(True) - runtime_gib(False))
    model_c, draft_c, mounts = _container_paths(server, model, draft)
    version = facts.versions.get(server.name) or resolve_version(server, engine, facts.gpu, look_up=False)
    if server.model.hf:
        model_arg = server.model.hf if engine != "vllm" else server.model.hf.split(":")[0]
    else:
        model_arg = model.location
    served = server.model.served_name or (model.name.removesuffix(".gguf") if not server.model.hf else server.model.hf.split(":")[0])
    ctx = Ctx(profile=profile, server=server, index=index, engine=engine, caps=caps, gpu=facts.gpu,
              gpu_count=gpu_count, facts=model, draft=draft, model_arg=model_arg, model_container=model_c,
              draft_arg=draft.location if draft else None, draft_container=draft_c, kv_cache=kv,
              kv_reason=kv_reason, offload=offload, served_name=served,
              api_key=_api_key(server, engine, profile, facts.state_dir),
              version=version, swa_full=swa_full)
    check_server(ctx)
    if ctx.problems:
        return None, ctx.problems
    flags, env = run_rules(ENGINE_MODULES[engine].RULES, ctx)
    check_flags_known(ctx, flags)
    if ctx.problems:
        return None, ctx.problems
    if isinstance(server.gpus, list) and not facts.gpu.is_cpu:
        var = "HIP_VISIBLE_DEVICES" if facts.gpu.vendor == "amd" else "CUDA_VISIBLE_DEVICES"
        env.append(EnvVar(var, ",".join(map(str, server.gpus)), f"this server uses GPUs {server.gpus}",
                          process_only=True))
    env += [EnvVar(k, v, "env from the profile") for k, v in sorted(server.env.items())]
    image, image_reason = choose_image(server, engine, facts.gpu, caps)
    timeout, timeout_reason = health_timeout(server, engine, model, facts.gpu.is_cpu)
    health = HealthSpec(caps["health_path"], caps["models_path"], caps.get("props_path"), caps.get("metrics_path"),
                        timeout, server.health.interval, timeout_reason)
    executable = ""
    if facts.look_up_engines and server.runtime == "process":
        from orchestrator.provision.builds import locate

        arch = facts.gpu.compute_capability.replace(".", "") if facts.gpu.compute_capability else facts.gpu.gfx_target
        found = locate(engine, facts.gpu.accelerator, caps["process_command"][0], server.binary, arch)
        executable = found.describe()
        if not found.usable:
            ctx.warnings.append(f"`up` cannot start this server: {found.how}")
        elif engine not in GGUF_ENGINES and found.version and found.version != caps["verified_version"]:
            ctx.warnings.append(f"installed {caps['display']} is {found.version} ({found.path}); the flags are "
                                f"verified against {caps['verified_version']}: check them with `orchestrate plan`, "
                                f"or install {caps['verified_version']}")
    shm = "16g" if gpu_count > 1 or server.nodes > 1 else ("8g" if engine in ("vllm", "sglang") else None)
    total_gpus = gpu_count * server.nodes
    estimate = _fit(server, engine, facts, model, total_gpus, kv, offload, fa_on, flags, bool(swa_full))
    if server.nodes > 1:
        estimate.device = f"{total_gpus} GPUs of {server.nodes} nodes"
    sp = ServerPlan(
        name=server.name, engine=engine, engine_display=caps["display"], engine_version=version.version,
        engine_version_source=version.source,
        engine_reason=engine_reason, runtime=server.runtime, accelerator=facts.gpu.accelerator, image=image,
        image_reason=image_reason, host=server.host, port=server.port, served_name=served,
        model_location=model.location, model_format=model.format, model_is_hf=bool(server.model.hf),
        model_pypi=server.model.pypi, binary=server.binary, executable=executable,
        gpu_ids=list(server.gpus) if isinstance(server.gpus, list) else None, gpu_count=gpu_count,
        nodes=server.nodes,
        command=list(caps["process_command"]), container_command=list(caps["container_command"]),
        flags=flags, env=env, api_key=ctx.api_key, mounts=mounts, health=health, shm_size=shm,
        warnings=ctx.warnings, notes=ctx.notes, estimate=estimate.as_dict(),
        depends_on=list(server.depends_on), probe_tool=choose_probe_tool(image, caps),
    )
    if facts.enforce_fit and estimate.verdict == "does not fit":
        need = estimate.total_bytes / GIB
        have = (estimate.available_bytes or 0) / GIB
        fixes = "; ".join(f"{c.change} (saves {c.saves_bytes / GIB:.1f} GiB)" for c in estimate.changes[:3])
        return None, [Problem(("servers", index), f"does not fit: needs ~{need:.1f} GiB on the {estimate.device}, "
                              f"{have:.1f} GiB available", (fixes + "; " if fixes else "")
                              + "or pass --ignore-fit to plan anyway (orchestrate fit shows the breakdown)")]
    return sp, []


def check_flags_known(ctx: Ctx, flags: list[Any]) -> None:
    """Every option the plan emits must be one the targeted build takes: its --help when it was
    probed, else the catalog's version ranges. A miss names the flag, the version and the fix."""
    target, caps = ctx.version, ctx.caps
    if target is None:
        return
    verified = str(caps["verified_version"])
    options = [(f.name, f.value) for f in flags if f.name.startswith("-")]
    extra = list(ctx.server.extra_args)
    for i, arg in enumerate(extra):  # extra_args too: a typo there fails the same way at start-up
        if arg.startswith("-") and not arg.lstrip("-").replace(".", "").isdigit():
            nxt = extra[i + 1] if i + 1 < len(extra) and not extra[i + 1].startswith("-") else None
            options.append((arg, nxt))
    for name, value in options:
        if engineversion.supports(caps, target, name, value) is False:
            ctx.error(("engine_version",) if ctx.server.engine_version else ("engine",),
                      engineversion.explain_missing(caps, target, name, value),
                      f"install {caps['display']} {verified} (orchestrate engines install {ctx.engine}), pin "
                      "engine_version, or drop the setting that needs it")
    if target.version != verified:
        checked = ("every flag was checked against its --help" if target.flags is not None else
                   "its --help was not available here, so only the catalog's version ranges were checked")
        ctx.notes.append(f"targets {caps['display']} {target.describe()}; the rules were verified against "
                         f"{verified} and {checked}")


def plan(loaded: LoadedProfile, facts: Facts) -> Plan:
    """Pure: (profile, facts) -> Plan, or ProfileError listing every problem with its line."""
    profile = loaded.profile
    problems = check_profile(profile, facts.gpu, facts.gpu_count)
    servers: list[ServerPlan] = []
    for i in range(len(profile.servers)):
        sp, probs = plan_server(profile, i, facts)
        problems += probs
        if sp is not None:
            servers.append(sp)
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])
    hardware = {"gpu": facts.gpu.id, "name": facts.gpu.name, "count": facts.gpu_count, "reason": facts.gpu_reason,
                "arch": facts.gpu.arch, "compute_capability": facts.gpu.compute_capability,
                "vram_gb": facts.gpu.vram_gb}
    return Plan(profile.name, loaded.file, hardware, servers)


def build_plan(loaded: LoadedProfile, environ: dict[str, str] | None = None, state_dir: str | None = None,
               detect: bool = True, enforce_fit: bool = True) -> Plan:
    facts = gather_facts(loaded, environ, state_dir, detect)
    facts.enforce_fit = enforce_fit
    return plan(loaded, facts)
