"""`orchestrate tune`: measure the knobs the rules cannot know on this machine, keep the winner.

Candidates vary the knobs a plan is unsure of (threads, ubatch, FlashAttention, the KV type where the
user allows another, draft length with speculative decoding, -ncmoe near the fit boundary, fewer slots
than simultaneous requests); each is a
plan made by the planner itself (the candidate's flags handed over as a lock, so every other flag
keeps its rule), started by the deployer, measured with bench's client on the workload's shape, and
stopped again: one *visit*. Rounds are interleaved, and the planned configuration runs twice per
round as two arms, A at the start and B at the end: the difference between those identical
configurations is the noise a change must beat. Successive halving prunes the field after each round
to fit the budget. The winner's flags (those that differ from the rules) go into the lock.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.facts.lock import Tuning, now_iso
from orchestrator.facts.types import Facts, LockedServer
from orchestrator.measure import bench
from orchestrator.measure.bench_plan import target_for
from orchestrator.plan.model import Plan, ServerPlan
from orchestrator.plan.planner import flash_attention_on, plan
from orchestrator.profile import LoadedProfile, Server
from orchestrator.runtime.deployer import Deployer

Say = Callable[[str], None]
Flags = tuple[tuple[str, str | None], ...]
OBJECTIVE = "tok/s (workload)"
MIN_NOISE = 0.02     # never accept a change smaller than this, however quiet two arms happened to be


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    concurrency: int = 1
    requests: int = 1          # rounds of `concurrency` requests per visit
    depth: int = 0             # tokens of a shared, cached prefix every request begins with

    def describe(self) -> str:
        at = f" at depth {self.depth} (a shared prefix, cached)" if self.depth else ""
        return (f"{self.concurrency}× ({self.prompt_tokens} prompt + {self.gen_tokens} generated tokens){at}, "
                f"{self.requests} round(s) per visit")


def workload_for(srv: Server, shape: dict[str, int | None]) -> Workload:
    """The shape tune measures: each option given on the command line, else the server's workload:
    section, else the defaults (concurrency: the server's parallel)."""
    given = srv.workload
    base = Workload() if given is None else Workload(given.prompt_tokens, given.gen_tokens,
                                                     given.concurrency or srv.parallel, given.requests, given.depth)
    depth = shape.get("depth")
    return Workload(shape.get("prompt_tokens") or base.prompt_tokens, shape.get("gen_tokens") or base.gen_tokens,
                    shape.get("concurrency") or (base.concurrency if given is not None else srv.parallel),
                    shape.get("requests") or base.requests, base.depth if depth is None else depth)


@dataclass
class Candidate:
    flags: Flags                   # differing from the plan; () = the planned configuration
    label: str
    scores: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    failed: str = ""
    out_in_round: int | None = None  # the round after which successive halving dropped it

    @property
    def median(self) -> float | None:
        return statistics.median(self.scores) if self.scores else None

    def row(self, planned: float | None) -> dict[str, Any]:
        med = self.median
        status = ("failed: " + self.failed if self.failed else
                  f"dropped after round {self.out_in_round}" if self.out_in_round is not None else "finalist")
        return {"flags": self.label, "visits": len(self.scores), "median": _r(med),
                "prefill_tps": _r(statistics.median(self.prefill) if self.prefill else None),
                "decode_tps": _r(statistics.median(self.decode) if self.decode else None),
                "ttft_ms": _r(statistics.median(self.ttft_ms) if self.ttft_ms else None, 1),
                "vs_planned": _r(med / planned, 3) if med and planned else None, "status": status}


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def label(flags: Flags) -> str:
    return " ".join(f"{n} {v}" if v is not None else n for n, v in flags) or "planned"


# --------------------------------------------------------------------------- candidates

def _flag(sp: ServerPlan, name: str) -> str | None:
    return next((f.value for f in sp.flags if f.name == name), None)


def knobs(sp: ServerPlan, facts: Facts, parallel: int, cores: int, kv_allowed: list[str],
          prompt_tokens: int = 512, concurrency: int = 1) -> dict[str, list[Flags]]:
    """Per knob, the settings to try besides the planned one (each a tuple of flags set together).
    Settings that cannot differ from the planned one on this workload are left out: all cores when
    the plan leaves threads at the engine's default (which is all cores), a ubatch at or above the
    prompt length when the planned one is too, fewer slots when requests come one at a time."""
    out: dict[str, list[Flags]] = {}
    if sp.engine not in ("llama.cpp", "ik_llama"):
        return out
    if _flag(sp, "-t") is None:   # threads: in the profile, the user's choice stands
        out["threads"] = [(("-t", str(n)),) for n in sorted({max(1, cores // 2), max(1, cores - 1), cores})
                          if n != cores]
    ub = int(_flag(sp, "-ub") or 512)
    out["ubatch"] = [(("-ub", str(n)),) for n in (128, 256, 1024) if min(n, prompt_tokens) != min(ub, prompt_tokens)]
    fa = _flag(sp, "-fa")
    model = facts.models[sp.name]
    can_fa = flash_attention_on(sp.engine, facts.gpu.is_cpu, parallel, model)
    kv = sp.settings.kv_cache if sp.settings else "f16"
    quant_v = kv not in ("f16", "bf16")
    out["flash_attention"] = [(("-fa", v),) for v in ("on", "off")
                              if v != fa and (v == "on" and can_fa or v == "off" and not quant_v)]
    out["kv_cache"] = [(("-ctk", k), ("-ctv", k)) for k in kv_allowed if k != kv and can_fa]
    draft = "--spec-draft-n-max" if _flag(sp, "--spec-draft-n-max") else "--draft-max" if _flag(sp, "--draft-max") else None
    if draft:
        n = int(_flag(sp, draft) or 3)
        out["draft_tokens"] = [((draft, str(k)),) for k in (n - 2, n - 1, n + 1, n + 2) if k >= 1]
    ncmoe = _flag(sp, "-ncmoe")
    if ncmoe is not None and ncmoe.isdigit():
        n = int(ncmoe)
        out["ncmoe"] = [(("-ncmoe", str(k)),) for k in (n - 2, n - 1, n + 1, n + 2) if k >= 0]
    # Slots: fewer than the requests that arrive together, so the rest queue and each batch is smaller.
    # Never more than planned: -c is the profile's context × parallel, split evenly across the slots, so
    # more slots would give each less context than the profile asks for; fewer give each more.
    np_ = _flag(sp, "-np")
    if np_ is not None and np_.isdigit() and concurrency > 1:
        n = int(np_)
        out["slots"] = [(("-np", str(k)),) for k in sorted({max(1, min(n, concurrency) // 2), 1}) if k < min(n, concurrency)]
    user = {f.value for f in sp.flags if f.source == "user"}
    return {k: v for k, v in out.items() if v and not USER_NAMES.get(k, set()) & user}


# The options the user's extra_args may already set for a knob: the user's choice stands.
USER_NAMES = {"threads": {"-t", "--threads"}, "ubatch": {"-ub", "--ubatch-size"},
              "flash_attention": {"-fa", "--flash-attn"},
              "kv_cache": {"-ctk", "-ctv", "--cache-type-k", "--cache-type-v"},
              "draft_tokens": {"--spec-draft-n-max", "--draft-max", "--draft"}, "ncmoe": {"-ncmoe", "--n-cpu-moe"},
              "slots": {"-np", "--parallel"}}


def _compatible(flags: Flags) -> bool:
    """A quantized V cache needs FlashAttention."""
    d = dict(flags)
    return not (d.get("-fa") == "off" and d.get("-ctv") not in (None, "f16", "bf16"))


def candidates(by_knob: dict[str, list[Flags]], limit: int) -> list[Flags]:
    """Every combination of the knobs' settings (each knob at its planned value or one alternative),
    fewest changes first: single-knob changes, then pairs, …, up to `limit`."""
    options: list[list[Flags]] = [[(), *alts] for alts in by_knob.values()]
    combos: list[Flags] = [()]
    for opts in options:
        combos = [a + b for a in combos for b in opts]
    combos = [c for c in combos if c and _compatible(c)]
    combos.sort(key=lambda c: (len({n for n, _ in c} - {"-ctv"}), label(c)))
    return combos[:limit]


# --------------------------------------------------------------------------- measuring

@dataclass
class Tuner:
    loaded: LoadedProfile
    facts: Facts
    rules: Plan
    server: str
    deployer: Deployer
    workload: Workload
    budget_s: float
    say: Say = lambda msg: None
    seed: int = 0
    visits: int = 0
    spent_s: float = 0.0
    log: list[str] = field(default_factory=list)

    def candidate_plan(self, flags: Flags) -> Plan:
        if not flags:
            return self.rules
        facts = replace(self.facts, locks={self.server: LockedServer("(tune candidate)", flags, "tune candidate")})
        return plan(self.loaded, facts, enforce_fit=False)

    def visit(self, cand: Candidate) -> None:
        """Start the candidate, measure one visit, stop it."""
        self.visit_plan(self.candidate_plan(cand.flags), cand)

    def visit_plan(self, p: Plan, cand: Candidate) -> None:
        """One visit of any plan of this server (benchmarks/tune.py measures the engine's defaults so)."""
        t0 = time.monotonic()
        try:
            [result] = self.deployer.up(p, [self.server])
            if not result.ok:
                cand.failed = f"{result.stage or 'start'}: {result.detail}"[:200]
                return
            w = self.workload
            t = target_for(p, p.server(self.server), self.deployer)
            prompts = bench.Prompts(t)
            bench.warm_up(t, prompts)
            prefix = bench.prime_prefix(t, prompts, w.depth, w.concurrency) if w.depth else None
            samples, wall = bench.run_level(t, prompts, w.concurrency, w.prompt_tokens, w.gen_tokens, w.requests,
                                            prefix)
            level = bench.summarize(w.concurrency, samples, wall)
            if level.errors or not level.throughput_tps:
                cand.failed = "requests failed: " + "; ".join(level.error_examples)
                return
            cand.scores.append(level.throughput_tps)
            if level.prefill_tps:
                cand.prefill.append(level.prefill_tps)
            if level.decode_tps:
                cand.decode.append(level.decode_tps)
            if level.ttft_ms:
                cand.ttft_ms.append(level.ttft_ms)
        finally:
            self.deployer.down(p.name, [self.server])
            self.visits += 1
            self.spent_s += time.monotonic() - t0

    @property
    def cost(self) -> float:
        return self.spent_s / self.visits if self.visits else 0.0

    def left(self) -> float:
        return self.budget_s - self.spent_s

    def progress(self, i: int, total: int, rnd: int, cand: Candidate) -> None:
        eta = min(max(0.0, (total - i) * self.cost), max(0.0, self.left())) if self.visits else None
        self.say(f"round {rnd}: {i}/{total} {cand.label}" + (f", ETA {_duration(eta)}" if eta is not None else "")
                 + f" (spent {_duration(self.spent_s)} of {_duration(self.budget_s)})")


def _duration(s: float) -> str:
    s = round(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Outcome:
    server: str
    workload: Workload
    planned: list[Candidate]           # the two identical planned arms
    field: list[Candidate]
    winner: Candidate | None           # None: the planned configuration held
    gain: float | None
    noise: float
    reason: str
    rounds: int
    spent_s: float
    visits: int
    untried: int = 0                   # candidates the budget left out (fewest changes were tried first)

    def planned_median(self) -> float | None:
        pooled = [s for arm in self.planned for s in arm.scores]
        return statistics.median(pooled) if pooled else None

    def tuning(self) -> Tuning:
        planned = self.planned_median()
        w = self.winner
        figures: dict[str, Any] = {
            "planned_median": _r(planned), "noise": _r(self.noise, 3), "rounds": self.rounds, "visits": self.visits,
            "spent_s": round(self.spent_s), "arms": [_r(a.median) for a in self.planned],
            "tried": len(self.field), "untried": self.untried}
        if w is not None:
            figures.update(gain=_r(self.gain, 3), median=_r(w.median),
                           prefill_tps=_r(statistics.median(w.prefill) if w.prefill else None),
                           decode_tps=_r(statistics.median(w.decode) if w.decode else None))
        cands = [{"flags": "planned (A)", **_row_tail(self.planned[0].row(planned))},
                 {"flags": "planned (B)", **_row_tail(self.planned[1].row(planned))},
                 *[c.row(planned) for c in self.field]]
        return Tuning(w.flags if w else (), self.reason, now_iso(), OBJECTIVE,
                      {"prompt_tokens": self.workload.prompt_tokens, "gen_tokens": self.workload.gen_tokens,
                       "concurrency": self.workload.concurrency, "requests_per_visit": self.workload.requests,
                       **({"depth": self.workload.depth} if self.workload.depth else {})},
                      figures, tuple(cands))


def _row_tail(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "flags"}


def _noise(a: Candidate, b: Candidate) -> float:
    """The spread between the identical planned arms: the larger of the difference of their medians
    and half the range of their pooled visits, relative to the pooled median."""
    pooled = a.scores + b.scores
    if len(pooled) < 2 or a.median is None or b.median is None:
        return 1.0
    mid = statistics.median(pooled)
    return max(abs(a.median - b.median) / mid, (max(pooled) - min(pooled)) / (2 * mid), MIN_NOISE)


def _round(t: Tuner, rnd: int, order: list[Candidate], total: int, done: int) -> tuple[int, bool]:
    """One interleaved round (its last visit: planned arm B); False when the budget ran out before its
    end. Arm B is measured at least once even so: without it there is no noise to judge a change by."""
    arm_b = order[-1]
    for cand in order:
        if t.visits and t.left() < t.cost:
            if not arm_b.scores and not arm_b.failed:
                t.progress(done, total, rnd, arm_b)
                t.visit(arm_b)
                done += 1
            return done, False
        t.progress(done, total, rnd, cand)
        t.visit(cand)
        done += 1
        if cand.failed:
            t.say(f"  {cand.label}: {cand.failed}")
    return done, True


def _planned_total(n: int, min_visits: int) -> int:
    total, alive = 1, n
    rounds = 0
    while alive > 1 or rounds < min_visits:
        total += alive + 2
        alive = max(1, math.ceil(alive / 2))
        rounds += 1
    return total


def successive_halving(t: Tuner, pool: list[Flags], min_visits: int = 3) -> Outcome:
    a, b = Candidate((), "planned (A)"), Candidate((), "planned (B)")
    t.say(f"measuring the planned configuration first ({t.workload.describe()})")
    t.visit(a)
    if a.failed:
        raise OrchestratorError(f"server {t.server}: the planned configuration did not run for tuning: {a.failed}",
                                f"fix it first (orchestrate up {t.loaded.file}, orchestrate logs)")
    # Prune to fit: the first round (every candidate once, plus arm B) may take at most 60% of the budget.
    # On a slow machine at least one candidate, while the budget holds it and arm B once more.
    fits = int((t.left() * 0.6) // max(t.cost, 1e-3)) - 1
    fits = max(fits, min(1, int(t.left() // max(t.cost, 1e-3)) - 1), 0)
    if fits < len(pool):
        t.say(f"budget {_duration(t.budget_s)} at ~{t.cost:.1f} s per visit: trying {fits} of {len(pool)} "
              "candidates (fewest changes first)")
    field_ = [Candidate(f, label(f)) for f in pool[:fits]]
    alive = list(field_)
    rng = random.Random(t.seed)  # noqa: S311 - the order of a round, not a secret
    total = _planned_total(len(alive), min_visits)
    done, rnd, complete = 1, 0, True
    while complete:
        rnd += 1
        order = alive[:]
        rng.shuffle(order)
        order = ([a] if rnd > 1 else []) + order + [b]
        done, complete = _round(t, rnd, order, total, done)
        alive = [c for c in alive if not c.failed and c.scores]
        alive.sort(key=lambda c: c.median or 0.0, reverse=True)
        keep = max(1, math.ceil(len(alive) / 2)) if len(alive) > 1 else len(alive)
        for c in alive[keep:]:
            c.out_in_round = rnd
        alive = alive[:keep]
        if len(alive) <= 1 and rnd >= min_visits:
            break
    out = _decide(t, a, b, field_, alive, rnd)
    out.untried = len(pool) - len(field_)
    return out


def _decide(t: Tuner, a: Candidate, b: Candidate, field_: list[Candidate], alive: list[Candidate],
            rounds: int) -> Outcome:
    noise = _noise(a, b)
    planned = statistics.median(a.scores + b.scores)
    best = max(alive, key=lambda c: c.median or 0.0) if alive else None
    gain = (best.median / planned - 1) if best and best.median else None
    arms = f"planned A {a.median:.2f} / B {b.median or 0:.2f} {OBJECTIVE}"
    if not field_:
        reason = (f"the budget allowed no candidate at ~{t.cost:.0f} s per visit ({arms}): the rules' flags are "
                  "kept; give a larger --budget")
        winner = None
    elif best is None or gain is None:
        reason = f"no candidate ran to the end ({arms}): the rules' flags are kept"
        winner = None
    elif gain > noise and len(best.scores) < 2:
        reason = (f"the planned flags held: the best candidate, {best.label}, measured {gain:+.1%} but only once "
                  f"(a single visit shows no spread of its own; ±{noise:.1%} between the planned arms): give a "
                  "larger --budget")
        winner = None
    elif gain > noise:
        reason = (f"{best.label} won: {best.median:.2f} vs planned {planned:.2f} {OBJECTIVE} over "
                  f"{len(best.scores)} visits ({gain:+.1%}), beyond the ±{noise:.1%} spread between two identical "
                  f"planned arms ({arms})") + _latency_cost(best, a, b)
        winner = best
    else:
        reason = (f"the planned flags held: the best candidate, {best.label}, measured {gain:+.1%} "
                  f"({best.median:.2f} vs {planned:.2f} {OBJECTIVE}), within the ±{noise:.1%} spread between two "
                  f"identical planned arms ({arms})")
        winner = None
    return Outcome(t.server, t.workload, [a, b], field_, winner, gain, noise, reason, rounds, t.spent_s, t.visits)


def _latency_cost(best: Candidate, a: Candidate, b: Candidate) -> str:
    """What the winner costs the first token, when it costs it more than a quarter (fewer slots than
    requests: the rest wait in the engine's queue)."""
    planned = a.ttft_ms + b.ttft_ms
    if not best.ttft_ms or not planned:
        return ""
    won, was = statistics.median(best.ttft_ms), statistics.median(planned)
    if won <= was * 1.25:
        return ""
    why = " (fewer slots than simultaneous requests: the others queue)" if "-np" in dict(best.flags) else ""
    return f"; its median time to first token is {won:.0f} ms against {was:.0f} ms planned{why}"


def tune(loaded: LoadedProfile, facts: Facts, rules: Plan, server: str, deployer: Deployer, workload: Workload,
         budget_s: float, kv_allowed: list[str], say: Say, cores: int) -> Outcome:
    sp = rules.server(server)
    rec = deployer.store.load(rules.name).get(server)
    if rec is not None and deployer.alive(rec):
        raise OrchestratorError(f"server {server} of {rules.name} is running: tune starts and stops it for every "
                                "candidate", f"stop it first: orchestrate down {loaded.file} --server {server}")
    srv = next(s for s in loaded.profile.servers if s.name == server)
    by_knob = knobs(sp, facts, srv.parallel, cores, kv_allowed, workload.prompt_tokens, workload.concurrency)
    if not by_knob:
        raise OrchestratorError(f"server {server}: nothing to tune for {sp.engine_display}",
                                "tune knows the llama.cpp and ik_llama.cpp knobs (threads, ubatch, FlashAttention, "
                                "KV type, draft length, -ncmoe, slots)")
    pool = candidates(by_knob, limit=64)
    say(f"{server}: {len(pool)} candidates over {', '.join(by_knob)}; budget {_duration(budget_s)}")
    t = Tuner(loaded, facts, rules, server, deployer, workload, budget_s, say)
    return successive_halving(t, pool)


def tune_profile(profile: str, servers: list[str] | None, deployer: Deployer, budget_s: float,
                 shape: dict[str, int | None], kv_allowed: list[str], say: Say) -> tuple[list[Outcome], str, list[str]]:
    """Tune each chosen server (the budget split between them), then write the winners into the lock
    beside the profile. Returns the outcomes, the lock's path and what the lock write said."""
    import os

    from orchestrator import pipeline
    from orchestrator.measure.bench_plan import select
    from orchestrator.profile import load

    loaded = load(profile)
    facts = pipeline.gather(loaded)
    rules = plan(loaded, facts)
    pipeline.verify_flags(loaded, rules, facts)
    if deployer.fetch_models(rules):
        facts = pipeline.gather(loaded)
        rules = plan(loaded, facts)
    chosen = select(rules, servers)
    outcomes = []
    for sp in chosen:
        srv = next(s for s in loaded.profile.servers if s.name == sp.name)
        w = workload_for(srv, shape)
        outcomes.append(tune(loaded, facts, rules, sp.name, deployer, w, budget_s / len(chosen), kv_allowed, say,
                             os.cpu_count() or 1))
    path, said = pipeline.write_lock(profile, {o.server: o.tuning() for o in outcomes})
    return outcomes, str(path), said
