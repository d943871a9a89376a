"""Decisions every engine shares, made once, each with its reason: engine, KV dtype, weight
placement, FlashAttention, memory estimate, image, API-key mechanism, health timeout, container
paths. Pure functions of the profile and the facts."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import PurePosixPath

from orchestrator import catalog
from orchestrator.catalog import GGUF_ENGINES, Gpu
from orchestrator.facts.types import ModelFacts
from orchestrator.plan import fit, versions
from orchestrator.plan.engines.base import Offload
from orchestrator.plan.model import GIB, ApiKey, FitEstimate, Mount
from orchestrator.profile import Profile, Server

RUNTIME_OVERHEAD_GIB = 1.5   # CUDA context (~0.5 GiB) + llama.cpp's 1 GiB fit margin, per GPU


def looks_hf(ref: str) -> bool:
    """An `org/repo` reference rather than a path."""
    return not ref.startswith(("/", "~", ".", "$")) and ref.count("/") == 1 and not ref.endswith(".gguf")


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
                   runtime_gib: float = 0.0, available: int | None = None, where: str = "") -> Offload:
    """Where GGUF weights go. runtime_gib: KV cache + compute buffers that must sit on the GPU too;
    available: the GPU memory left for this server where it shares GPUs (where: beside whom)."""
    if engine not in GGUF_ENGINES:
        return Offload("all", "engine holds the whole model on the GPU")
    if gpu.is_cpu:
        return Offload("cpu", "CPU-only: every layer runs on the CPU")
    vram = gpu.working_set_gb * gpu_count if available is None else round(available / GIB, 2)
    room = "VRAM" if available is None else f"VRAM {where}"
    if gpu.vendor == "apple":
        room = f"Metal working set (macOS default for {gpu.vram_gb:g} GB)" + (f" {where}" if available is not None else "")
    size = facts.size_gib
    if size is None:
        return Offload("all", f"all layers on {gpu.name} (model size unknown: no file and no size in its name)")
    budget = vram - RUNTIME_OVERHEAD_GIB * gpu_count - runtime_gib
    kind = ("estimated from catalog" if facts.source == "catalog" else
            "estimated from the name" if facts.size_is_estimate else "from the file's tensors")
    extra = f" + KV/compute {runtime_gib:.1f} GiB" if runtime_gib else ""
    if size <= budget:
        return Offload("all", f"weights {size:.1f} GiB ({kind}){extra} fit in {vram:g} GiB {room}: all layers on the GPU")
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
                    return Offload("moe_layers", f"MoE weights {size:.1f} GiB{extra} > {vram:g} GiB {room}: keep the "
                                   f"expert tensors of the first {n} of {expert_layers} layers on CPU (~{need:.1f} GiB), "
                                   "everything else on the GPU", n)
            return Offload("moe_all", f"MoE weights {size:.1f} GiB ({kind}){extra} > {budget + runtime_gib:.1f} GiB "
                           f"usable {room}: all expert tensors (~{experts:.1f} GiB) stay in system RAM, attention and "
                           f"shared weights (~{dense:.1f} GiB) on the GPU")
    if layers:
        n = max(0, int(budget / (size / layers)))
        return Offload("layers", f"weights {size:.1f} GiB{extra} > {vram:g} GiB {room}: {n} of {layers} layers on "
                                 "the GPU, the rest on CPU", n)
    return Offload("all", f"weights {size:.1f} GiB ({kind}) exceed {budget:.1f} GiB usable {room} and the layer "
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
        if isinstance(spec, dict) and spec.get("gfx") and gpu.gfx_target not in spec["gfx"]:
            continue
        if isinstance(spec, dict) and gpu.cc:
            lo = catalog.parse_cc(str(spec.get("min_cc", "0.0")))
            hi = catalog.parse_cc(str(spec.get("max_cc", "99.9")))
            if not lo <= gpu.cc <= hi:
                continue
            return ref, f"official {disp} image for {acc} (built for {_span(spec)}; this GPU is {gpu.sm})"
        return ref, f"official {disp} image for {acc}"
    cover = ", ".join(f"{spec['ref']} ({'/'.join(spec['gfx']) if spec.get('gfx') else _span(spec)})"
                      for _, spec in candidates if isinstance(spec, dict))
    return None, f"no official {disp} image covers {gpu.describe()} (official: {cover}){offer}"


def _span(spec: dict[str, object]) -> str:
    lo = str(spec.get("min_cc", "?")).replace(".", "")
    hi = str(spec["max_cc"]).replace(".", "") if spec.get("max_cc") else "newest"
    return f"sm{lo}–{hi}"


def choose_probe_tool(image: str | None, caps: dict[str, object]) -> str:
    """What a container healthcheck runs inside the image. Images of the repositories the catalog lists
    for this engine are known to carry its tool (catalog `probe_tool`); any other image (one built by
    `orchestrate engines image`, whatever its tag, or the profile's own) keeps its own HEALTHCHECK:
    "image". Never inferred from a tag."""
    if image is None:
        return str(caps["probe_tool"])
    images = caps["images"]
    assert isinstance(images, dict)
    known = {_repository(spec if isinstance(spec, str) else spec["ref"]) for spec in images.values() if spec}
    return str(caps["probe_tool"]) if _repository(image) in known else "image"


def _repository(ref: str) -> str:
    """ghcr.io/ggml-org/llama.cpp:server-cuda -> ghcr.io/ggml-org/llama.cpp (a digest or tag removed)."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def container_paths(server: Server, facts: ModelFacts, draft: ModelFacts | None) -> tuple[str | None, str | None, list[Mount]]:
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
    if draft is not None and not draft.location.count(":") and server.speculative.draft_model and not looks_hf(server.speculative.draft_model):
        d = PurePosixPath(draft.location)
        host_dir = str(d) if draft.format == "hf" else str(d.parent)
        existing = next((m for m in mounts if m.host_path == host_dir), None)
        if existing:
            draft_c = f"{existing.container_path}/{d.name}" if draft.format != "hf" else existing.container_path
        else:
            mounts.append(Mount(host_dir, "/drafts"))
            draft_c = f"/drafts/{d.name}" if draft.format != "hf" else "/drafts"
    return model_c, draft_c, mounts


def api_key(server: Server, engine: str, profile: Profile, state_dir: str) -> ApiKey | None:
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


def estimate_memory(server: Server, engine: str, gpu: Gpu, host_ram: int | None, model: ModelFacts, gpu_count: int,
                    kv: str, offload: Offload, fa_on: bool, fraction: float | None,
                    swa_full: bool = False, available: int | None = None,
                    reserve: int | None = None, ubatch: int = fit.N_UBATCH) -> FitEstimate:
    """The memory estimate of one server: weights + KV + compute against VRAM (RAM on CPU).
    fraction: the vLLM/SGLang memory share the rules chose (None: the engines' 0.9 default);
    available: GGUF engines on shared GPUs: the GPU memory the other servers leave."""
    if engine in GGUF_ENGINES:
        if gpu.is_cpu:
            device = host_ram
        elif available is not None:
            device = available
        else:
            device = int(gpu.working_set_gb * GIB) * max(gpu_count, 1)
        return fit.estimate_gguf(model, engine, server.context, server.parallel, kv, gpu.is_cpu, device,
                                 offload.mode, offload.layers, fa_on, swa_full, ubatch)
    device = host_ram if gpu.is_cpu else int(gpu.working_set_gb * GIB) * max(gpu_count, 1)
    return fit.estimate_hf(model, server.context, server.parallel, kv, device, gpu_count,
                           0.92 if fraction is None else fraction, on_cpu=gpu.is_cpu, reserve_bytes=reserve)


def decide_swa_full(server: Server, engine: str, gpu: Gpu, host_ram: int | None, model: ModelFacts, gpu_count: int,
                    kv: str, fa_on: bool, offload: Offload, runtime_full_gib: float, extra_gib: float,
                    available: int | None = None) -> str | None:
    """llama.cpp keeps only the window of a sliding-window layer's KV, so a request that diverges
    from a cached prompt inside the window re-processes the whole prompt, and --cache-reuse is
    disabled. With prefix caching wanted, --swa-full keeps those layers whole when the memory it
    costs fits without moving anything off the GPU. Returns the reason, or None."""
    if engine != "llama.cpp" or not server.prefix_cache or not fit.swa_layers(model):
        return None
    if offload.mode not in ("all", "cpu"):
        return None
    with_full = decide_offload(server, engine, gpu, max(gpu_count, 1), model, runtime_full_gib, available)
    if with_full.mode != offload.mode:
        return None
    est = estimate_memory(server, engine, gpu, host_ram, model, gpu_count, kv, offload, fa_on, None, swa_full=True,
                          available=available)
    if est.verdict not in ("fits", "unknown"):
        return None
    n = fit.swa_layers(model)
    return (f"prefix_cache on a sliding-window model ({n} of {model.n_layers} layers use a "
            f"{model.metadata.get('attention.sliding_window')}-token window): keep their KV whole (+{extra_gib:.2f} "
            "GiB, counted in memory) so a new request that shares a prompt prefix reuses it; without it "
            "llama-server re-processes the prompt and disables --cache-reuse")


@dataclass(frozen=True)
class ToolParsers:
    """vLLM/SGLang: the parsers that turn a model's tool-call and thinking output into the API's fields."""

    tool: str | None           # --tool-call-parser
    reasoning: str | None      # --reasoning-parser
    reason: str                # where the names come from


def _family(server: Server, model: ModelFacts) -> dict[str, object] | None:
    return catalog.parser_family(model.name, server.model.hf, PurePosixPath(model.location).name)


def tool_parsers(server: Server, engine: str, model: ModelFacts, version: str,
                 caps: dict[str, object]) -> tuple[ToolParsers | None, str | None]:
    """The profile's `tools`: auto looks the model's family up in catalog/parsers.yaml; an unknown family
    or an engine version older than the names were read in gets no parser flags and a note saying how
    to set one. Returns (parsers, note)."""
    if engine not in ("vllm", "sglang") or server.tools == "off":
        return None, None
    disp = caps["display"]
    family = _family(server, model)
    entry = family.get(engine) if family else None
    assert entry is None or isinstance(entry, dict)
    if server.tools != "auto":
        reasoning = entry.get("reasoning") if entry else None
        why = f"tools: {server.tools} from the profile" + (
            f"; reasoning parser of the {family['family']} family (catalog/parsers.yaml)" if reasoning and family
            else "")
        return ToolParsers(server.tools, reasoning, why), None
    how = (f"set tools: NAME (one of {disp}'s --tool-call-parser names) to accept tool_choice \"auto\", "
           "or tools: off")
    if entry is None:
        return None, (f"tools: auto: no tool-call or reasoning parser is known for {model.name} (no family in "
                      f"catalog/parsers.yaml matches it), so none is set and {disp} refuses tool_choice "
                      f"\"auto\"; {how}")
    since = str(entry["since"])
    if versions.at_least(engine, version, since, caps) is False:
        return None, (f"tools: auto: the {family['family'] if family else ''} parsers "
                      f"({entry.get('tool')}, {entry.get('reasoning')}) were read in {disp} {since}; this plan "
                      f"targets {version}, so none is set; {how}")
    why = f"{family['family'] if family else ''} family (catalog/parsers.yaml; names read in {disp} {since})"
    return ToolParsers(entry.get("tool"), entry.get("reasoning"), why), None  # type: ignore[arg-type]


def check_tools(server: Server, engine: str, version: str, caps: dict[str, object]) -> tuple[str, str] | None:
    """A `tools: NAME` the engine cannot take: (what, fix), or None."""
    if server.tools in ("auto", "off"):
        return None
    disp = caps["display"]
    if engine in GGUF_ENGINES:
        return (f"{disp} reads the tool-call format from the model's chat template and takes no parser name",
                "use tools: auto (or off)")
    known = catalog.parsers()["known"].get(engine) or {}
    names = [str(n) for n in known.get("tool") or []]
    if names and str(known.get("version")) == version and server.tools not in names:
        close = difflib.get_close_matches(server.tools, names, n=3)
        return (f"{disp} {version} has no tool-call parser {server.tools!r}",
                f"use one of: {', '.join(close) if close else ', '.join(names[:12]) + ', ...'}; or tools: auto")
    return None
