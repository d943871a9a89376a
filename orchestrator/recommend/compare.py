"""GPUs side by side for one model: VRAM, bandwidth, the plan's fit verdict, predicted batch-1
speed, watts and tokens per joule at the card's TDP (measured power where bench saved it), and
which catalog models fit on each. Pure, like rank.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import catalog
from orchestrator.catalog import Gpu, ModelEntry
from orchestrator.plan.speed import Efficiency, Host
from orchestrator.recommend.rank import Row, evaluate

FITS_QUANT = "Q4_K_M"   # the quant "what fits" is judged at


@dataclass
class Measured:
    """Power bench saved for this GPU: mean watts over the run and joules per output token."""

    watts: float
    joules_per_token: float | None
    runs: int
    basis: str


@dataclass
class GpuRow:
    gpu: str
    name: str
    vram_gb: float
    bandwidth_gbs: float | None
    fp16_tflops: float | None
    tdp_w: float | None
    row: Row
    tokens_per_joule_tdp: float | None    # decode tok/s / TDP watts: a lower bound (batch 1 rarely draws TDP)
    measured: Measured | None
    fits: list[str] = field(default_factory=list)   # catalog models that fit entirely on the GPU at FITS_QUANT

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("row")
        d.update({"verdict": self.row.verdict, "memory": self.row.memory, "engine": self.row.engine,
                  "flags": self.row.flags, "speed": self.row.speed.as_dict() if self.row.speed else None})
        return d


def fitting_models(gpu: Gpu, count: int, context: int, host: Host, host_ram_bytes: int | None) -> list[str]:
    out = []
    for entry in catalog.models():
        row = evaluate(entry, FITS_QUANT, gpu, count, context, host, host_ram_bytes)
        if row.verdict == "fits":
            out.append(entry.name)
    return out


def compare(gpus: list[Gpu], entry: ModelEntry, quant: str, context: int, host: Host, host_ram_bytes: int | None,
            count: int = 1, efficiencies: dict[str, dict[str, Efficiency]] | None = None,
            power: dict[str, Measured] | None = None) -> list[GpuRow]:
    """One row per GPU. efficiencies: per GPU id, per engine (calibration); power: per GPU id."""
    rows = []
    for gpu in gpus:
        row = evaluate(entry, quant, gpu, count, context, host, host_ram_bytes, (efficiencies or {}).get(gpu.id))
        decode = row.speed.decode_tps if row.speed else None
        tpj = round(decode / (gpu.tdp_w * max(count, 1)), 3) if decode and gpu.tdp_w else None
        rows.append(GpuRow(gpu.id, gpu.name, gpu.vram_gb, gpu.bandwidth_gbs, gpu.fp16_tflops, gpu.tdp_w, row, tpj,
                           (power or {}).get(gpu.id), fitting_models(gpu, count, context, host, host_ram_bytes)))
    return rows
