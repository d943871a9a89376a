"""How results look on a terminal: the printers the commands call after the work is done. rich is
imported inside the printers that draw tables, so commands that print plain lines stay fast."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from orchestrator.catalog import Gpu
    from orchestrator.facts.hardware import Report
    from orchestrator.facts.installed import InstalledEngine, PyEnv
    from orchestrator.measure.bench import ServerResult
    from orchestrator.measure.eval_plan import EvalResult
    from orchestrator.runtime.base import UpResult


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def print_up(results: list[UpResult], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
        return
    for r in results:
        if r.ok:
            extra = f", first token in {r.ttft_s * 1000:.0f} ms" if r.ttft_s else ""
            took = f" in {r.elapsed_s:.1f}s" if r.elapsed_s else ""
            click.echo(f"{r.server}: {r.outcome}{took} ({r.detail}{extra}) — {r.url}")
        elif r.stage == "preflight":   # nothing started: what is wrong and the fix, on one line
            fix = f" — fix: {r.hint}" if r.cause != "unknown" else ""
            click.echo(f"{r.server}: FAILED before start: {r.detail}{fix}", err=True)
        else:
            click.echo(f"{r.server}: FAILED at stage '{r.stage}': {r.detail}", err=True)
            click.echo(f"  cause: {r.cause} — {r.hint}", err=True)
            if r.log_tail:
                click.echo(f"  last log lines ({r.log}):", err=True)
                for line in r.log_tail:
                    click.echo(f"    {line}", err=True)


def print_status(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no deployments")
        return
    for r in rows:
        up_ = f" up {r['uptime_s']:.0f}s" if r["uptime_s"] is not None else ""
        where = f"container {r['container']}" if r.get("container") else f"pid {r['pid']}"
        click.echo(f"{r['deployment']}/{r['server']}: {r['state']} — {r['engine']} {where} "
                   f"{r['address']} model {r['model']}{up_}")


def _bench_lines(r: ServerResult, previous: dict[str, Any] | None) -> list[str]:
    """What a bench table leaves out: prompts, the engine's own timings, prefix cache, memory and
    power, the roofline, notes, and the change since the last saved run."""
    lines = [f"prompts: {r.tokenizer}"]
    lv0 = r.levels[0]
    if lv0.server_decode_tps:
        lines.append(f"engine's own timings at concurrency {lv0.concurrency}: prefill "
                     f"{fmt(lv0.server_prefill_tps)} tok/s, decode {fmt(lv0.server_decode_tps)} tok/s")
    if r.prefix:
        p = r.prefix
        cached = f", engine reused {p.cached_tokens} tokens ({p.counter})" if p.cached_tokens is not None else \
            f" ({p.counter})"
        if p.warm_processed is not None:
            cached += f" and evaluated {p.warm_processed} instead of {p.cold_processed}"
        lines.append(f"prefix cache: {p.prefix_tokens}-token shared prefix, TTFT {p.cold_ttft_ms:.0f} → "
                     f"{p.warm_ttft_ms:.0f} ms ({p.ttft_speedup:.1f}× faster){cached}")
    mem = []
    if r.rss_peak_bytes:
        mem.append(f"server RSS peak {r.rss_peak_bytes / 2**20:,.0f} MiB")
    if r.gpu_memory_peak_bytes:
        mem.append(f"GPU memory peak {r.gpu_memory_peak_bytes / 2**30:,.2f} GiB")
    if r.avg_power_w:
        mem.append(f"GPU power {r.avg_power_w:.0f} W avg, {r.joules_per_token:.3f} J per output token")
    if mem:
        lines.append("; ".join(mem))
    if r.roofline:
        rf = r.roofline
        share = f"; decode at concurrency 1 reaches {rf.achieved_share:.0%} of it" if rf.achieved_share else ""
        lines.append(f"decode roofline: {rf.roofline_tps:,.0f} tok/s = {rf.bandwidth_gbs:g} GB/s "
                     f"({rf.bandwidth_source}) / {rf.bytes_per_token / 2**20:,.0f} MiB per token{share}")
        if rf.prefill_roofline_tps and rf.flops_per_token:
            pshare = f"; prefill at concurrency 1 reaches {rf.prefill_share:.0%} of it" if rf.prefill_share else ""
            lines.append(f"prefill roofline: {rf.prefill_roofline_tps:,.0f} tok/s = {rf.compute_tflops:g} TFLOPS "
                         f"({rf.compute_source}) / {rf.flops_per_token / 1e9:,.2f} GFLOP per token{pshare}")
    for n in r.notes:
        lines.append(f"note: {n}")
    if previous:
        before = {s["server"]: s for s in previous.get("servers", [])}.get(r.server)
        if before:
            lines.append(f"vs last saved run ({previous.get('time')}): " + _delta(before, r))
    return lines


def print_bench(results: list[ServerResult], previous: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)   # piped: no wrapped headers
    for r in results:
        at = f", after {r.depth} cached tokens of context" if r.depth else ""
        table = Table(title=f"{r.server}: {r.engine} {r.model} — {r.prompt_tokens} prompt + {r.gen_tokens} "
                            f"generated tokens per request{at}", title_justify="left")
        for col in ("conc.", "TTFT p50 ms", "TTFT p95 ms", "prefill tok/s", "decode tok/s/stream", "ITL p50 ms",
                    "ITL p95 ms", "throughput tok/s", "errors"):
            table.add_column(col, justify="right")
        for lv in r.levels:
            table.add_row(str(lv.concurrency), fmt(lv.ttft_ms), fmt(lv.ttft_p95_ms), fmt(lv.prefill_tps),
                          fmt(lv.decode_tps), fmt(lv.itl_ms, 2), fmt(lv.itl_p95_ms, 2), fmt(lv.throughput_tps),
                          f"{lv.errors}/{lv.requests}")
        console.print(table)
        for line in _bench_lines(r, previous):
            console.print(line, highlight=False)


def _delta(before: dict[str, Any], now: ServerResult) -> str:
    old = {lv["concurrency"]: lv for lv in before.get("levels", [])}
    parts = []
    for lv in now.levels:
        o = old.get(lv.concurrency)
        if o and o.get("decode_tps") and lv.decode_tps and o.get("throughput_tps") and lv.throughput_tps:
            parts.append(f"c={lv.concurrency} decode ×{lv.decode_tps / o['decode_tps']:.2f}, "
                         f"throughput ×{lv.throughput_tps / o['throughput_tps']:.2f}")
    return "; ".join(parts) or "no common concurrency levels"


def print_compare(profiles: tuple[str, ...], runs: int, mode: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"A = {profiles[0]}, B = {profiles[1]}; {runs} interleaved round(s); {mode}", highlight=False)
    for row in rows:
        table = Table(title=f"server {row['server']}: B/A (median of rounds, [min–max])", title_justify="left")
        for col in ("metric", "A", "B", "B/A", "spread", "better"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for r in row["ratios"]:
            ratio = r["ratio"]
            better = "-" if ratio is None else ("B" if (ratio > 1) == r["higher_is_better"] and ratio != 1 else "A")
            table.add_row(r["metric"], fmt(r["a"]), fmt(r["b"]), fmt(ratio, 3),
                          f"{fmt(r['low'], 3)}–{fmt(r['high'], 3)}", better)
        console.print(table)


def print_eval(results: list[EvalResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)   # piped: no wrapped headers
    for r in results:
        console.print(f"{r.server}: {r.engine} {r.engine_version}, {r.model}, {r.kv_cache} KV cache, context "
                      f"{r.context}", highlight=False)
        if r.perplexity is not None:
            console.print(f"  perplexity {r.perplexity:.4f} ± {fmt(r.perplexity_error, 4)} on {r.eval_text}: "
                          f"{r.tokens} tokens scored in {r.chunks} chunk(s) of {r.ppl_context}", highlight=False)
        if r.kld_mean is not None:
            console.print(f"  vs baseline ({r.baseline}): perplexity {r.perplexity_base:.4f}; KL divergence mean "
                          f"{r.kld_mean:.6f}, p99 {r.kld_p99:.6f}; top-1 agreement {r.top1_agreement:.2%}",
                          highlight=False)
        if r.retrieval:
            table = Table(title="pass-key retrieval (accuracy)", title_justify="left")
            lengths = sorted({c["context_tokens"] for c in r.retrieval})
            depths = sorted({c["depth"] for c in r.retrieval})
            table.add_column("tokens", justify="right")
            for d in depths:
                table.add_column(f"depth {d:.0%}", justify="right")
            table.add_column("decode tok/s", justify="right")
            cells = {(c["context_tokens"], c["depth"]): c for c in r.retrieval}
            for n in lengths:
                rates = [cells[(n, d)]["decode_tps"] for d in depths if cells.get((n, d), {}).get("decode_tps")]
                table.add_row(str(n), *[f"{cells[(n, d)]['accuracy']:.0%}" if (n, d) in cells else "-"
                                        for d in depths], fmt(max(rates) if rates else None))
            console.print(table)
        for n in r.notes:
            console.print(f"  note: {n}", highlight=False)


def print_matrix(results: list[EvalResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    groups: dict[tuple[str, str], list[EvalResult]] = {}
    for r in results:
        groups.setdefault((f"{r.server}: {r.engine} {r.engine_version}", r.model), []).append(r)
    for (server, model), rows in groups.items():
        table = Table(title=f"{server}, {model} — KV cache × context", title_justify="left")
        for col in ("KV", "context", "KV memory", "perplexity", "KLD vs f16", "KLD p99", "top-1 vs f16",
                    "retrieval", "decode tok/s"):
            table.add_column(col, justify="right" if col != "KV" else "left")
        for r in rows:
            acc = [c["accuracy"] for c in r.retrieval]
            table.add_row(r.kv_cache + (" (experimental)" if r.experimental else ""), str(r.context),
                          f"{r.kv_cache_bytes / 2**20:,.1f} MiB" if r.kv_cache_bytes is not None else "-",
                          fmt(r.perplexity, 4), fmt(r.kld_mean, 6), fmt(r.kld_p99, 5),
                          f"{r.top1_agreement:.2%}" if r.top1_agreement is not None else "-",
                          f"{sum(acc) / len(acc):.0%}" if acc else "-", fmt(r.decode_tps))
        console.print(table)
        for r in rows:
            for n in r.notes:
                console.print(f"note ({r.kv_cache}, {r.context}): {n}", highlight=False)


def print_installed_versions(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("no engines installed — orchestrate engines install llama.cpp")
    for r in rows:
        same = "same as the catalog" if r["version"] == r["catalog"] else f"catalog: {r['catalog']}"
        click.echo(f"{r['engine']} {r['version'] or '?'} ({r['backend']}) {r['binary']} — {same}")


def print_version_comparison(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        click.echo(f"{r['server']}: {r['engine']} {r['targeted']} ({r['targeted_from']}); catalog {r['catalog']}")
        if r["targeted"] == r["catalog"] and not r["problems"]:
            click.echo("  same version as the catalog: nothing differs")
        for x in r["only_targeted"]:
            click.echo(f"  only on {r['targeted']}: {x}")
        for x in r["only_catalog"]:
            click.echo(f"  only on {r['catalog']}: {x}")
        for p in r["problems"]:
            click.echo(f"  problem: {p}")


def print_engines(rows: list[InstalledEngine], envs: list[PyEnv]) -> None:
    if not rows and not envs:
        click.echo("no engines installed — orchestrate engines install llama.cpp")
    for r in rows:
        arch = f" {r.gpu_arch}" if r.gpu_arch else ""
        click.echo(f"{r.engine:10} {r.version:10} {r.backend}{arch:6} {r.bin_dir}")
    for e in envs:
        kind = e.accelerator if e.purpose == "serve" else e.purpose
        click.echo(f"{e.engine:10} {e.version:10} {kind:9} {e.python}  ({e.distribution})")


def print_doctor(report: Report) -> None:
    cpu, mem = report.cpu, report.memory
    click.echo(f"cpu: {cpu['model']} ({cpu['arch']}), {cpu['cores_physical'] or '?'} cores / "
               f"{cpu['cores_logical']} threads, ISA: {' '.join(cpu['isa']) or '-'}")
    click.echo(f"memory: {mem['total_bytes'] / 2**30:.1f} GiB total, {mem['available_bytes'] / 2**30:.1f} GiB available")
    for g in report.gpus:
        total = f"{g['vram_total_bytes'] / 2**30:.1f} GiB" if g["vram_total_bytes"] else "?"
        free = f", {g['vram_free_bytes'] / 2**30:.1f} GiB free" if g["vram_free_bytes"] else ""
        click.echo(f"gpu {g['index']}: {g['name']} [{g['catalog_id'] or 'not in catalog'}] {g['arch'] or ''} "
                   f"cc {g['compute_capability'] or '-'}, {total}{free}, driver {g['driver'] or '?'} "
                   f"(via {g['source']})")
    if not report.gpus:
        click.echo("gpus: none detected")
    d = report.docker
    click.echo(f"docker: cli {'yes' if d['cli'] else 'no'}, daemon {'up ' + str(d['version']) if d['daemon'] else 'down'}"
               f", nvidia runtime {'yes' if d['nvidia_runtime'] else 'no'}")
    for e in report.engines:
        click.echo(f"engine: {e['engine']} {e['version'] or ''} {e['backend'] or ''} {e['path']} ({e['source']})")
    for p in report.problems:
        click.echo(f"missing: {p['what']} — blocks {p['blocks']}; fix: {p['fix']}")


def print_gpus(rows: list[Gpu]) -> None:
    for g in rows:
        cc = g.compute_capability or g.gfx_target or "-"
        click.echo(f"{g.id:24} {g.name:40} {g.arch:10} {cc:7} {g.vram_gb:>6g} GB {g.bandwidth_gbs or '-':>6} GB/s")
