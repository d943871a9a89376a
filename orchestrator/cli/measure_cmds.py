"""Commands that measure servers: bench (speed) and eval (quality). They parse their options, run
orchestrator.measure, and print with orchestrator.cli.show."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.cli.common import IGNORE_FIT, load_plan, make_deployer
from orchestrator.cli.completion import complete_server
from orchestrator.cli.show import print_bench, print_compare, print_eval, print_matrix

if TYPE_CHECKING:
    from orchestrator.measure.eval_plan import Options
    from orchestrator.runtime.deployer import Deployer


def _ints(value: str, minimum: int, what: str, each: str, example: str) -> list[int]:
    """A comma-separated option as sorted distinct whole numbers, each at least `minimum`."""
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated {what}, e.g. {example}") from None
    if not out or any(n < minimum for n in out):
        raise click.BadParameter(f"{value!r}: {each} must be {minimum}{' tokens' if minimum > 1 else ''} or more, "
                                 f"e.g. {example}")
    return sorted(set(out))


def _concurrency(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    return _ints(value, 1, "whole numbers", "each level", "1,2,4,8")


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    return None if value is None else _ints(value, 256, "token counts", "each", "2048,8192")


def _depths(ctx: click.Context, param: click.Parameter, value: str) -> list[float]:
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated percentages, e.g. 10,50,90") from None
    if not out or any(not 0 <= d <= 100 for d in out):
        raise click.BadParameter(f"{value!r}: each depth is a percentage from 0 to 100, e.g. 10,50,90")
    return [d / 100 for d in out]


@contextlib.contextmanager
def _progress(quiet: bool, label: str = "bench") -> Iterator[Callable[[str], None]]:
    """A spinner with the current step on a terminal; plain lines on stderr otherwise."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet:
        yield lambda msg: None
    elif console.is_terminal:
        with console.status(f"{label}: starting") as st:
            yield lambda msg: st.update(f"{label}: {msg}")
    else:
        yield lambda msg: click.echo(f"  {label}: {msg}", err=True)


def _results_path(results_path: str | None, deployer: Deployer) -> Path:
    from orchestrator.measure import bench as b

    return Path(results_path) if results_path else b.results_file(str(deployer.store.root))


@click.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).",
              shell_complete=complete_server)
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Exact prompt length, in the server's own tokens.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per request (end-of-sequence is ignored so every request makes this many).")
@click.option("--concurrency", default="1,2,4,8", show_default=True, callback=_concurrency,
              help="Simultaneous requests per level, comma-separated.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds per level (with --compare: A B rounds).")
@click.option("--depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Context depth: every request starts after a shared prefix of this many tokens, evaluated "
                   "once per slot first and then found cached (llama-bench's -d, through the server).")
@click.option("--no-prefix", is_flag=True, help="Skip the shared-prefix (prefix cache) run.")
@click.option("--up", "start_first", is_flag=True, help="Start the servers first and stop the ones it started after.")
@click.option("--compare", is_flag=True, help="Two profiles, A then B, interleaved: ratios B/A with their spread.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--samples", is_flag=True, help="With --json: every request's measurements too.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="Throughput and latency vs concurrency "
              "as PNG (needs matplotlib: pip install 'orchestrator[plot]').")
@click.option("--save", is_flag=True, help="Append the results to the results file and show the change since "
              "the last saved run of this profile.")
@click.option("--results", "results_path", type=click.Path(dir_okay=False),
              help="Results file for --save (default: STATE_DIR/bench/results.jsonl).")
@IGNORE_FIT
def bench(profiles: tuple[str, ...], servers: tuple[str, ...], prompt_tokens: int, gen_tokens: int,
          concurrency: list[int], runs: int, depth: int, no_prefix: bool, start_first: bool, compare: bool, as_json: bool,
          samples: bool, plot_file: str | None, save: bool, results_path: str | None, ignore_fit: bool) -> None:
    """Measure running servers: TTFT, prefill and decode tokens/s, throughput per concurrency level,
    prefix-cache effect, memory, watts per token and the decode roofline."""
    from orchestrator.measure import bench as b
    from orchestrator.measure import bench_plan as benchrun
    from orchestrator.pipeline import plan_for_up

    if compare and len(profiles) != 2:
        raise click.UsageError("--compare takes exactly two profiles: orchestrate bench --compare A.yaml B.yaml")
    if not compare and len(profiles) != 1:
        raise click.UsageError("give one profile (or two with --compare)")
    if plot_file and compare:
        raise click.UsageError("--plot draws one profile's levels; leave it out with --compare")
    opts = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "concurrency": concurrency, "runs": runs,
            "prefix": not no_prefix, "depth": depth}
    deployer = make_deployer(as_json=True)
    only = list(servers) or None
    if compare:
        _bench_compare(profiles, deployer, only, opts, as_json, ignore_fit)
        return
    plan_ = plan_for_up(profiles[0], deployer, ignore_fit) if start_first else load_plan(profiles[0], ignore_fit)
    started = benchrun.start(deployer, plan_, only) if start_first else None
    try:
        with _progress(False) as say:
            results = benchrun.bench_plan(plan_, deployer, only, opts, say)
    finally:
        if started:
            started.stop()
    previous = b.save(_results_path(results_path, deployer), plan_.name, results) if save else None
    if plot_file:
        b.plot(results, plot_file)
    if as_json:
        click.echo(json.dumps([r.as_dict(with_samples=samples) for r in results], indent=2))
    else:
        print_bench(results, previous)
    if plot_file:
        click.echo(f"plot: {plot_file}", err=True)
    if any(lv.errors for r in results for lv in r.levels):
        sys.exit(1)


def _bench_compare(profiles: tuple[str, ...], deployer: Deployer, only: list[str] | None, opts: dict[str, Any],
                   as_json: bool, ignore_fit: bool) -> None:
    """bench --compare A B: interleaved rounds, then per server the ratios B/A."""
    from orchestrator.measure import bench as b
    from orchestrator.measure import bench_plan as benchrun
    from orchestrator.pipeline import plan_for_up

    plan_a, plan_b = (plan_for_up(p, deployer, ignore_fit) for p in profiles)
    with _progress(False) as say:
        runs_a, runs_b, mode = benchrun.compare(plan_a, plan_b, deployer, only, opts, say)
    rows = [{"server": ra[0].server, "ratios": [r.__dict__ for r in b.ratios(list(ra), list(rb))]}
            for ra, rb in zip(zip(*runs_a, strict=True), zip(*runs_b, strict=True), strict=True)]
    if as_json:
        click.echo(json.dumps({"a": profiles[0], "b": profiles[1], "rounds": opts["runs"], "mode": mode,
                               "servers": rows}, indent=2))
    else:
        print_compare(profiles, opts["runs"], mode, rows)


def _eval_options(matrix: bool, plot_file: str | None, *, baseline_file: str | None, baseline_kv: str | None,
                  kv_extra: str | None, contexts: list[int] | None, ppl_context: int | None, tokens: int,
                  lengths: list[int] | None, depths: list[float], trials: int, no_retrieval: bool,
                  no_perplexity: bool) -> Options:
    """eval's measurement options, checked against each other, as one Options."""
    from orchestrator.measure import eval_plan as evalrun

    if baseline_file and baseline_kv:
        raise click.UsageError("give --baseline FILE or --baseline-kv TYPE, not both")
    if matrix and (baseline_file or baseline_kv):
        raise click.UsageError("--matrix measures KLD against f16 KV at each context; leave out --baseline*")
    if plot_file and not matrix:
        raise click.UsageError("--plot draws the --matrix table; add --matrix")
    if no_retrieval and no_perplexity:
        raise click.UsageError("--no-retrieval with --no-perplexity leaves nothing to measure")
    if (kv_extra or contexts) and not matrix:
        raise click.UsageError("--kv and --contexts choose the --matrix cells; add --matrix")
    kv = [*evalrun.MATRIX_KV, *[k.strip() for k in (kv_extra or "").split(",") if k.strip()]]
    return evalrun.Options(baseline_file=baseline_file, baseline_kv=baseline_kv, ppl_context=ppl_context,
                           tokens=tokens, perplexity=not no_perplexity, retrieval=not no_retrieval, lengths=lengths,
                           depths=depths, trials=trials, kv=list(dict.fromkeys(kv)), contexts=contexts)


@click.command("eval")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).",
              shell_complete=complete_server)
@click.option("--baseline", "baseline_file", type=click.Path(dir_okay=False),
              help="KL divergence against this profile's server (e.g. a higher quant of the same model).")
@click.option("--baseline-kv", help="KL divergence against the same server with this KV cache type (e.g. f16).")
@click.option("--matrix", is_flag=True, help="Sweep KV cache type × context: perplexity, KLD vs f16, retrieval, "
              "decode tok/s and KV memory per cell (starts its own servers).")
@click.option("--kv", "kv_extra", help="--matrix: KV types besides f16,q8_0,q4_0 (comma-separated; those the "
              "engine lists, experimental ones labelled).")
@click.option("--contexts", callback=_int_list, help="--matrix: context lengths (default 2048,8192,32768 up to "
              "the profile's context).")
@click.option("--ppl-context", type=click.IntRange(min=256), help="Perplexity chunk size in tokens (default: the "
              "server's context).")
@click.option("--tokens", type=click.IntRange(min=128), default=2048, show_default=True,
              help="Tokens scored per perplexity measurement (rounded up to whole chunks; at least one chunk).")
@click.option("--lengths", callback=_int_list, help="Retrieval prompt lengths in tokens (default: 2k/8k/32k "
              "up to the server's context, and the context itself).")
@click.option("--depths", default="10,50,90", show_default=True, callback=_depths,
              help="Where the pass key sits in the prompt, percent.")
@click.option("--trials", type=click.IntRange(min=1), default=2, show_default=True,
              help="Pass keys per (length, depth).")
@click.option("--no-retrieval", is_flag=True, help="Skip the retrieval test (no running server needed).")
@click.option("--no-perplexity", is_flag=True, help="Skip perplexity and KL divergence.")
@click.option("--up", "start_first", is_flag=True, help="Start the servers first and stop the ones it started after.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), help="--matrix: the trade-off as PNG "
              "(needs matplotlib: pip install 'orchestrator[plot]').")
@click.option("--save", is_flag=True, help="Append the results to the results file (orchestrate plan then shows "
              "them for a profile they match).")
@click.option("--results", "results_path", type=click.Path(dir_okay=False),
              help="Results file for --save (default: STATE_DIR/bench/results.jsonl, shared with bench).")
@IGNORE_FIT
def eval_cmd(profile: str, servers: tuple[str, ...], matrix: bool, start_first: bool, as_json: bool,
             plot_file: str | None, save: bool, results_path: str | None, ignore_fit: bool,
             **measure: Any) -> None:
    """What the deployment's quant, KV-cache precision and context cost: perplexity on a fixed text,
    KL divergence and top-1 agreement against a baseline, pass-key retrieval through the server."""
    from orchestrator.measure import bench as b
    from orchestrator.measure import bench_plan as benchrun
    from orchestrator.measure import eval_plan as evalrun
    from orchestrator.pipeline import plan_for_up
    from orchestrator.profile import load

    opts = _eval_options(matrix, plot_file, **measure)   # the options that choose what is measured
    deployer = make_deployer(as_json=True)
    loaded = load(profile)
    only = list(servers) or None
    plan_ = plan_for_up(profile, deployer, ignore_fit) if start_first or matrix else load_plan(profile, ignore_fit)
    started = benchrun.start(deployer, plan_, only) if start_first and opts.retrieval and not matrix else None
    try:
        with _progress(False, "eval") as say:
            run = evalrun.eval_matrix if matrix else evalrun.eval_plan
            results = run(plan_, loaded, deployer, only, opts, say, ignore_fit)
    finally:
        if started:
            started.stop()
    if save:
        b.save(_results_path(results_path, deployer), plan_.name, results, kind="eval")
    if plot_file:
        evalrun.plot(results, plot_file)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    elif matrix:
        print_matrix(results)
    else:
        print_eval(results)
    if plot_file:
        click.echo(f"plot: {plot_file}", err=True)
