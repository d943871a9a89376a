"""This machine's measured efficiency from saved `orchestrate bench` runs: what share of the decode
and prefill rooflines an engine reached here. Pure: the caller reads the results file
(measure.bench.saved) and passes its entries in; a factor measured here beats the default, and the
Efficiency's basis says which runs it came from."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from orchestrator.plan.speed import Efficiency, default_efficiency


@dataclass(frozen=True)
class Share:
    """One saved server result: its engine, device, model and the shares of both rooflines."""

    time: str
    engine: str
    gpu: str
    model: str
    decode: float | None
    prefill: float | None
    bandwidth_gbs: float | None = None     # what the rooflines were computed with (CPU: measured then)
    tflops: float | None = None


def _gpu_of(server: dict[str, Any]) -> str | None:
    if server.get("gpu"):
        return str(server["gpu"])
    source = str((server.get("roofline") or {}).get("bandwidth_source", ""))
    return "cpu" if source.startswith("measured on this machine") else None   # saved before runs named the GPU


def _first_level(server: dict[str, Any]) -> dict[str, Any]:
    levels = server.get("levels") or []
    return levels[0] if levels and levels[0].get("concurrency") == 1 else {}


def shares(entries: list[dict[str, Any]], host: str) -> list[Share]:
    """The roofline shares of every saved bench server result measured on `host`, oldest first.
    Engine timings (server_*_tps) are preferred to the client's: they leave out HTTP and tokenizer time."""
    out: list[Share] = []
    for entry in entries:
        if entry.get("kind", "bench") != "bench" or entry.get("host") != host:
            continue
        for server in entry.get("servers") or []:
            rf = server.get("roofline") or {}
            level = _first_level(server)
            gpu = _gpu_of(server)
            if not rf or not level or gpu is None:
                continue
            decode = level.get("server_decode_tps") or level.get("decode_tps")
            prefill = level.get("server_prefill_tps") or level.get("prefill_tps")
            d = decode / rf["roofline_tps"] if decode and rf.get("roofline_tps") else None
            p = prefill / rf["prefill_roofline_tps"] if prefill and rf.get("prefill_roofline_tps") else None
            if d or p:
                out.append(Share(str(entry.get("time", "")), str(server.get("engine", "")), gpu,
                                 str(server.get("model", "")), d, p, rf.get("bandwidth_gbs"),
                                 rf.get("compute_tflops")))
    return out


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def efficiency(engine: str, gpu: str, accelerator: str, measured: list[Share], host: str,
               source: str = "saved bench results") -> Efficiency:
    """The median shares of this engine's runs on this device here, where there are any; else the
    default for its backend. Each factor falls back on its own (a run may lack a prefill figure)."""
    base = default_efficiency(engine, accelerator)
    mine = [s for s in measured if s.engine == engine and s.gpu == gpu]
    decode = [s.decode for s in mine if s.decode]
    prefill = [s.prefill for s in mine if s.prefill]
    if not decode and not prefill:
        return base
    models = sorted({s.model for s in mine})
    parts = []
    if decode:
        parts.append(f"decode {statistics.median(decode):.3f} (median of {len(decode)}, {_spread(decode)})")
    else:
        parts.append(f"decode {base.decode:g} (default: no decode figure saved)")
    if prefill:
        parts.append(f"prefill {statistics.median(prefill):.3f} (median of {len(prefill)}, {_spread(prefill)})")
    else:
        parts.append(f"prefill {base.prefill:g} (default: no prefill roofline saved)")
    basis = (f"calibrated on {host} from {len(mine)} saved {engine} run(s) on {gpu} ({', '.join(models)}; "
             f"{source}): " + "; ".join(parts))
    bws = [s.bandwidth_gbs for s in mine if s.decode and s.bandwidth_gbs]
    tfs = [s.tflops for s in mine if s.prefill and s.tflops]
    on_cpu = gpu == "cpu"
    if on_cpu and (bws or tfs):
        basis += " — applied to the host figures measured during those runs"
    return Efficiency(round(statistics.median(decode), 3) if decode else base.decode,
                      round(statistics.median(prefill), 3) if prefill else base.prefill, basis, True,
                      round(statistics.median(bws), 2) if on_cpu and bws and decode else None,
                      round(statistics.median(tfs), 4) if on_cpu and tfs and prefill else None)
