"""recommend and gpus --compare: gather the facts (the GPU, this host's bandwidth and FLOPS where the
target is this machine, saved bench results for calibration), call orchestrator.recommend, print."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    from orchestrator.catalog import Gpu, ModelEntry
    from orchestrator.plan.speed import Efficiency, Host
    from orchestrator.recommend.compare import Measured
    from orchestrator.recommend.rank import Row

ENGINES = ("llama.cpp", "ik_llama", "vllm", "sglang")
MIN_CONTEXT = 128   # the profile's lower bound for context


def find_gpu(name: str) -> Gpu:
    from orchestrator import catalog

    try:
        return catalog.find_gpu(name)
    except catalog.UnknownGpu as exc:
        hint = (f"did you mean {', '.join(exc.suggestions)}?" if exc.suggestions
                else "run `orchestrate gpus` for the catalog")
        raise OrchestratorError(f"--gpu {name!r}: unknown GPU", hint) from None


def resolve_gpu(name: str, count: int | None) -> tuple[Gpu, int, bool, str]:
    """(GPU, count, whether it is this machine's, how it was chosen)."""
    if name == "auto":
        from orchestrator.facts.hardware import detect_gpu

        found = detect_gpu()
        if found is None:
            return find_gpu("cpu"), 1, True, "auto: no GPU detected, this machine's CPU"
        gpu, n = found
        return gpu, count or n, True, f"auto: detected {n}x {gpu.name}"
    gpu = find_gpu(name)
    return gpu, count or 1, gpu.is_cpu, f"--gpu {name}"


def check_context(context: int) -> None:
    if context < MIN_CONTEXT:
        raise OrchestratorError(f"--context {context}: a context must be at least {MIN_CONTEXT} tokens",
                                "pass the tokens per sequence you need, e.g. --context 8192")


def find_model(name: str) -> ModelEntry:
    """A catalog model by name or match fragment; one the catalog lacks has no known shape."""
    import difflib

    from orchestrator import catalog

    key = name.lower()
    for entry in catalog.models():
        if entry.name.lower() == key:
            return entry
    found = catalog.find_model(name)
    if found is not None:
        return found
    names = [m.name for m in catalog.models()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    raise OrchestratorError(f"--model {name!r}: no known shape (not in catalog/models.yaml), so memory and speed "
                            "cannot be predicted",
                            (f"did you mean {', '.join(close)}? " if close else "")
                            + "or add it to catalog/models.yaml from its config.json")


def host_facts(here: bool) -> Host:
    """This machine's memory bandwidth and FLOPS, measured now, when the target is this machine;
    otherwise the assumed defaults (plan.speed.Host)."""
    from orchestrator.plan.speed import Host

    if not here:
        return Host()
    from orchestrator.measure.bench import matmul_gflops, memory_bandwidth_gbs

    bw, flops = memory_bandwidth_gbs(), matmul_gflops()
    return Host(round(bw, 1), f"{bw:.1f} GB/s measured on this machine now (parallel reads)",
                round(flops, 1), f"{flops:.1f} GFLOPS measured on this machine now (float32 matmul)")


def _saved() -> tuple[list[dict[str, Any]], str]:
    from orchestrator.paths import state_dir as default_state_dir

    state = default_state_dir(dict(os.environ))
    if not (Path(state) / "bench").is_dir():
        return [], ""
    from orchestrator.measure.bench import results_file, saved

    path = results_file(state)
    return saved(path, "bench"), str(path)


def efficiencies(gpu: Gpu, calibrate: bool) -> dict[str, Efficiency]:
    """Per engine: this machine's measured efficiency on this GPU where bench saved runs, else the default."""
    from orchestrator.plan.speed import default_efficiency
    from orchestrator.recommend.calibrate import efficiency, shares

    if not calibrate:
        return {e: default_efficiency(e, gpu.accelerator) for e in ENGINES}
    entries, path = _saved()
    host = platform.node()
    found = shares(entries, host)
    return {e: efficiency(e, gpu.id, gpu.accelerator, found, host, path) for e in ENGINES}


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _tps(x: float | None) -> str:
    return "?" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def _fit(row: Row) -> str:
    if row.verdict == "fits":
        return f"fits {row.device_gib:.1f}G"
    if row.verdict == "fits with offload":
        return f"offload {row.device_gib:.1f}G+{row.host_gib:.0f}G RAM"
    return "no" if row.verdict == "does not fit" else row.verdict


def print_rows(rows: list[Row]) -> None:
    click.echo(f"{'#':>3}  {'model':24} {'quant':8} {'fit':24} {'decode':>7} {'prefill':>8}  {'quality':14} "
               "engine and key flags")
    for r in rows:
        q = f"{r.ppl_delta:+.2f} ppl" if r.ppl_delta is not None else "unknown"
        flags = f"{r.engine} {r.flags}" if r.engine else "-"
        click.echo(f"{r.rank:>3}  {r.model[:24]:24} {r.quant:8} {_fit(r)[:24]:24} "
                   f"{_tps(r.speed.decode_tps if r.speed else None):>7} "
                   f"{_tps(r.speed.prefill_tps if r.speed else None):>8}  {q:14} {flags}")


def _explain(rows: list[Row], host: Host, effs: dict[str, Efficiency]) -> None:
    top = rows[0]
    click.echo(f"\n#1 because: {top.reason}")
    click.echo(f"  memory: {top.memory}")
    if top.speed:
        click.echo(f"  decode: {top.speed.decode_how}")
        click.echo(f"  prefill: {top.speed.prefill_how}")
    click.echo("\nhow speeds were predicted (batch 1, a 512-token prompt; tok/s):")
    for engine in sorted({r.engine for r in rows if r.engine}):
        click.echo(f"  {engine} efficiency: {effs[engine].basis}")
    click.echo(f"  host: {host.bandwidth_source}; {host.gflops_source}")
    click.echo("  quality: perplexity increase of the quant on Llama-3-8B (llama.cpp's quantize table); "
               "--json has every row's basis")


@click.command()
@click.option("--gpu", default="auto", show_default=True, help="A catalog GPU name or alias, cpu, or auto (detect).")
@click.option("--count", type=int, default=None, help="GPUs in the machine (default: detected, or 1).")
@click.option("--context", type=int, default=None, help="Tokens per sequence (default: per --use).")
@click.option("--use", "use", type=click.Choice(["chat", "code", "agent", "long-context"]), default="chat",
              show_default=True)
@click.option("--top", type=int, default=15, show_default=True, help="Rows to print (0: all).")
@click.option("--json", "as_json", is_flag=True, help="Every row with its plan, prediction and basis.")
@click.option("--write", "write", type=click.Path(dir_okay=False), help="Write the profile of row --pick to FILE.")
@click.option("--pick", type=int, default=1, show_default=True, help="The row --write writes.")
@click.option("--no-calibration", is_flag=True, help="Use the default efficiency factors, not saved bench runs.")
def recommend(gpu: str, count: int | None, context: int | None, use: str, top: int, as_json: bool,
              write: str | None, pick: int, no_calibration: bool) -> None:
    """What this GPU can run: every catalog model x quant planned for it (fit verdict, engine and key
    flags), predicted prefill and decode tok/s, the quant's quality cost, ranked for --use."""
    from orchestrator.recommend.rank import USES
    from orchestrator.recommend.rank import recommend as rank_all

    if count is not None and count < 1:
        raise OrchestratorError(f"--count {count}: at least 1 GPU", "pass the number of GPUs in the machine")
    ctx = context if context is not None else USES[use].context
    check_context(ctx)
    card, n, here, how = resolve_gpu(gpu, count)
    host = host_facts(here)
    effs = efficiencies(card, not no_calibration)
    rows = rank_all(card, n, ctx, use, host, _ram(), effs)
    if write:
        if not 1 <= pick <= len(rows):
            raise OrchestratorError(f"--pick {pick}: there are {len(rows)} rows", "pick a rank from the list")
        chosen = rows[pick - 1]
        Path(write).write_text(chosen.profile_yaml, encoding="utf-8")
        click.echo(f"wrote {write}: {chosen.model} {chosen.quant} ({chosen.verdict})", err=True)
    if as_json:
        click.echo(json.dumps({"gpu": card.id, "count": n, "gpu_reason": how, "context": ctx, "use": use,
                               "ranking": USES[use].why, "host": host.__dict__,
                               "efficiency": {e: v.__dict__ for e, v in effs.items()},
                               "rows": [r.as_dict() for r in rows]}, indent=2))
        return
    where = "CPU" if card.is_cpu else f"{n}x {card.name} ({card.vram_gb:g} GB, {card.bandwidth_gbs or '?'} GB/s)"
    click.echo(f"recommend for {where} ({how}), context {ctx:,}, use {use}")
    click.echo(f"ranking: {USES[use].why}")
    shown = rows if top <= 0 else rows[:top]
    print_rows(shown)
    if len(shown) < len(rows):
        click.echo(f"  ... {len(rows) - len(shown)} more (--top 0 shows all)")
    _explain(rows, host, effs)


def measured_power(gpus: list[Gpu]) -> dict[str, Measured]:
    """Mean watts and joules per token of the saved bench runs on each GPU (this host's)."""
    import statistics

    from orchestrator.recommend.compare import Measured

    entries, path = _saved()
    out: dict[str, Measured] = {}
    for g in gpus:
        runs = [s for e in entries if e.get("host") == platform.node() for s in e.get("servers") or []
                if s.get("gpu") == g.id and s.get("avg_power_w")]
        if runs:
            jpt = [float(s["joules_per_token"]) for s in runs if s.get("joules_per_token")]
            out[g.id] = Measured(round(statistics.mean(float(s["avg_power_w"]) for s in runs), 1),
                                 round(statistics.median(jpt), 4) if jpt else None, len(runs), path)
    return out


def compare_gpus(names: tuple[str, ...], model: str, quant: str, context: int, count: int, as_json: bool) -> None:
    from orchestrator.recommend.compare import FITS_QUANT, compare

    check_context(context)
    cards = [find_gpu(n) for n in names]
    entry = find_model(model)
    here = any(c.is_cpu for c in cards)
    host = host_facts(here)
    effs = {c.id: efficiencies(c, True) for c in cards}
    rows = compare(cards, entry, quant.upper(), context, host, _ram(), count, effs, measured_power(cards))
    if as_json:
        click.echo(json.dumps({"model": entry.name, "quant": quant.upper(), "context": context, "count": count,
                               "host": host.__dict__, "rows": [r.as_dict() for r in rows]}, indent=2))
        return
    click.echo(f"{entry.name} {quant.upper()}, context {context:,}, {count} GPU(s) each; batch 1, 512-token prompt")
    click.echo(f"{'gpu':22} {'VRAM':>5} {'GB/s':>6} {'TDP W':>6} {'fit':24} {'decode':>7} {'prefill':>8} "
               f"{'tok/J@TDP':>9}  measured power")
    for r in rows:
        m = (f"{r.measured.watts:g} W, {r.measured.joules_per_token} J/token ({r.measured.runs} run(s))"
             if r.measured else "-")
        click.echo(f"{r.gpu[:22]:22} {r.vram_gb:>5g} {r.bandwidth_gbs or '?':>6} {r.tdp_w or '?':>6} "
                   f"{_fit(r.row)[:24]:24} {_tps(r.row.speed.decode_tps if r.row.speed else None):>7} "
                   f"{_tps(r.row.speed.prefill_tps if r.row.speed else None):>8} "
                   f"{r.tokens_per_joule_tdp if r.tokens_per_joule_tdp is not None else '?':>9}  {m}")
    click.echo(f"\nwhat fits entirely on the GPU at {FITS_QUANT}, context {context:,}:")
    for r in rows:
        click.echo(f"  {r.gpu}: {', '.join(r.fits) or 'none of the catalog models'}")
    click.echo("\nhow: decode = bytes read per token / bandwidth x efficiency; prefill = FLOPs per token / FP16 "
               "TFLOPS x efficiency; tokens per joule = decode tok/s / TDP (a lower bound: batch 1 rarely draws TDP)")
    for r in rows:
        if r.row.speed:
            click.echo(f"  {r.gpu}: {r.row.speed.efficiency.basis.split(':')[0]}; decode {r.row.speed.decode_how}")
