"""Shared rule machinery: a context of resolved facts and an ordered list of small rules.

Each engine module exposes RULES: a list of functions `rule(ctx) -> Flag | list[Flag] | None`.
A rule decides one thing and writes its reason next to the value. Facts come from
catalog/engines.yaml (ctx.caps) and catalog/gpus.yaml (ctx.gpu); syntax lives in the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.catalog import Gpu
from orchestrator.errors import Problem
from orchestrator.facts.types import EngineVersion, ModelFacts
from orchestrator.plan.budget import Budget
from orchestrator.plan.model import ApiKey, EnvVar, Flag, Mount
from orchestrator.profile import Profile, Server


@dataclass
class Offload:
    """Where the weights go, decided once by the planner for GGUF engines."""

    mode: str              # cpu | all | moe_all | moe_layers | layers
    reason: str
    layers: int | None = None      # -ngl for mode=layers, -ncmoe N for moe_layers


@dataclass
class Ctx:
    profile: Profile
    server: Server
    index: int                     # position in profile.servers (for error paths)
    engine: str
    caps: dict[str, Any]
    gpu: Gpu
    gpu_count: int
    facts: ModelFacts
    draft: ModelFacts | None
    model_arg: str                 # path or hf reference as the process sees it
    model_container: str | None    # path inside a container (None: same / hf)
    draft_arg: str | None
    draft_container: str | None
    kv_cache: str                  # resolved: f16 | bf16 | q8_0 | q4_0 | fp8_e4m3 | ...
    kv_reason: str
    offload: Offload
    served_name: str
    api_key: ApiKey | None = None
    version: EngineVersion | None = None  # the engine version the plan targets (set by the planner)
    swa_full: str | None = None    # llama.cpp: keep sliding-window layers' KV whole (the reason), or None
    fa_on: bool = True             # GGUF engines: FlashAttention on (decided by the planner, read by rules)
    mem_fraction: float | None = None  # vLLM/SGLang: the share of GPU memory, set by the memory_fraction rule
    mem_reserve: int | None = None     # SGLang: bytes it keeps outside that share on all its GPUs (None: inside)
    ubatch: int = 512              # GGUF engines: the micro-batch (-ub) the planner chose and the fit counts
    mounts: list[Mount] = field(default_factory=list)  # host folders a container needs (model, draft)
    share: Budget | None = None    # what the other servers on its GPUs leave it (None: it has them to itself)
    tools: Any = None              # plan.decisions.ToolParsers: vLLM/SGLang tool-call/reasoning parsers (None: none)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return self.server.nodes

    @property
    def total_gpus(self) -> int:
        """GPUs the server uses over all its nodes."""
        return self.gpu_count * self.server.nodes

    @property
    def on_cpu(self) -> bool:
        return self.gpu.is_cpu

    @property
    def cc(self) -> tuple[int, int] | None:
        return self.gpu.cc

    @property
    def spec(self) -> str:
        return self.server.speculative.method

    def path(self, *parts: str | int) -> tuple[str | int, ...]:
        return ("servers", self.index, *parts)

    def error(self, field_path: tuple[str | int, ...], message: str, hint: str) -> None:
        self.problems.append(Problem(self.path(*field_path), message, hint))


# A LeaderWorkerSet sets these in every pod of a group; the kubelet expands $(VAR) in args.
LWS_LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"
LWS_WORKER_INDEX = "$(LWS_WORKER_INDEX)"
NODE_RANK_WHY = "this pod's index in its LeaderWorkerSet group (0 = the leader, which serves the API)"

Out = Flag | EnvVar
Rule = Callable[[Ctx], "Out | list[Out] | list[Flag] | None"]


def run_rules(rules: Iterable[Rule], ctx: Ctx) -> tuple[list[Flag], list[EnvVar]]:
    flags: list[Flag] = []
    env: list[EnvVar] = []
    for rule in rules:
        out = rule(ctx)
        if out is None:
            continue
        for item in out if isinstance(out, list) else [out]:
            if isinstance(item, Flag):
                flags.append(item)
            else:
                env.append(item)
    return flags, env


def api_key_file(ctx: Ctx) -> Flag | None:
    """Engines without an API-key env var get the key in a 0600 file (ik_llama) or config (SGLang)."""
    key = ctx.api_key
    if key is None or key.file_flag is None:
        return None
    what = "API key file" if key.mechanism == "file" else "config file holding the API key"
    return Flag(key.file_flag, key.process_path,
                f"{what}, written 0600 from ${key.env_var} at start: the key never appears in argv",
                container_value=key.container_path)


def api_key_env(ctx: Ctx) -> EnvVar | None:
    key = ctx.api_key
    if key is None or key.engine_env is None:
        return None
    return EnvVar(key.engine_env, None, f"API key from ${key.env_var}, passed by environment (never in argv)",
                  from_env=key.env_var)


def user_args(ctx: Ctx) -> list[Flag]:
    """extra_args are passed verbatim and labelled as the user's."""
    return [Flag("", arg, "extra_args from the profile (passed verbatim)", "user")
            for arg in ctx.server.extra_args]


def bind_host(ctx: Ctx) -> Flag:
    return Flag("--host", ctx.server.host,
                f"clients reach it on {ctx.server.host}; in a container the server binds all "
                "interfaces and the runtime publishes the port on the profile host",
                container_value="0.0.0.0")  # noqa: S104 - inside a container; published on the profile host


def port(ctx: Ctx) -> Flag:
    return Flag("--port", str(ctx.server.port), "from the profile" if ctx.server.port else "default")


def memory_fraction(ctx: Ctx, flag: str, default: float, default_why: str, inside: bool = True) -> Flag | None:
    """vLLM --gpu-memory-utilization / SGLang --mem-fraction-static, from the memory estimate. Alone on its
    GPUs: nothing, when the engine's own default (default, described by default_why) holds weights +
    activations (vLLM; SGLang keeps those outside: inside=False) + one full-length sequence of KV; else
    raised to what that needs (up to 0.95). Sharing GPUs: what the per-GPU budget leaves it
    (plan/budget.py), and the fit estimate says when that cannot hold one sequence."""
    import math

    from orchestrator.plan.fit import hf_required_fraction
    from orchestrator.plan.model import GIB

    if ctx.on_cpu:
        return None
    if ctx.share is not None and ctx.share.pool_fraction is not None:
        frac = min(default, ctx.share.pool_fraction)
        ctx.mem_fraction = frac
        return Flag(flag, f"{frac:.2f}", f"{ctx.share.why}: {frac:.2f} of each GPU's memory, its part of the "
                    f"default share ({default_why}) after the other servers on them")
    device = int(ctx.gpu.vram_gb * GIB) * max(ctx.total_gpus, 1)
    need = hf_required_fraction(ctx.facts, ctx.server.context, ctx.kv_cache, device, ctx.total_gpus, inside)
    if need is not None and default < need + 0.01 <= 0.95:
        frac = math.ceil((need + 0.01) * 100) / 100
        ctx.mem_fraction = frac
        if not inside:   # a pinned fraction: SGLang sizes nothing else; count the activations planned for vLLM
            from orchestrator.plan.fit import ACTIVATION_BYTES

            ctx.mem_reserve = ACTIVATION_BYTES * max(ctx.total_gpus, 1)
        return Flag(flag, f"{frac:.2f}", f"weights{', activations' if inside else ''} and the KV of one "
                    f"{ctx.server.context}-token sequence need {need:.0%} of {device / GIB:.0f} GiB: raised from "
                    f"the default {default_why}")
    ctx.mem_fraction = default
    ctx.notes.append(f"{flag} left to {ctx.caps['display']}: its default {default_why} holds the weights and "
                     f"the KV of a {ctx.server.context}-token sequence")
    return None
