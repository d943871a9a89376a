"""orchestrate eval with real llama.cpp and ik_llama.cpp builds on the Gemma 3 270M GGUF.

Small on purpose (one 512-token chunk, 255 scored tokens, per measurement, one pass key per cell): the
figures in docs/quality.md come from the full-size runs described there."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.engines
ENGINES = ["llama.cpp", "ik_llama"]
CTX = 512


def _slug(engine: str) -> str:
    return engine.replace(".", "").replace("_", "")


def _sig4(x: float) -> str:
    return f"{x:.4g}"


@pytest.mark.parametrize("engine", ENGINES)
def test_perplexity_is_stable_and_the_baseline_matches_itself(engine: str, env, gemma: Path,
                                                              built_engines: None) -> None:
    profile = env.profile(f"ppl-{_slug(engine)}", engine=engine, context=CTX,
                          model={"path": str(gemma), "served_name": "gemma"})
    args = ["eval", str(profile), "--no-retrieval", "--baseline-kv", "f16", "--tokens", "255", "--json"]
    first = env.run(*args)
    assert first.returncode == 0, first.stderr
    second = env.run(*args, "--save")
    assert second.returncode == 0, second.stderr
    [a], [b] = json.loads(first.stdout), json.loads(second.stdout)
    for r in (a, b):
        assert math.isfinite(r["perplexity"]) and 1 < r["perplexity"] < 1000
        assert r["tokens"] == CTX - 1 - CTX // 2 and r["chunks"] == 1 and r["ppl_context"] == CTX
        # the same settings as the baseline: nothing differs but the 16-bit rounding of the stored log-probs
        assert abs(r["kld_mean"]) < 1e-4 and r["kld_p99"] < 1e-3, r
        assert r["top1_agreement"] == 1.0
        assert r["perplexity"] == pytest.approx(r["perplexity_base"], rel=1e-3)
        assert r["settings"]["eval_text_sha256"] and r["kv_cache"] == "f16"
    assert _sig4(a["perplexity"]) == _sig4(b["perplexity"]), (a["perplexity"], b["perplexity"])
    assert "eval: s: baseline" in first.stderr, "progress goes to stderr"
    # the saved result is shown by plan for this profile
    plan = env.run("plan", str(profile))
    assert plan.returncode == 0, plan.stderr
    assert "quality of server s (orchestrate eval --save): measured" in plan.stdout
    assert f"perplexity {b['perplexity']:.3f} (255 tokens at context {CTX})" in plan.stdout
    assert "top-1 agreement 100.0%" in plan.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_matrix_orders_kv_types_and_measures_every_cell(engine: str, env, gemma: Path, built_engines: None,
                                                        tmp_path: Path) -> None:
    profile = env.profile(f"mx-{_slug(engine)}", engine=engine, context=CTX,
                          model={"path": str(gemma), "served_name": "gemma"})
    png = tmp_path / "matrix.png"
    r = env.run("eval", str(profile), "--matrix", "--tokens", "255", "--trials", "1", "--json", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    rows = {x["kv_cache"]: x for x in json.loads(r.stdout)}
    assert sorted(rows) == ["f16", "q4_0", "q8_0"]
    f16, q8, q4 = rows["f16"], rows["q8_0"], rows["q4_0"]
    assert f16["kld_mean"] is None and f16["baseline"] is None, "f16 is the baseline itself"
    # A coarser KV cache moves the next-token distribution further from f16's.
    assert 0 < q8["kld_mean"] < q4["kld_mean"], (q8["kld_mean"], q4["kld_mean"])
    assert q8["top1_agreement"] >= q4["top1_agreement"]
    assert f16["kv_cache_bytes"] > q8["kv_cache_bytes"] > q4["kv_cache_bytes"] > 0
    for row in rows.values():
        assert row["context"] == CTX and math.isfinite(row["perplexity"])
        assert [c["depth"] for c in row["retrieval"]] == [0.1, 0.5, 0.9]
        assert all(c["context_tokens"] == CTX - 16 and c["trials"] == 1 and c["accuracy"] in (0.0, 1.0)
                   for c in row["retrieval"])
        assert row["decode_tps"] and row["decode_tps"] > 0
        assert not row["notes"], row["notes"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert env.records(f"mx-{_slug(engine)}-eval") == {}, "the matrix stops the servers it started"


def test_retrieval_through_the_running_server(env, gemma: Path, built_engines: None) -> None:
    profile = env.profile("ret", engine="llama.cpp", context=CTX, model={"path": str(gemma), "served_name": "gemma"})
    up = env.run("up", str(profile))
    assert up.returncode == 0, up.stderr
    r = env.run("eval", str(profile), "--no-perplexity", "--lengths", "300,480", "--trials", "2", "--json")
    assert r.returncode == 0, r.stderr
    [res] = json.loads(r.stdout)
    cells = {(c["context_tokens"], c["depth"]): c for c in res["retrieval"]}
    assert sorted(cells) == [(n, d) for n in (300, 480) for d in (0.1, 0.5, 0.9)]
    for c in cells.values():
        assert c["trials"] == 2 and len(c["answers"]) == 2 and 0 <= c["accuracy"] <= 1
    assert res["perplexity"] is None and res["decode_tps"] > 0
    assert "text completion" in res["retrieval_method"]
    # bad input against the real server: a prompt that cannot fit the server's context
    long = env.run("eval", str(profile), "--no-perplexity", "--lengths", "1024")
    assert long.returncode == 1 and "exceed server s's context of 512" in long.stderr
    assert env.records("ret"), "eval without --up leaves the running server alone"


def test_baseline_that_does_not_fit_in_memory(env, gemma: Path, built_engines: None) -> None:
    profile = env.profile("big", engine="llama.cpp", context=CTX, model={"path": str(gemma), "served_name": "gemma"})
    # 65536-token chunks: the logits of 32768 scored positions × 262k vocabulary alone are 32 GiB.
    r = env.run("eval", str(profile), "--no-retrieval", "--baseline-kv", "f16", "--ppl-context", "65536")
    assert r.returncode == 1
    assert "the baseline (same server with f16 KV cache) does not fit in memory" in r.stderr
    assert "--ppl-context" in r.stderr
    r = env.run("eval", str(profile), "--no-retrieval", "--baseline-kv", "q6_0")
    assert r.returncode == 1 and "has no such KV cache type" in r.stderr
