"""Per-GPU memory: servers that share a GPU are planned against what the others leave.

A GPU is shared by the servers whose `gpus` overlap (`gpus: all` is every GPU of the machine, so on a
one-GPU machine every server shares it). GGUF servers (llama.cpp, ik_llama) are sized in profile order,
each against what the GGUF servers before it and the smallest share of every vLLM/SGLang server on the
same GPU leave: an earlier server keeps its layers on the GPU, a later one with `offload: auto` moves
experts or layers to system RAM to fit what is left. vLLM and SGLang take a fixed fraction of each GPU
at start and grow their KV pool into it, so they are planned last and split what is left of their
default share, never less than weights + activations + the KV of one full-length sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from orchestrator.catalog import GGUF_ENGINES, Gpu
from orchestrator.facts.types import ModelFacts
from orchestrator.plan import fit
from orchestrator.plan.model import GIB, GpuBudget, GpuShare, ServerPlan
from orchestrator.profile import Server

POOL_ENGINES = ("vllm", "sglang")
# The share of each GPU that vLLM / SGLang servers sharing it split between them: vLLM's default
# --gpu-memory-utilization (0.92 in 0.32.0); SGLang's fraction is what is left of that after the
# activations and CUDA graphs it keeps outside it (fit.sglang_reserved_bytes).
POOL_SHARE = 0.92


@dataclass(frozen=True)
class Budget:
    """What one server that shares a GPU is planned against."""

    available_bytes: int | None    # GGUF: GPU memory left for it, summed over its GPUs
    pool_fraction: float | None    # vLLM/SGLang: the most it may take of each of its GPUs
    why: str                       # "beside chat on GPU 0": for the reasons of the flags it changes


def gpus_of(server: Server, gpu: Gpu, gpu_count: int) -> tuple[int, ...]:
    """The GPUs of this machine the server uses (none on CPU, and none for a multi-node server: each of
    its nodes is a machine of its own)."""
    if gpu.is_cpu or server.nodes > 1:
        return ()
    if server.gpus == "all":
        return tuple(range(gpu_count))
    return tuple(g for g in server.gpus if g < gpu_count)


def sglang_reserve(server: Server, gpu: Gpu, gpus: int) -> int:
    """Bytes SGLang keeps outside --mem-fraction-static on each GPU."""
    return fit.sglang_reserved_bytes(int(gpu.working_set_gb * GIB), max(gpus, 1), server.parallel)


def pool_minimum(server: Server, kv: str, gpu: Gpu, model: ModelFacts, gpus: int, engine: str = "vllm") -> int:
    """Bytes per GPU a vLLM/SGLang server cannot start with less of: weights + activations + the KV of one
    sequence of the profile's context (both engines refuse to start when the pool cannot hold it), and
    the fit margin beside it (vLLM checks at start that its whole share is free)."""
    device = int(gpu.working_set_gb * GIB) * max(gpus, 1)
    sglang = engine == "sglang"
    need = fit.hf_required_fraction(model, server.context, kv, device, gpus, activations_inside=not sglang)
    if need is None:
        return 0
    frac = math.ceil(need * 100 + 1) / 100   # the fraction is written in hundredths, rounded down from what is left
    outside = sglang_reserve(server, gpu, gpus) if sglang else 0
    return math.ceil(frac * device / max(gpus, 1)) + outside + fit.FIT_MARGIN_BYTES


class Ledger:
    """The servers planned so far on each GPU, and the shares reserved for vLLM/SGLang servers to come."""

    def __init__(self, gpu: Gpu, count: int, servers: list[Server]) -> None:
        self.gpu = gpu
        self.servers = servers
        self.gpus = {i: GpuBudget(i, gpu.name, int(gpu.working_set_gb * GIB)) for i in range(count)}
        # An on-demand server is planned as if it had its GPUs to itself: the gateway starts it only when
        # what runs leaves it room (gateway: memory_budget), so it never counts toward the others' share.
        self.used = [() if s.start == "on_demand" else gpus_of(s, gpu, count) for s in servers]
        self.reserved: dict[int, dict[int, int]] = {}   # server index -> GPU -> bytes
        self.pool_min: dict[int, dict[int, int]] = {}   # vLLM/SGLang servers: the least they start with

    def sharing(self, index: int) -> list[int]:
        """The other servers on any GPU of this one, in profile order."""
        mine = set(self.used[index])
        return [j for j, theirs in enumerate(self.used) if j != index and mine & set(theirs)]

    def left(self, g: int, index: int) -> int:
        """What GPU g has for server `index`: its memory less the shares planned and reserved by the others."""
        held = sum(r.get(g, 0) for j, r in self.reserved.items() if j != index)
        return self.gpus[g].total_bytes - self.gpus[g].used_bytes - held

    def where(self, index: int) -> str:
        """'left by chat on GPU 0' / 'of GPU 0, shared with coder (planned after it)'."""
        gpus = self.used[index]
        on = f"GPU{'s' if len(gpus) > 1 else ''} {', '.join(map(str, gpus))}"
        before = {s.server for g in gpus for s in self.gpus[g].shares}
        before |= {self.servers[j].name for j in self.reserved if j != index and set(self.used[j]) & set(gpus)}
        names = [self.servers[j].name for j in self.sharing(index)]
        if not before:
            return f"of {on}, shared with {', '.join(names)} (planned after it)"
        return f"left by {', '.join(n for n in names if n in before)} on {on}"

    def gguf_budget(self, index: int) -> Budget:
        return Budget(sum(max(self.left(g, index), 0) for g in self.used[index]), None, self.where(index))

    def pool_budget(self, index: int, engine: str, engines: list[str]) -> Budget:
        """Split what is left of the pool share of each GPU between the vLLM/SGLang servers on it: each
        gets the least it can start with, and an even part of the rest."""
        gpus = self.used[index]
        outside = sglang_reserve(self.servers[index], self.gpu, len(gpus)) if engine == "sglang" else 0
        shares = []
        for g in gpus:
            total = self.gpus[g].total_bytes
            held = sum(s.bytes + s.margin_bytes for s in self.gpus[g].shares
                       if engines[self._index(s.server)] not in POOL_ENGINES)
            pools = [j for j, gs in enumerate(self.used) if g in gs and engines[j] in POOL_ENGINES]
            room = min(POOL_SHARE * total, total - held - fit.FIT_MARGIN_BYTES) if held else POOL_SHARE * total
            least = {j: self.pool_min.get(j, {}).get(g, 0) for j in pools}
            spare = max(room - sum(least.values()), 0) / max(len(pools), 1)
            mine = least.get(index, 0) + spare if sum(least.values()) <= room else room / max(len(pools), 1)
            shares.append((mine - outside) / total)
        # at least 0.01, a value both engines take: a share that small only comes with --ignore-fit
        frac = max(math.floor(max(min(shares), 0.0) * 100) / 100, 0.01)
        names = ", ".join(self.servers[j].name for j in self.sharing(index))
        return Budget(None, frac, f"shares GPU{'s' if len(gpus) > 1 else ''} {', '.join(map(str, gpus))} with {names}")

    def _index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.servers) if s.name == name)

    def claim(self, index: int, sp: ServerPlan) -> None:
        """Book what the planned server takes on each of its GPUs."""
        self.reserved.pop(index, None)
        gpus = self.used[index]
        if not gpus or sp.estimate is None:
            return
        for g, (share, margin) in self.split(index, sp).items():
            self.gpus[g].shares.append(GpuShare(sp.name, share, margin))

    def split(self, index: int, sp: ServerPlan) -> dict[int, tuple[int, int]]:
        """Bytes and margin the server takes on each GPU: vLLM/SGLang their fraction of each; GGUF
        engines in proportion to what each GPU had left (llama.cpp's default split follows free memory)."""
        gpus = self.used[index]
        est = sp.estimate
        assert est is not None
        if sp.engine not in GGUF_ENGINES:
            frac = sp.settings.memory_fraction if sp.settings and sp.settings.memory_fraction else POOL_SHARE
            outside = est.compute_bytes // max(len(gpus), 1) if sp.engine == "sglang" else 0
            # SGLang rounds its own default to 3 decimals, which can pass the card by a few MiB
            return {g: (min(int(frac * self.gpus[g].total_bytes) + outside, self.gpus[g].total_bytes), 0)
                    for g in gpus}
        room = {g: max(self.left(g, index), 1) for g in gpus}
        total = sum(room.values())
        return {g: (est.total_bytes * room[g] // total, fit.FIT_MARGIN_BYTES * room[g] // total) for g in gpus}

    def used_budgets(self) -> list[GpuBudget]:
        return [b for b in self.gpus.values() if b.shares]


def need_bytes(sp: ServerPlan, pool_min: int) -> tuple[int, int]:
    """What a server asks of one GPU when it has it to itself: (bytes, margin)."""
    est = sp.estimate
    if sp.engine in GGUF_ENGINES and est is not None:
        n = max(sp.gpu_count, 1)
        return est.total_bytes // n, fit.FIT_MARGIN_BYTES // n
    return max(pool_min - fit.FIT_MARGIN_BYTES, 0), fit.FIT_MARGIN_BYTES


def over_commit(gpu: GpuBudget, name: str, need: tuple[int, int]) -> str:
    """'GPU 0 (NVIDIA GeForce RTX 3090, 24.00 GiB) cannot hold coder 19.20 GiB + chat 4.78 GiB = ... GiB'."""
    shares = [*gpu.shares, GpuShare(name, *need)]
    parts = " + ".join(f"{s.server} {(s.bytes + s.margin_bytes) / GIB:.2f} GiB" for s in shares)
    total = sum(s.bytes + s.margin_bytes for s in shares)
    margins = sum(s.margin_bytes for s in shares)
    with_margin = f", {margins / GIB:.2f} GiB of it fit margin" if margins else ""
    return (f"GPU {gpu.index} ({gpu.name}, {gpu.total_bytes / GIB:.2f} GiB) cannot hold its servers: {parts} = "
            f"{total / GIB:.2f} GiB{with_margin} (profile order: {name} is planned against what the servers "
            "before it leave)")
