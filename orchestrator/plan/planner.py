"""plan(profile, facts) -> Plan. Pure: no subprocess, no socket, no file is opened here; every fact a
rule needs (hardware, model, the installed engine's version and options) was gathered before, in
facts.gather, and the pipeline (orchestrator/pipeline.py) is where the two meet.

Decisions shared by every engine live in plan/decisions.py, impossible combinations in
plan/checks.py, engine-specific flags in the rule lists of plan/engines/.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType

from orchestrator import catalog
from orchestrator.catalog import GGUF_ENGINES, Gpu
from orchestrator.errors import Problem, ProfileError
from orchestrator.facts.types import EngineVersion, Facts, ModelFacts
from orchestrator.plan import budget, fit
from orchestrator.plan.budget import Budget
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
    tool_parsers,
)
from orchestrator.plan.engines import ik_llama, llama_cpp, sglang, vllm
from orchestrator.plan.engines.base import Ctx, Offload, run_rules
from orchestrator.plan.gateway import check_gateway, plan_gateway
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
from orchestrator.profile.secrets import looks_like_secret

ENGINE_MODULES: dict[str, ModuleType] = {"llama.cpp": llama_cpp, "ik_llama": ik_llama, "vllm": vllm, "sglang": sglang}


def flash_attention_on(engine: str, on_cpu: bool, parallel: int, model: ModelFacts) -> bool:
    """Whether the engine's rules turn FlashAttention on (the fit estimate counts its buffers): an
    engine module that cannot run it somewhere says so in its flash_attention_breaks()."""
    breaks = getattr(ENGINE_MODULES[engine], "flash_attention_breaks", None)
    return not (breaks is not None and breaks(on_cpu, parallel, model))


def _runtime_gib(server: Server, engine: str, model: ModelFacts, kv: str, fa_on: bool, swa_full: bool,
                 n_ubatch: int = fit.N_UBATCH) -> float:
    """KV cache + compute buffers that must sit beside the weights (GGUF engines)."""
    if engine not in GGUF_ENGINES or not model.metadata.get("block_count"):
        return 0.0
    return (fit.kv_cache_bytes(model, engine, server.context, server.parallel, kv, n_ubatch, swa_full=swa_full)
            + fit.compute_bytes(model, engine, server.context, server.parallel, fa_on, n_ubatch,
                                swa_full=swa_full)) / GIB


OFFLOAD_UBATCH = 2048


def _offload_ubatch(server: Server, engine: str, model: ModelFacts, kv: str, fa_on: bool, offload: Offload,
                    decide: Callable[[float], Offload]) -> int:
    """With experts or layers in system RAM, prefill copies those weights to the GPU once per micro-batch
    (llama.cpp PR #13386, ik PR #520): a 2048-token -ub spreads that copy over 4x the tokens. Taken only
    when its larger compute buffer still fits the same placement (decide: the offload decision for a
    given KV + compute size)."""
    if offload.mode not in ("moe_all", "moe_layers", "layers"):
        return fit.N_UBATCH
    wider = decide(_runtime_gib(server, engine, model, kv, fa_on, False, OFFLOAD_UBATCH))
    return OFFLOAD_UBATCH if (wider.mode, wider.layers) == (offload.mode, offload.layers) else fit.N_UBATCH


def _default_name(server: Server, facts: Facts) -> str:
    model = facts.models.get(server.name)
    if server.model.hf:
        return server.model.hf.split(":")[0]
    return model.name.removesuffix(".gguf") if model else server.name


def served_name(profile: Profile, index: int, facts: Facts) -> str:
    """The model name clients use: the profile's served_name, else the file's stem (or the hf repo). Where
    that default is already another server's name (two servers of one file: an endpoint that serves
    several, llama-swap, routes by this name), it gets the server's name appended."""
    server = profile.servers[index]
    if server.model.served_name:
        return server.model.served_name
    stem = _default_name(server, facts)
    taken = {s.model.served_name for s in profile.servers if s.model.served_name}
    taken |= {_default_name(s, facts) for s in profile.servers[:index] if not s.model.served_name}
    return f"{stem}-{server.name}" if stem in taken else stem


def _context(profile: Profile, index: int, facts: Facts, engine: str, version: EngineVersion,
             share: Budget | None = None) -> Ctx:
    """Every shared decision for one server, made once, in the order they depend on each other.
    share: what the other servers on its GPUs leave it (None: it has its GPUs to itself)."""
    server = profile.servers[index]
    model = facts.models[server.name]
    caps = catalog.engine(engine)
    draft = facts.drafts.get(server.name)
    gpu = facts.gpu
    gpu_count = 0 if gpu.is_cpu else (facts.gpu_count if server.gpus == "all" else len(server.gpus))
    kv, kv_reason = resolve_kv(server, engine, gpu)
    fa_on = flash_attention_on(engine, gpu.is_cpu, server.parallel, model)
    available = share.available_bytes if share else None

    def decide(runtime: float) -> Offload:
        return decide_offload(server, engine, gpu, max(gpu_count, 1), model, runtime, available,
                              share.why if share else "")

    offload = decide(_runtime_gib(server, engine, model, kv, fa_on, False))
    ubatch = _offload_ubatch(server, engine, model, kv, fa_on, offload, decide)
    full = _runtime_gib(server, engine, model, kv, fa_on, True)
    swa_full = decide_swa_full(server, engine, gpu, facts.host_ram_bytes, model, gpu_count, kv, fa_on, offload, full,
                               full - _runtime_gib(server, engine, model, kv, fa_on, False), available)
    model_c, draft_c, mounts = container_paths(server, model, draft)
    if server.model.hf:
        model_arg = server.model.hf if engine != "vllm" else server.model.hf.split(":")[0]
    else:
        model_arg = model.location
    served = served_name(profile, index, facts)
    tools, tools_note = tool_parsers(server, engine, model, version.version, caps)
    return Ctx(profile=profile, server=server, index=index, engine=engine, caps=caps, gpu=gpu,
               gpu_count=gpu_count, facts=model, draft=draft, model_arg=model_arg, model_container=model_c,
               draft_arg=draft.location if draft else None, draft_container=draft_c, kv_cache=kv,
               kv_reason=kv_reason, offload=offload, served_name=served,
               api_key=api_key(server, engine, profile, facts.state_dir), version=version, swa_full=swa_full,
               fa_on=fa_on, mounts=mounts, share=share, tools=tools, notes=[tools_note] if tools_note else [],
               ubatch=ubatch)


def _executable_warnings(ctx: Ctx, facts: Facts) -> None:
    found = facts.executables.get(ctx.server.name)
    caps = ctx.caps
    if found is None:
        return
    if not found.probed:
        ctx.notes.append(f"binary {found.path} from the profile was not run, so its version and options were not "
                         "checked: validate, plan and render never execute a profile's program; `up` checks them "
                         "before it starts anything")
    elif not found.usable:
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
    return env + [_user_env(ctx, k, v) for k, v in sorted(server.env.items())]


_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def _user_env(ctx: Ctx, name: str, value: str) -> EnvVar:
    """An env entry of the profile: `${VAR}` stays a reference (taken from VAR where the server starts,
    never written into the plan or a rendered file); a literal that looks like a secret is kept, with a
    warning that it is now in every rendered file."""
    ref = _REFERENCE.match(value)
    if ref:
        return EnvVar(name, None, f"env from the profile, taken from ${ref.group(1)} where it starts",
                      from_env=ref.group(1))
    if looks_like_secret(value):
        ctx.warnings.append(f"env {name} holds a value that looks like a secret ({len(value)} characters): it is "
                            f"written into the plan, every rendered file and the plan cache; write {name}: "
                            f"'${{{name}}}' and export {name} instead")
    return EnvVar(name, value, "env from the profile")


def _executable(facts: Facts, name: str) -> Executable | None:
    found = facts.executables.get(name)
    return Executable(found.path, found.how, found.version, found.usable) if found else None


def unified_memory_warning(ctx: Ctx, gpu: Gpu, estimate: FitEstimate) -> None:
    """Apple silicon, DGX Spark (GB10), Strix Halo: "system RAM" is the same memory as the GPU's, so
    weights moved off the GPU still come out of the pool the GPU part already uses."""
    if gpu.form != "integrated" or gpu.is_cpu or not estimate.host_bytes:
        return
    on_gpu, on_host, pool = estimate.total_bytes / GIB, estimate.host_bytes / GIB, gpu.vram_gb
    over = f", more than its {pool:g} GB" if on_gpu + on_host > pool else f" of its {pool:g} GB"
    ctx.warnings.append(f"{gpu.name} has unified memory: the {on_host:.1f} GiB offloaded to system RAM and the "
                        f"{on_gpu:.1f} GiB on the GPU share one pool ({on_gpu + on_host:.1f} GiB{over}, before the "
                        "OS and other programs); a smaller model, quant or context keeps more of it on the GPU")


def _does_not_fit(index: int, estimate: FitEstimate) -> Problem:
    need = estimate.total_bytes / GIB
    have = (estimate.available_bytes or 0) / GIB
    fixes = "; ".join(f"{c.change} (saves {c.saves_bytes / GIB:.1f} GiB)" for c in estimate.changes[:3])
    return Problem(("servers", index), f"does not fit: needs ~{need:.1f} GiB on the {estimate.device}, "
                   f"{have:.1f} GiB available", (fixes + "; " if fixes else "")
                   + "or pass --ignore-fit to plan anyway (orchestrate fit shows the breakdown)")


def plan_server(profile: Profile, index: int, facts: Facts, enforce_fit: bool = True,
                share: Budget | None = None) -> tuple[ServerPlan | None, list[Problem]]:
    server = profile.servers[index]
    model = facts.models.get(server.name)
    if model is None:
        return None, []
    engine, engine_reason = choose_engine(server, facts.gpu, model)
    version = facts.versions.get(server.name) or EngineVersion(
        engine, str(catalog.engine(engine)["verified_version"]), "catalog default: not looked up")
    ctx = _context(profile, index, facts, engine, version, share)
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
                               ctx.offload, ctx.fa_on, ctx.mem_fraction, bool(ctx.swa_full),
                               share.available_bytes if share else None, ctx.mem_reserve, ctx.ubatch)
    if server.nodes > 1:
        estimate.device = f"{total_gpus} GPUs of {server.nodes} nodes"
    unified_memory_warning(ctx, facts.gpu, estimate)
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
        start=server.start, idle_timeout_s=server.idle_timeout,
    )
    apply_lock(sp, facts.locks.get(server.name))
    return sp, []


def _planning_order(profile: Profile, facts: Facts, ledger: budget.Ledger) -> list[str]:
    """Each server's engine; vLLM/SGLang servers that share a GPU reserve the least they can start with,
    so the GGUF servers planned before them leave it."""
    engines = []
    for i, server in enumerate(profile.servers):
        model = facts.models.get(server.name)
        engine = choose_engine(server, facts.gpu, model)[0] if model else str(server.engine)
        engines.append(engine)
        if engine in budget.POOL_ENGINES and model is not None and ledger.sharing(i):
            kv, _ = resolve_kv(server, engine, facts.gpu)
            gpus = ledger.used[i]
            ledger.reserved[i] = {g: budget.pool_minimum(server, kv, facts.gpu, model, len(gpus), engine)
                                  for g in gpus}
            ledger.pool_min[i] = dict(ledger.reserved[i])
    return engines


def _reorder_fix(profile: Profile, facts: Facts, ledger: budget.Ledger, index: int, need: int,
                 planned: dict[int, ServerPlan]) -> str | None:
    """An earlier GGUF server with offload: auto that would still fit if this one were listed first."""
    name = profile.servers[index].name
    for j in ledger.sharing(index):
        sp = planned.get(j)
        if sp is None or sp.engine not in GGUF_ENGINES or profile.servers[j].offload != "auto":
            continue
        gpus = ledger.used[j]
        held = sum(s.bytes + s.margin_bytes for g in gpus for s in ledger.gpus[g].shares if s.server == sp.name)
        room = held + sum(max(ledger.left(g, index), 0) for g in gpus) - need * len(gpus)
        moved, _ = plan_server(profile, j, facts, False, Budget(room, None, f"beside {name}"))
        if moved is not None and moved.estimate and moved.estimate.verdict != "does not fit":
            return (f"list {name} before {sp.name} in servers: ({sp.name} has offload: auto and then moves "
                    f"{moved.estimate.offload or 'more of its weights to system RAM'})")
    return None


def _own_changes(profile: Profile, facts: Facts, index: int, sp: ServerPlan) -> list[tuple[str, int]]:
    est, server = sp.estimate, profile.servers[index]
    model = facts.models.get(server.name)
    if est is None or model is None or sp.engine not in GGUF_ENGINES:
        return [(f"{sp.name}: {c.change}", c.saves_bytes) for c in (est.changes if est else [])]
    experts = int(model.metadata.get("tensors.expert_bytes") or 0) if server.offload == "none" else 0
    kv = sp.settings.kv_cache if sp.settings else "f16"
    changes = fit.suggest(model, sp.engine, server.context, server.parallel, kv, est.kv_cache_bytes,
                          est.weights_bytes, experts)
    return [(f"{sp.name}: {c.change}", c.saves_bytes) for c in changes]


def _over_commit(profile: Profile, facts: Facts, ledger: budget.Ledger, index: int, sp: ServerPlan,
                 planned: dict[int, ServerPlan], engines: list[str]) -> Problem:
    """The error for a server that does not fit beside the servers planned before it on a shared GPU:
    the GPU, each server's share, the total, and the cheapest fixes."""
    g = min(ledger.used[index], key=lambda x: ledger.left(x, index))
    alone, _ = plan_server(profile, index, facts, False, None)
    pool_min = ledger.reserved.get(index, {}).get(g, 0)
    need = budget.need_bytes(alone or sp, pool_min)
    gpu = ledger.gpus[g]
    over = gpu.used_bytes + sum(need) + sum(r.get(g, 0) for j, r in ledger.reserved.items() if j != index) \
        - gpu.total_bytes
    changes = _own_changes(profile, facts, index, alone or sp)
    for j in ledger.sharing(index):
        if j in planned:
            changes += _own_changes(profile, facts, j, planned[j])
    enough = [c for c in changes if c[1] >= over] or sorted(changes, key=lambda c: -c[1])
    fixes = [f"{c} (saves {saved / GIB:.1f} GiB)" for c, saved in enough[:3]]
    reorder = (_reorder_fix(profile, facts, ledger, index, sum(need), planned)
               if engines[index] not in budget.POOL_ENGINES else None)
    fixes = ([reorder] if reorder else []) + fixes + [
        "or start them one at a time on demand (orchestrate render PROFILE --target llama-swap)",
        "or pass --ignore-fit to plan anyway (orchestrate fit shows each GPU's sum)"]
    return Problem(("servers", index), f"does not fit: {budget.over_commit(gpu, sp.name, need)}; "
                   f"{max(over, 0) / GIB:.2f} GiB too much", "; ".join(fixes))


def plan(loaded: LoadedProfile, facts: Facts, enforce_fit: bool = True) -> Plan:
    """Pure: (profile, facts) -> Plan, or ProfileError listing every problem with its line. Servers that
    share a GPU are planned against what the others leave (plan/budget.py)."""
    profile = loaded.profile
    problems = check_profile(profile, facts.gpu, facts.gpu_count) + check_gateway(profile)
    ledger = budget.Ledger(facts.gpu, facts.gpu_count, list(profile.servers))
    engines = _planning_order(profile, facts, ledger)
    order = sorted(range(len(profile.servers)), key=lambda i: engines[i] in budget.POOL_ENGINES)
    planned: dict[int, ServerPlan] = {}
    found: dict[int, list[Problem]] = {}
    warnings: list[str] = []
    for i in order:
        shared = bool(ledger.sharing(i))
        share = None
        if shared:
            share = (ledger.pool_budget(i, engines[i], engines) if engines[i] in budget.POOL_ENGINES
                     else ledger.gguf_budget(i))
        sp, found[i] = plan_server(profile, i, facts, enforce_fit and not shared, share)
        if sp is not None and shared and sp.estimate is not None and sp.estimate.verdict == "does not fit":
            problem = _over_commit(profile, facts, ledger, i, sp, planned, engines)
            if enforce_fit:
                found[i] = [problem]
                continue
            warnings.append(f"{sp.name} {problem.message} (planned anyway: --ignore-fit)")
        if sp is not None:
            ledger.claim(i, sp)
            planned[i] = sp
    for i in range(len(profile.servers)):
        problems += found.get(i, [])
    servers = [planned[i] for i in sorted(planned)]
    gateway, gateway_problems = plan_gateway(profile, facts, servers) if not problems else (None, [])
    problems += gateway_problems
    if problems:
        raise ProfileError([loaded.source.locate(p) for p in problems])
    gpu = facts.gpu
    hardware = HardwareSummary(gpu=gpu.id, name=gpu.name, count=facts.gpu_count, reason=facts.gpu_reason,
                               arch=gpu.arch, compute_capability=gpu.compute_capability, vram_gb=gpu.vram_gb)
    return Plan(profile.name, loaded.file, hardware, servers, warnings, ledger.used_budgets(), gateway)
