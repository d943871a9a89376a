"""plan(profile, facts) -> Plan. Pure: no subprocess, no socket, no file is opened here; every fact a
rule needs (hardware, model, the installed engine's version and options) was gathered before, in
facts.gather, and the pipeline (orchestrator/pipeline.py) is where the two meet.

Decisions shared by every engine live in plan/decisions.py, impossible combinations in
plan/checks.py, engine-specific flags in the rule lists of plan/engines/.
"""

from __future__ import annotations

from types import ModuleType

from orchestrator import catalog
from orchestrator.catalog import GGUF_ENGINES
from orchestrator.errors import Problem, ProfileError
from orchestrator.facts.types import EngineVersion, Facts, ModelFacts
from orchestrator.plan import fit
from orchestrator.plan.checks import check_flags_known, check_profile, check_server
from orchestrator.plan.decisions import (
    api_key,
    choose_engine,
    choose_image,
    choose_probe_tool,
    container_paths,
    decide_offload,
    decide_swa_full,
    estimate_memory,
    health_timeout,
    resolve_kv,
)
from orchestrator.plan.engines import ik_llama, llama_cpp, sglang, vllm
from orchestrator.plan.engines.base import Ctx, run_rules
from orchestrator.plan.model import (
    GIB,
    EnvVar,
    Executable,
    FitEstimate,
    HardwareSummary,
    HealthSpec,
    Plan,
    ServerPlan,
    Settings,
    is_loopback,
)
from orchestrator.plan.tuned import apply_lock
from orchestrator.profile import LoadedProfile, Profile, Server

ENGINE_MODULES: dict[str, ModuleType] = {"llama.cpp": llama_cpp, "ik_llama": ik_llama, "vllm": vllm, "sglang": sglang}


def flash_attention_on(engine: str, on_cpu: bool, parallel: int, model: ModelFacts) -> bool:
    """Whether the engine's rules turn FlashAttention on (the fit estimate counts its buffers): an
    engine module that cannot run it somewhere says so in its flash_attention_breaks()."""
    breaks = getattr(ENGINE_MODULES[engine], "flash_attention_breaks", None)
    return not (breaks is not None and breaks(on_cpu, parallel, model))


def _runtime_gib(server: Server, engine: str, model: ModelFacts, kv: str, fa_on: bool, swa_full: bool) -> float:
    """KV cache + compute buffers that must sit beside the weights (GGUF engines)."""
    if engine not in GGUF_ENGINES or not model.metadata.get("block_count"):
        return 0.0
    return (fit.kv_cache_bytes(model, engine, server.context, server.parallel, kv, swa_full=swa_full)
            + fit.compute_bytes(model, engine, server.context, server.parallel, fa_on, swa_full=swa_full)) / GIB


def _context(profile: Profile, index: int, facts: Facts, engine: str, version: EngineVersion) -> Ctx:
    """Every shared decision for one server, made once, in the order they depend on each other."""
    server = profile.servers[index]
    model = facts.models[server.name]
    caps = catalog.engine(engine)
    draft = facts.drafts.get(server.name)
    gpu = facts.gpu
    gpu_count = 0 if gpu.is_cpu else (facts.gpu_count if server.gpus == "all" else len(server.gpus))
    kv, kv_reason = resolve_kv(server, engine, gpu)
    fa_on = flash_attention_on(engine, gpu.is_cpu, server.parallel, model)
    offload = decide_offload(server, engine, gpu, max(gpu_count, 1), model,
                             _runtime_gib(server, engine, model, kv, fa_on, False))
    full = _runtime_gib(server, engine, model, kv, fa_on, True)
    swa_full = decide_swa_full(server, engine, gpu, facts.host_ram_bytes, model, gpu_count, kv, fa_on, offload, full,
                               full - _runtime_gib(server, engine, model, kv, fa_on, False))
    model_c, draft_c, mounts = container_paths(server, model, draft)
    if server.model.hf:
        model_arg = server.model.hf if engine != "vllm" else server.model.hf.split(":")[0]
    else:
        model_arg = model.location
    served = server.model.served_name or (model.name.removesuffix(".gguf") if not server.model.hf
                                          else server.model.hf.split(":")[0])
    return Ctx(profile=profile, server=server, index=index, engine=engine, caps=caps, gpu=gpu,
               gpu_count=gpu_count, facts=model, draft=draft, model_arg=model_arg, model_container=model_c,
               draft_arg=draft.location if draft else None, draft_container=draft_c, kv_cache=kv,
               kv_reason=kv_reason, offload=offload, served_name=served,
               api_key=api_key(server, engine, profile, facts.state_dir), version=version, swa_full=swa_full,
               fa_on=fa_on, mounts=mounts)


def _executable_warnings(ctx: Ctx, facts: Facts) -> None:
    found = facts.executables.get(ctx.server.name)
    caps = ctx.caps
    if found is None:
        return
    if not found.usable:
        ctx.warnings.append(f"`up` cannot start this server: {found.how}")
    elif ctx.engine not in GGUF_ENGINES and found.version and found.version != caps["verified_version"]:
        ctx.warnings.append(f"installed {caps['display']} is {found.version} ({found.path}); the flags are "
                            f"verified against {caps['verified_version']}: check them with `orchestrate plan`, "
                            f"or install {caps['verified_version']}")


def _env(ctx: Ctx, env: list[EnvVar]) -> list[EnvVar]:
    server, gpu = ctx.server, ctx.gpu
    if isinstance(server.gpus, list) and not gpu.is_cpu:
        var = "HIP_VISIBLE_DEVICES" if gpu.vendor == "amd" else "CUDA_VISIBLE_DEVICES"
        env.append(EnvVar(var, ",".join(map(str, server.gpus)), f"this server uses GPUs {server.gpus}",
                          process_only=True))
    return env + [EnvVar(k, v, "env from the profile") for k, v in sorted(server.env.items())]


def _executable(facts: Facts, name: str) -> Executable | None:
    found = facts.executables.get(name)
    return Executable(found.path, found.how, found.version, found.usable) if found else None


def _does_not_fit(index: int, estimate: FitEstimate) -> Problem:
    need = estimate.total_bytes / GIB
    have = (estimate.available_bytes or 0) / GIB
    fixes = "; ".join(f"{c.change} (saves {c.saves_bytes / GIB:.1f} GiB)" for c in estimate.changes[:3])
    return Problem(("servers", index), f"does not fit: needs ~{need:.1f} GiB on the {estimate.device}, "
                   f"{have:.1f} GiB available", (fixes + "; " if fixes else "")
                   + "or pass --ignore-fit to plan anyway (orchestrate fit shows the breakdown)")


def plan_server(profile: Profile, index: int, facts: Facts,
                enforce_fit: bool = True) -> tuple[ServerPlan | None, list[Problem]]:
    server = profile.servers[index]
    model = facts.models.get(server.name)
    if model is None:
        return None, []
    engine, engine_reason = choose_engine(server, facts.gpu, model)
    version = facts.versions.get(server.name) or EngineVersion(
        engine, str(catalog.engine(engine)["verified_version"]), "catalog default: not looked up")
    ctx = _context(profile, index, facts, engine, version)
    caps = ctx.caps
    check_server(ctx)
    if ctx.problems:
        return None, ctx.problems
    flags, env = run_rules(ENGINE_MODULES[engine].RULES, ctx)
    check_flags_known(ctx, flags)
    if ctx.problems:
        return None, ctx.problems
    _executable_warnings(ctx, facts)
    image, image_reason = choose_image(server, engine, facts.gpu, caps)
    timeout, timeout_reason = health_timeout(server, engine, model, facts.gpu.is_cpu)
    health = HealthSpec(caps["health_path"], caps["models_path"], caps.get("props_path"), caps.get("metrics_path"),
                        timeout, server.health.interval, timeout_reason)
    shm = "16g" if ctx.gpu_count > 1 or server.nodes > 1 else ("8g" if engine in ("vllm", "sglang") else None)
    total_gpus = ctx.gpu_count * server.nodes
    estimate = estimate_memory(server, engine, facts.gpu, facts.host_ram_bytes, model, total_gpus, ctx.kv_cache,
                               ctx.offload, ctx.fa_on, ctx.mem_fraction, bool(ctx.swa_full))
    if server.nodes > 1:
        estimate.device = f"{total_gpus} GPUs of {server.nodes} nodes"
    if enforce_fit and estimate.verdict == "does not fit":
        return None, [_does_not_fit(index, estimate)]
    settings = Settings(context=server.context, slots=server.parallel, kv_cache=ctx.kv_cache,
                        flash_attention=ctx.fa_on, offload=ctx.offload.mode, swa_full=bool(ctx.swa_full),
                        memory_fraction=ctx.mem_fraction)
    sp = ServerPlan(
        name=server.name, engine=engine, engine_display=caps["display"], engine_version=version.version,
        engine_version_source=version.source,
        engine_reason=engine_reason, runtime=server.runtime, accelerator=facts.gpu.accelerator, image=image,
        image_reason=image_reason, host=server.host, port=server.port, served_name=ctx.served_name,
        model_location=model.location, model_format=model.format, model_is_hf=bool(server.model.hf),
        model_pypi=server.model.pypi, binary=server.binary, executable=_executable(facts, server.name),
        gpu_ids=list(server.gpus) if isinstance(server.gpus, list) else None, gpu_count=ctx.gpu_count,
        nodes=server.nodes,
        command=list(caps["process_command"]), container_command=list(caps["container_command"]),
        flags=flags, env=_env(ctx, env), api_key=ctx.api_key, mounts=ctx.mounts, health=health, shm_size=shm,
        warnings=ctx.warnings, notes=ctx.notes, estimate=estimate,
        depends_on=list(server.depends_on), probe_tool=choose_probe_tool(image, caps), settings=settings,
        private_host=server.host if is_loopback(server.host) else "127.0.0.1",
    )
    apply_lock(sp, facts.locks.get(server.name))
    return sp, []


def plan(loaded: LoadedProfile, facts: Facts, enforce_fit: bool = True) -> Plan:
    """Pure: (profile, facts) -> Plan, or ProfileError listing every problem with its line."""
    profile = loaded.profile
    problems = check_profile(profile, facts.gpu, facts.gpu_count)
    servers: list[ServerPlan] = []
    for i in range(len(profile.servers)):
        sp, probs = plan_server(profile, i, facts, enforce_fit)
        problems += probs
        if sp is not None:
            servers.append(sp)
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])
    gpu = facts.gpu
    hardware = HardwareSummary(gpu=gpu.id, name=gpu.name, count=facts.gpu_count, reason=facts.gpu_reason,
                               arch=gpu.arch, compute_capability=gpu.compute_capability, vram_gb=gpu.vram_gb)
    return Plan(profile.name, loaded.file, hardware, servers)
