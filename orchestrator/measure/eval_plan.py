"""orchestrate eval against plans and deployments: the profile's own settings (perplexity, KL
divergence against a baseline, retrieval through the running server) and the --matrix sweep of KV
dtype × context length. Measurement itself lives in quality.py (and bench.py for the HTTP client)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator import catalog
from orchestrator.catalog import GGUF_ENGINES
from orchestrator.errors import OrchestratorError, ProfileError
from orchestrator.facts.model import gather
from orchestrator.facts.types import ModelFacts
from orchestrator.measure import bench_plan, quality
from orchestrator.measure.quality import GIB, QualityError
from orchestrator.plan import fit
from orchestrator.plan.model import Plan, ServerPlan
from orchestrator.profile import LoadedProfile, load
from orchestrator.runtime.deployer import Deployer

Say = Callable[[str], None]
MATRIX_KV = ("f16", "q8_0", "q4_0")
# KV types the catalog lists that are not plain float/q8_0/q4_0: measured, but labelled experimental.
STANDARD_KV = {"f16", "bf16", "q8_0", "q4_0"}


@dataclass
class Options:
    baseline_file: str | None = None
    baseline_kv: str | None = None
    ppl_context: int | None = None       # None: the server's context
    tokens: int = 2048                   # tokens scored per perplexity measurement (at least one chunk)
    perplexity: bool = True
    retrieval: bool = True
    lengths: list[int] | None = None     # None: retrieval_lengths(context)
    depths: list[float] = field(default_factory=lambda: list(quality.DEPTHS))
    trials: int = 2
    kv: list[str] = field(default_factory=lambda: list(MATRIX_KV))
    contexts: list[int] | None = None    # matrix; None: 2k/8k/32k ladder up to the profile's context


@dataclass
class EvalResult:
    server: str
    engine: str
    engine_version: str
    model: str
    model_path: str
    kv_cache: str
    context: int                              # the server's context per sequence
    eval_text: str
    perplexity: float | None = None
    perplexity_error: float | None = None
    ppl_context: int | None = None            # n_ctx of the perplexity chunks
    chunks: int | None = None
    tokens: int | None = None                 # tokens scored
    baseline: str | None = None               # what KLD was measured against
    perplexity_base: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agreement: float | None = None
    retrieval: list[dict[str, Any]] = field(default_factory=list)
    retrieval_method: str = ""
    decode_tps: float | None = None
    kv_cache_bytes: int | None = None
    experimental: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- plans

def variant(loaded: LoadedProfile, server: str, *, kv: str | None = None, context: int | None = None,
            port: int | None = None, name: str | None = None, enforce_fit: bool = True) -> Plan:
    """The profile with one server, its KV type / context / port changed and one slot, planned by the
    planner as any profile is: every flag keeps its rule and reason."""
    from orchestrator.pipeline import build_plan

    prof = loaded.profile
    [srv] = [s for s in prof.servers if s.name == server]
    update: dict[str, Any] = {"parallel": 1}
    if kv is not None:
        update["kv_cache"] = kv
    if context is not None:
        update["context"] = context
    if port is not None:
        update["port"] = port
    new = prof.model_copy(update={"servers": [srv.model_copy(update=update)],
                                  **({"name": name} if name else {})})
    # The lock's tuned flags (a KV type among them) would override the variant's: plan it by the rules.
    return build_plan(LoadedProfile(new, loaded.source), enforce_fit=enforce_fit, use_lock=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kv_of(sp: ServerPlan) -> str:
    """The planned KV-cache dtype."""
    return sp.settings.kv_cache if sp.settings else "f16"


def context_of(sp: ServerPlan) -> int:
    """Tokens per sequence, as planned."""
    return sp.settings.context if sp.settings else 0


def ppl_tool(sp: ServerPlan, say: Say | None = None) -> str:
    """llama-perplexity from the same build as the server's llama-server; an installed build that
    lacks it (`up` builds the server only) gets it built now, the libraries from ccache."""
    from orchestrator.facts.installed import backend_for, locate
    from orchestrator.provision import builds as provision

    if sp.engine not in GGUF_ENGINES:
        raise QualityError(f"server {sp.name}: {sp.engine_display} has no {quality.PPL_TOOL}, and its server "
                           "returns no prompt log-probabilities through /v1/completions (vLLM's do)",
                           "pass --no-perplexity to measure retrieval only")
    found = locate(sp.engine, sp.accelerator, sp.command[0], sp.binary)
    if found.path is None:
        raise QualityError(f"server {sp.name}: {sp.engine_display} is not installed",
                           f"orchestrate engines install {sp.engine}")
    tool = Path(found.path).with_name(quality.PPL_TOOL)
    if not tool.is_file() and found.how.startswith("installed build"):
        if say is not None:
            say(f"{sp.name}: building {quality.PPL_TOOL} beside {found.path} (first time only)")
        inst = provision.build(sp.engine, backend_for(sp.accelerator), tools=(quality.PPL_TOOL,),
                               log=say or (lambda message: None))
        tool = inst.binary(quality.PPL_TOOL)
    if not tool.is_file():
        raise QualityError(f"server {sp.name}: no {quality.PPL_TOOL} beside {found.path} ({found.how})",
                           f"orchestrate engines install {sp.engine} builds it with the server; with binary: in "
                           f"the profile, build {quality.PPL_TOOL} from the same source and put it in that folder")
    return str(tool)


def _facts(sp: ServerPlan) -> ModelFacts:
    return gather(sp.model_location)


def check_memory(sp: ServerPlan, context: int, with_base: bool, what: str) -> None:
    """A clear error before a perplexity run that cannot fit in this machine's free memory, or that
    the engine's tool cannot run at this context."""
    import psutil

    facts = _facts(sp)
    limit = quality.kld_context_limit(sp.engine, facts.metadata) if with_base else None
    if limit is not None and context > limit:
        n_vocab = int(facts.metadata.get("tokenizer.tokens_count") or 0)
        raise QualityError(f"{what}: {sp.engine_display}'s {quality.PPL_TOOL} cannot compute KL divergence at "
                           f"context {context} with a {n_vocab}-token vocabulary (its buffers overflow a 32-bit "
                           f"index above context {limit})",
                           f"measure at --ppl-context {quality.kld_chunk(limit)} or less, or use llama.cpp's "
                           f"{quality.PPL_TOOL} for this model")
    kv = fit.kv_cache_bytes(facts, sp.engine, context, 1, kv_of(sp)) if facts.metadata.get("block_count") else 0
    need = quality.ppl_memory_bytes(facts.metadata, facts.size_bytes or 0, kv, context, with_base)
    have = psutil.virtual_memory().available
    if need > have * 0.9:
        n_vocab = int(facts.metadata.get("tokenizer.tokens_count") or 0)
        raise QualityError(f"{what} does not fit in memory: {quality.PPL_TOOL} at context {context} needs "
                           f"~{need / GIB:.1f} GiB ({n_vocab}-token vocabulary: the logits of {context // 2} tokens "
                           f"alone take {context // 2 * n_vocab * 4 / GIB:.1f} GiB), {have / GIB:.1f} GiB available",
                           "measure at a shorter context with --ppl-context N, or free memory")


# --------------------------------------------------------------------------- perplexity / KLD

def _flags(sp: ServerPlan) -> list[tuple[str, str | None]]:
    return [(f.name, f.value) for f in sp.flags]


def measure_ppl(sp: ServerPlan, base_sp: ServerPlan | None, context: int, tokens: int, scratch: str,
                say: Say, base_label: str = "") -> tuple[quality.PplRun, quality.PplRun | None]:
    """Perplexity of `sp`, and, with a baseline, the baseline's run (writing the KLD base file) and
    the KL divergence of `sp` against it. The base file is deleted before returning."""
    tool = ppl_tool(sp, say)
    chunks = quality.chunks_for(context, tokens)
    text_file = Path(scratch) / "eval.txt"
    if not text_file.exists():
        text_file.write_text(quality.eval_text(), encoding="utf-8")
    if base_sp is None:
        check_memory(sp, context, False, f"server {sp.name}")
        say(f"{sp.name}: perplexity, {chunks} chunk(s) of {context} tokens ({kv_of(sp)} KV)")
        return quality.run_ppl(quality.ppl_argv(tool, _flags(sp), context, chunks, str(text_file)), scratch), None
    base_tool = ppl_tool(base_sp)
    check_memory(base_sp, context, True, f"the baseline ({base_label})")
    check_memory(sp, context, True, f"server {sp.name}")
    _same_vocab(sp, base_sp, base_label)
    base_file = Path(scratch) / "base.kld"
    try:
        mib = quality.base_file_bytes(_facts(base_sp).metadata, context, chunks) / 2**20
        say(f"{sp.name}: baseline ({base_label}): {chunks} chunk(s) of {context} tokens, base file ~{mib:,.0f} MiB")
        base = quality.run_ppl(quality.ppl_argv(base_tool, _flags(base_sp), context, chunks, str(text_file),
                                                str(base_file)), scratch)
        say(f"{sp.name}: KL divergence of {kv_of(sp)} KV against the baseline")
        run = quality.run_ppl(quality.ppl_argv(tool, _flags(sp), context, chunks, None, str(base_file), kld=True),
                              scratch)
    finally:
        base_file.unlink(missing_ok=True)
    return run, base


def _same_vocab(sp: ServerPlan, base_sp: ServerPlan, label: str) -> None:
    a = _facts(sp).metadata.get("tokenizer.tokens_count")
    b = _facts(base_sp).metadata.get("tokenizer.tokens_count")
    if a and b and a != b:
        raise QualityError(f"the baseline ({label}) has a {b}-token vocabulary, server {sp.name} {a}: KL divergence "
                           "compares next-token distributions over one vocabulary",
                           "compare against the same model family (e.g. a higher quant of the same model)")


def baseline_plan(opts: Options, loaded: LoadedProfile, sp: ServerPlan, ignore_fit: bool) -> tuple[ServerPlan, str]:
    """The server the KL divergence is measured against: the same server with another KV type, or the
    same-named (or only) server of another profile."""
    if opts.baseline_kv:
        caps = catalog.engine(sp.engine)
        if opts.baseline_kv not in caps["kv_types"]:
            raise QualityError(f"--baseline-kv {opts.baseline_kv}: {sp.engine_display} has no such KV cache type",
                               f"use one of {', '.join(caps['kv_types'])}")
        plan = variant(loaded, sp.name, kv=opts.baseline_kv, context=context_of(sp), enforce_fit=not ignore_fit)
        return plan.servers[0], f"same server with {opts.baseline_kv} KV cache"
    assert opts.baseline_file
    from orchestrator.pipeline import build_plan

    try:
        plan = build_plan(load(opts.baseline_file), enforce_fit=not ignore_fit)
    except ProfileError as exc:
        fits = [p for p in exc.problems if "does not fit" in p.message]
        if fits:
            raise QualityError(f"the baseline {opts.baseline_file} does not fit in memory: {fits[0].message}",
                               fits[0].hint) from None
        raise
    named = [s for s in plan.servers if s.name == sp.name]
    if not named and len(plan.servers) != 1:
        raise QualityError(f"the baseline {opts.baseline_file} has no server named {sp.name} and more than one "
                           "server", f"name the baseline's server {sp.name}, or give a profile with one server")
    base = named[0] if named else plan.servers[0]
    return base, f"{opts.baseline_file} ({base.name}: {Path(base.model_location).name}, {kv_of(base)} KV)"


# --------------------------------------------------------------------------- one profile

def _result(sp: ServerPlan) -> EvalResult:
    facts = _facts(sp)
    kv = kv_of(sp)
    ctx = context_of(sp)
    swa_full = any(f.name == "--swa-full" for f in sp.flags)   # what the server allocates, not the window
    kv_bytes = (fit.kv_cache_bytes(facts, sp.engine, ctx, 1, kv, swa_full=swa_full)
                if facts.metadata.get("block_count") else None)
    return EvalResult(sp.name, sp.engine, sp.engine_version, sp.served_name, sp.model_location, kv, ctx,
                      quality.EVAL_TEXT_NAME, kv_cache_bytes=kv_bytes, experimental=kv not in STANDARD_KV)


def _fill_ppl(res: EvalResult, run: quality.PplRun, base: quality.PplRun | None, label: str | None) -> None:
    res.perplexity, res.perplexity_error = run.perplexity, run.perplexity_error
    res.ppl_context, res.chunks, res.tokens = run.context, run.chunks, run.tokens
    if base is not None:
        res.baseline = label
        res.perplexity_base = base.perplexity
        res.kld_mean, res.kld_p99, res.top1_agreement = run.kld_mean, run.kld_p99, run.top1_agreement
    res.settings["perplexity_argv"] = run.argv


def _fill_retrieval(res: EvalResult, got: quality.Retrieval) -> None:
    res.retrieval = [{"context_tokens": c.context_tokens, "depth": c.depth, "accuracy": c.accuracy,
                      "trials": c.trials, "answers": c.answers, "decode_tps": c.decode_tps} for c in got.cells]
    res.retrieval_method = got.method
    rates = [r for r in got.decode_tps_by_length.values() if r]
    if rates:
        res.decode_tps = rates[-1]   # at the longest length measured


def eval_plan(plan: Plan, loaded: LoadedProfile, deployer: Deployer, only: list[str] | None, opts: Options,
              say: Say, ignore_fit: bool = False) -> list[EvalResult]:
    servers = bench_plan.select(plan, only)
    through_server = [sp for sp in servers if opts.perplexity and sp.engine in quality.PROMPT_LOGPROB_ENGINES]
    by_server = {sp.name for sp in through_server}
    for sp in through_server:
        if opts.baseline_kv or opts.baseline_file:
            raise QualityError(f"server {sp.name}: KL divergence needs each token's whole distribution, which "
                               f"only llama-perplexity writes; {sp.engine_display} returns the prompt tokens' own "
                               "log-probabilities", "leave out --baseline* to measure perplexity, and compare it "
                               "with the baseline profile's own eval")
    targets = {}
    if opts.retrieval or through_server:   # before minutes of perplexity: is the server there?
        targets = {sp.name: bench_plan.target_for(plan, sp, deployer)
                   for sp in (servers if opts.retrieval else through_server)}
    results = []
    for sp in servers:
        res = _result(sp)
        res.settings = {"kv_cache": res.kv_cache, "context": res.context, "tokens_budget": opts.tokens,
                        "eval_text_sha256": quality.EVAL_TEXT_SHA256}
        if sp.name in by_server:
            # the chunk and the one generated token must fit the server's max_model_len
            ctx = min(opts.ppl_context or res.context, res.context - 1)
            _fill_ppl(res, quality.server_ppl(targets[sp.name], ctx, quality.chunks_for(ctx, opts.tokens), say),
                      None, None)
        elif opts.perplexity:
            ctx = opts.ppl_context or res.context
            base_sp, label = (baseline_plan(opts, loaded, sp, ignore_fit)
                              if opts.baseline_kv or opts.baseline_file else (None, None))
            with quality.scratch_dir() as scratch:
                run, base = measure_ppl(sp, base_sp, ctx, opts.tokens, scratch, say, label or "")
            _fill_ppl(res, run, base, label)
        if opts.retrieval:
            lengths = [n for n in (opts.lengths or quality.retrieval_lengths(res.context))]
            too_long = [n for n in lengths if n + quality.ANSWER_TOKENS > res.context]
            if too_long:
                raise QualityError(f"--lengths {too_long[0]}: the prompt and its answer exceed server {sp.name}'s "
                                   f"context of {res.context} tokens", f"use lengths up to "
                                   f"{res.context - quality.ANSWER_TOKENS}")
            got = quality.run_retrieval(targets[sp.name], lengths, opts.depths, opts.trials, say)
            _fill_retrieval(res, got)
        results.append(res)
    return results


# --------------------------------------------------------------------------- matrix

def matrix_contexts(context: int) -> list[int]:
    ladder = [n for n in (2048, 8192, 32768) if n <= context]
    return ladder or [context]


def check_kv(sp: ServerPlan, kvs: list[str]) -> None:
    caps = catalog.engine(sp.engine)
    bad = [k for k in kvs if k not in caps["kv_types"]]
    if bad:
        raise QualityError(f"--kv {bad[0]}: {sp.engine_display} has no such KV cache type",
                           f"{sp.engine_display} takes {', '.join(caps['kv_types'])}")


def eval_matrix(plan: Plan, loaded: LoadedProfile, deployer: Deployer, only: list[str] | None, opts: Options,
                say: Say, ignore_fit: bool = False) -> list[EvalResult]:
    """KV dtype × context for each server: perplexity and KLD against f16 KV at the same context
    (llama-perplexity), then a server per cell for retrieval and decode speed at that length."""
    out: list[EvalResult] = []
    kvs = list(dict.fromkeys(["f16", *opts.kv]))
    for sp in bench_plan.select(plan, only):
        check_kv(sp, kvs)
        if opts.perplexity:
            ppl_tool(sp, say)
        contexts = opts.contexts or matrix_contexts(context_of(sp))
        for ctx in contexts:
            cells = {kv: variant(loaded, sp.name, kv=kv, context=ctx, port=free_port(),
                                 name=_eval_name(plan.name), enforce_fit=not ignore_fit) for kv in kvs}
            results = {kv: _result(p.servers[0]) for kv, p in cells.items()}
            for kv, res in results.items():
                res.settings = {"kv_cache": kv, "context": ctx, "tokens_budget": opts.tokens,
                                "eval_text_sha256": quality.EVAL_TEXT_SHA256, "matrix": True}
            if opts.perplexity:
                _matrix_ppl(cells, results, ctx, opts, say)
            if opts.retrieval:
                for kv, cell in cells.items():
                    _matrix_retrieval(cell, results[kv], deployer, opts, say)
            out.extend(results.values())
    return out


def _eval_name(name: str) -> str:
    return (name[:58] + "-eval").replace("--", "-")


def _matrix_ppl(cells: dict[str, Plan], results: dict[str, EvalResult], ctx: int, opts: Options, say: Say) -> None:
    base_sp = cells["f16"].servers[0]
    limit = quality.kld_context_limit(base_sp.engine, _facts(base_sp).metadata)
    if limit is not None and ctx > limit:
        short = quality.kld_chunk(limit)
        note = (f"perplexity and KL divergence measured in chunks of {short} tokens, not {ctx}: "
                f"{base_sp.engine_display}'s {quality.PPL_TOOL} overflows a 32-bit index above {limit} with "
                "this vocabulary")
        for res in results.values():
            res.notes.append(note)
        say(f"context {ctx}: {note}")
        ctx = short
    chunks = quality.chunks_for(ctx, opts.tokens)
    try:
        check_memory(base_sp, ctx, True, f"the f16 baseline at context {ctx}")
    except QualityError as exc:
        for res in results.values():
            res.notes.append(f"perplexity not measured: {exc}")
        say(f"context {ctx}: perplexity skipped ({exc})")
        return
    with quality.scratch_dir() as scratch:
        text_file = Path(scratch) / "eval.txt"
        text_file.write_text(quality.eval_text(), encoding="utf-8")
        base_file = Path(scratch) / "base.kld"
        try:
            say(f"context {ctx}: f16 KV (baseline), {chunks} chunk(s)")
            base = quality.run_ppl(quality.ppl_argv(ppl_tool(base_sp), _flags(base_sp), ctx, chunks, str(text_file),
                                                    str(base_file)), scratch)
            _fill_ppl(results["f16"], base, None, None)
            for kv, cell in cells.items():
                if kv == "f16":
                    continue
                sp = cell.servers[0]
                say(f"context {ctx}: {kv} KV, KL divergence against f16")
                try:
                    run = quality.run_ppl(quality.ppl_argv(ppl_tool(sp), _flags(sp), ctx, chunks, None,
                                                           str(base_file), kld=True), scratch)
                except QualityError as exc:
                    results[kv].notes.append(f"perplexity not measured: {exc}")
                    continue
                _fill_ppl(results[kv], run, base, "same server with f16 KV cache")
        finally:
            base_file.unlink(missing_ok=True)


def _matrix_retrieval(cell: Plan, res: EvalResult, deployer: Deployer, opts: Options, say: Say) -> None:
    sp = cell.servers[0]
    say(f"context {res.context}: starting a {res.kv_cache}-KV server on port {sp.port}")
    try:
        started = bench_plan.start(deployer, cell, None)
    except OrchestratorError as exc:
        res.notes.append(f"retrieval not measured: {exc}")
        return
    try:
        target = bench_plan.target_for(cell, sp, deployer)
        lengths = opts.lengths or [res.context - quality.ANSWER_TOKENS - 4]
        got = quality.run_retrieval(target, [n for n in lengths if n + quality.ANSWER_TOKENS <= res.context],
                                    opts.depths, opts.trials, say)
        _fill_retrieval(res, got)
    except OrchestratorError as exc:
        res.notes.append(f"retrieval not measured: {exc}")
    finally:
        started.stop()


# --------------------------------------------------------------------------- saved results → plan

def quality_notes(plan: Plan, results_path: Path) -> dict[str, str]:
    """For each server of the plan, the latest saved eval (not --matrix) that measured the same engine,
    model, KV type and context: one line to show under `orchestrate plan`."""
    from orchestrator.measure import bench

    notes: dict[str, str] = {}
    for entry in bench.saved(results_path, "eval"):
        for r in entry.get("servers", []):
            for sp in plan.servers:
                if r.get("settings", {}).get("matrix"):
                    continue
                if (r.get("server") == sp.name and r.get("engine") == sp.engine and
                        r.get("model_path") == sp.model_location and r.get("kv_cache") == kv_of(sp) and
                        r.get("context") == context_of(sp)):
                    notes[sp.name] = describe(r, entry.get("time", ""))
    return notes


def describe(r: dict[str, Any], when: str) -> str:
    parts = []
    if r.get("perplexity") is not None:
        parts.append(f"perplexity {r['perplexity']:.3f} ({r.get('tokens')} tokens at context {r.get('ppl_context')})")
    if r.get("kld_mean") is not None:
        parts.append(f"KLD vs {r.get('baseline')}: mean {r['kld_mean']:.5f}, p99 {r['kld_p99']:.4f}, top-1 "
                     f"agreement {r['top1_agreement']:.1%}")
    ret = r.get("retrieval") or []
    if ret:
        correct = sum(c["accuracy"] * c.get("trials", 1) for c in ret)
        total = sum(c.get("trials", 1) for c in ret)
        longest = max(c["context_tokens"] for c in ret)
        parts.append(f"pass-key retrieval {correct:.0f}/{total} up to {longest} tokens")
    return f"measured {when}: " + "; ".join(parts) if parts else f"measured {when}: nothing recorded"


def plot(results: list[EvalResult], path: str) -> None:
    """The matrix as four panels against context length, one line per KV type: KLD vs f16,
    perplexity, retrieval accuracy and decode tok/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise QualityError("--plot needs matplotlib", "pip install 'orchestrator[plot]'") from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("kld_mean", "mean KLD vs f16 KV", True), ("perplexity", "perplexity", False),
              ("retrieval", "pass-key retrieval accuracy", False), ("decode_tps", "decode tok/s (at length)", False))
    series: dict[tuple[str, str], list[EvalResult]] = {}
    for r in results:
        series.setdefault((f"{r.engine} {r.server}", r.kv_cache), []).append(r)
    for ax, (key, title, log) in zip(axes.flat, panels, strict=True):
        for (who, kv), rows in series.items():
            rows = sorted(rows, key=lambda r: r.context)
            if key == "retrieval":
                ys = [sum(c["accuracy"] for c in r.retrieval) / len(r.retrieval) if r.retrieval else None
                      for r in rows]
            else:
                ys = [getattr(r, key) for r in rows]
            pts = [(r.context, y) for r, y in zip(rows, ys, strict=True) if y is not None and (not log or y > 0)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{who} {kv}")
        ax.set(title=title, xlabel="context tokens")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    r0 = results[0]
    fig.suptitle(f"{r0.model}: KV cache precision × context ({r0.eval_text})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
