"""orchestrate bench against real llama.cpp and ik_llama.cpp servers on the Gemma 3 270M GGUF.

Accuracy: for every request, bench's own clock (streamed chunks) agrees with the engine's own
timings for the same request: decode within 5%, prefill within 5%, and TTFT is the engine's
prompt time plus a small HTTP/sampling overhead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.engines
ENGINES = ["llama.cpp", "ik_llama"]
PROMPT, GEN = 256, 48


def _slug(engine: str) -> str:
    return engine.replace(".", "").replace("_", "")


@pytest.mark.parametrize("engine", ENGINES)
def test_bench_agrees_with_engine_timings(engine: str, env, gemma: Path, built_engines: None) -> None:
    profile = env.profile(f"bench-{_slug(engine)}", engine=engine, parallel=2,
                          model={"path": str(gemma), "served_name": "gemma"})
    r = env.run("bench", str(profile), "--up", "--json", "--samples", "--prompt-tokens", str(PROMPT),
                "--gen-tokens", str(GEN), "--concurrency", "1,2", "--runs", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    [res] = json.loads(r.stdout)
    assert res["tokenizer"].startswith("server tokenizer")
    levels = {lv["concurrency"]: lv for lv in res["levels"]}
    assert sorted(levels) == [1, 2]
    for lv in levels.values():
        assert lv["errors"] == 0 and lv["requests"] == 3 * lv["concurrency"]
        for key in ("ttft_ms", "ttft_p95_ms", "prefill_tps", "decode_tps", "throughput_tps", "itl_ms"):
            assert lv[key] and lv[key] > 0, key
        assert lv["ttft_p95_ms"] >= lv["ttft_ms"]
    # Aggregate throughput counts every stream's tokens over the round's wall time, which the slowest
    # request bounds from below: never more than streams × the fastest per-stream rate.
    assert levels[2]["throughput_tps"] <= 2 * max(s["decode_tps"] for s in res["samples"]) * 1.01
    samples = res["samples"]
    assert len(samples) == 9
    for s in samples:
        assert s["ok"], s
        assert s["prompt_tokens"] == PROMPT, "the prompt is exactly the requested token count"
        assert s["completion_tokens"] == GEN, "ignore_eos: every request generates the requested tokens"
        server = s["server"]
        assert server["prompt_n"] == PROMPT and server["predicted_n"] == GEN, server
        if s["concurrency"] != 1:
            continue  # with two streams the engine's per-slot clock and ours split a shared batch differently
        assert s["decode_tps"] == pytest.approx(server["predicted_per_second"], rel=0.05), s
        assert s["prefill_tps"] == pytest.approx(server["prompt_per_second"], rel=0.05), s
        ttft_ms = s["ttft_s"] * 1000
        assert server["prompt_ms"] <= ttft_ms <= server["prompt_ms"] * 1.05 + 15, (ttft_ms, server["prompt_ms"])
    # The shared-prefix run: the engine reports the reused tokens, and the second request skips prefill.
    p = res["prefix"]
    assert p["counter"].startswith("engine timings")
    assert p["cold_processed"] >= p["prefix_tokens"]
    if engine == "llama.cpp":   # --swa-full (planned for this sliding-window model) keeps the prefix reusable
        assert p["cached_tokens"] >= p["prefix_tokens"] - 1
        assert p["warm_processed"] <= 33   # only the 32-token suffix
        assert p["warm_ttft_ms"] < p["cold_ttft_ms"]
    else:                       # this ik build re-processes it, and the plan says so
        assert p["cached_tokens"] == p["cold_processed"] - p["warm_processed"]
        plan = env.run("plan", str(profile))
        assert "re-processes a prompt that diverges" in plan.stdout
    assert res["rss_peak_bytes"] > 200 * 2**20
    rf = res["roofline"]
    # The roofline is an estimate (bandwidth measured by parallel reads a moment apart from decode on a
    # shared machine): decode sits near it, never far above.
    assert rf["bandwidth_source"].startswith("measured") and 0.1 < rf["achieved_share"] < 1.3
    assert env.records(profile.stem) == {}, "--up stops what it started"


def test_bench_table_save_and_plot(env, gemma: Path, built_engines: None, tmp_path: Path) -> None:
    profile = env.profile("bench-table", model={"path": str(gemma), "served_name": "gemma"})
    up = env.run("up", str(profile))
    assert up.returncode == 0, up.stderr
    results = tmp_path / "results.jsonl"
    args = ["bench", str(profile), "--prompt-tokens", "64", "--gen-tokens", "16", "--concurrency", "1",
            "--runs", "1", "--no-prefix", "--save", "--results", str(results)]
    first = env.run(*args, "--plot", str(tmp_path / "bench.png"))
    assert first.returncode == 0, first.stderr
    assert "TTFT p50 ms" in first.stdout and "decode roofline" in first.stdout
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    second = env.run(*args)
    assert second.returncode == 0, second.stderr
    assert "vs last saved run" in second.stdout and "decode ×" in second.stdout
    lines = results.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["profile"] == "bench-table" for x in lines)
    assert env.records("bench-table"), "bench without --up leaves the running server alone"

    # The profile now names another model than the one the server serves: a clear error, nothing measured.
    doc = yaml.safe_load(profile.read_text())
    doc["servers"][0]["model"]["served_name"] = "other"
    profile.write_text(yaml.safe_dump(doc))
    wrong = env.run("bench", str(profile), "--no-prefix", "--runs", "1")
    assert wrong.returncode == 1
    assert "serves gemma, not 'other'" in wrong.stderr and "orchestrate up again" in wrong.stderr


def test_compare_runs_interleaved_and_reports_ratios(env, gemma: Path, built_engines: None) -> None:
    a = env.profile("cmp-a", engine="llama.cpp", model={"path": str(gemma), "served_name": "gemma"})
    b = env.profile("cmp-b", engine="ik_llama", model={"path": str(gemma), "served_name": "gemma"})
    r = env.run("bench", "--compare", str(a), str(b), "--json", "--prompt-tokens", "64", "--gen-tokens", "16",
                "--concurrency", "1", "--runs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["rounds"] == 2 and out["mode"].startswith("both profiles up")
    ratios = {x["metric"]: x for x in out["servers"][0]["ratios"]}
    d = ratios["c=1 decode_tps"]
    assert d["a"] > 0 and d["b"] > 0 and d["low"] <= d["ratio"] <= d["high"]
    assert d["ratio"] == pytest.approx(d["b"] / d["a"], rel=0.25)
    assert "round 2/2: B = cmp-b" in r.stderr
    assert env.records("cmp-a") == {} and env.records("cmp-b") == {}, "compare stops what it started"


def test_bench_bad_input(env, gemma: Path) -> None:
    profile = env.profile("bench-bad", model={"path": str(gemma), "served_name": "gemma"})
    r = env.run("bench", str(profile))
    assert r.returncode == 1
    assert "server s of bench-bad is not running" in r.stderr and "--up" in r.stderr
    r = env.run("bench", str(profile), "--prompt-tokens", "0")
    assert r.returncode == 2 and "--prompt-tokens" in r.stderr
    r = env.run("bench", str(profile), "--concurrency", "1,x")
    assert r.returncode == 2 and "comma-separated whole numbers" in r.stderr
    r = env.run("bench", str(profile), "--concurrency", "0")
    assert r.returncode == 2 and "1 or more" in r.stderr
    r = env.run("bench", "--compare", str(profile))
    assert r.returncode == 2 and "exactly two profiles" in r.stderr
    r = env.run("bench", str(profile), "--server", "nope")
    assert r.returncode == 1 and "no server named nope" in r.stderr


@pytest.mark.parametrize("when", ["starting", "measuring"])
def test_sigterm_stops_the_servers_bench_up_started(when: str, env, gemma: Path, built_engines: None) -> None:
    """SIGTERM (a CI timeout, systemd, kill) unwinds like Ctrl-C: bench --up stops the server it
    started, whether the signal lands while the server is starting or while it is measured."""
    import signal
    import time

    import psutil
    import requests

    profile = env.profile(f"bench-term-{when}", model={"path": str(gemma), "served_name": "gemma"},
                          health={"timeout": 120, "interval": 1})
    p = env.popen("bench", str(profile), "--up", "--prompt-tokens", "256", "--gen-tokens", "64",
                  "--concurrency", "1", "--runs", "50", "--no-prefix")
    pid = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and p.poll() is None and pid is None:
        recs = env.records(profile.stem)   # written as soon as the server is spawned, before health
        pid = recs["s"].pid if recs else None
        time.sleep(0.05)
    if when == "measuring":   # healthy, through up's remaining stages, into 50 requests of 64 tokens
        port = yaml.safe_load(profile.read_text())["servers"][0]["port"]
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)
        time.sleep(6)
    assert pid is not None and p.poll() is None, "the server never started"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert env.records(profile.stem) == {}, "the server bench started is stopped and forgotten"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_bench_at_depth_measures_after_a_cached_prefix(env, gemma: Path, built_engines: None) -> None:
    """--depth: every request starts after the same 512 cached tokens; the engine evaluates only each
    request's own prompt, and the prefill rate counts those tokens."""
    profile = env.profile("bench-depth", model={"path": str(gemma), "served_name": "gemma"}, context=2048)
    r = env.run("bench", str(profile), "--up", "--json", "--samples", "--no-prefix", "--depth", "512",
                "--prompt-tokens", "64", "--gen-tokens", "8", "--concurrency", "1", "--runs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    [res] = json.loads(r.stdout)
    assert res["depth"] == 512 and "shared prefix" in r.stderr
    for s in res["samples"]:
        assert s["ok"] and s["prompt_tokens"] == 512 + 64
        assert s["cached_tokens"] >= 511 and s["server"]["prompt_n"] <= 65, s["server"]
        assert s["prefill_tps"] == pytest.approx((s["prompt_tokens"] - s["cached_tokens"]) / s["ttft_s"])
    assert "after 512 cached tokens" not in r.stdout   # --json: no table
    table = env.run("bench", str(profile), "--up", "--no-prefix", "--depth", "512", "--prompt-tokens", "64",
                    "--gen-tokens", "8", "--concurrency", "1", "--runs", "1")
    assert table.returncode == 0 and "after 512 cached tokens of context" in table.stdout, table.stdout
