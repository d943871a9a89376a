"""orchestrate eval without engines: the pinned text, llama-perplexity's real output in both builds'
formats, the pass-key harness on cases whose answer is known, memory checks and bad input."""

from __future__ import annotations

import hashlib
import json
import lzma
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from orchestrator.measure import bench, quality
from orchestrator.measure import eval_plan as evalrun

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "perplexity"
ROOT = Path(__file__).resolve().parents[2]


def test_eval_text_is_the_pinned_public_domain_book() -> None:
    text = quality.eval_text()
    assert hashlib.sha256(text.encode()).hexdigest() == quality.EVAL_TEXT_SHA256
    assert text.startswith("THE ADVENTURES OF SHERLOCK HOLMES")
    assert "Gutenberg" not in text, "the distributor's header, footer and license are not part of the text"
    assert len(text) > 500_000   # two 32k-token chunks need ~260 kB of English


def test_changed_eval_text_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "EVAL_TEXT_SHA256", "0" * 64)
    with pytest.raises(quality.QualityError, match="reinstall orchestrator"):
        quality.eval_text()


def test_parses_llama_cpp_base_run() -> None:
    got = quality.parse_ppl_output((FIXTURES / "llama.cpp-b11434-m-base.txt").read_text())
    assert got["perplexity"] == 39.1746 and got["perplexity_error"] == 7.9417
    assert got["chunks"] == 1 and got["context"] == 512
    assert got["kld_mean"] is None and got["top1_agreement"] is None


def test_parses_llama_cpp_kld_run() -> None:
    got = quality.parse_ppl_output((FIXTURES / "llama.cpp-b11434-m-kld.txt").read_text())
    assert got["perplexity"] == 43.005391 and got["perplexity_base"] == 38.89699
    assert got["kld_mean"] == 0.142259 and got["kld_p99"] == 0.974716 and got["kld_max"] == 2.083499
    assert got["top1_agreement"] == pytest.approx(0.70196)
    assert got["chunks"] == 1 and got["context"] == 512


def test_parses_ik_llama_formats() -> None:
    """ik prints `Final estimate: PPL over N chunks for n_ctx=C = …` and no chunk line in KLD mode.
    Real output of ik_llama.cpp 55d3c05bf (CPU build, 2 threads) on the Gemma 3 270M GGUF: one 512-token
    chunk of the evaluation text, f16 KV writing the KLD base, then q4_0 K/V (-fa on) against it."""
    base = quality.parse_ppl_output((FIXTURES / "ik_llama-55d3c05bf-base.txt").read_text())
    assert base["perplexity"] == 38.4736 and base["perplexity_error"] == 7.75226
    assert base["chunks"] == 1 and base["context"] == 512
    assert base["kld_mean"] is None and base["top1_agreement"] is None
    kld = quality.parse_ppl_output((FIXTURES / "ik_llama-55d3c05bf-kld.txt").read_text())
    assert kld["perplexity"] == 43.916947 and kld["perplexity_error"] == 8.738656
    assert kld["perplexity_base"] == 38.473534
    assert kld["kld_mean"] == 0.162077 and kld["kld_p99"] == 0.9284 and kld["kld_max"] == 1.199597
    assert kld["top1_agreement"] == pytest.approx(0.80392)
    assert "chunks" not in kld, "taken from the argv instead"


def test_scored_tokens_and_chunks() -> None:
    assert quality.scored_per_chunk(2048) == 1023
    assert quality.chunks_for(2048, 2048) == 3 and quality.chunks_for(2048, 1023) == 1
    assert quality.chunks_for(32768, 256) == 1


def test_ppl_argv_takes_the_plans_compute_flags_only() -> None:
    flags = [("-m", "/m.gguf"), ("-a", "gemma"), ("--port", "8080"), ("-c", "8192"), ("-np", "4"),
             ("-fa", "on"), ("-ctk", "q8_0"), ("-ctv", "q8_0"), ("--metrics", None), ("-t", "2")]
    argv = quality.ppl_argv("/bin/llama-perplexity", flags, 4096, 2, "/t/eval.txt")
    assert argv == ["/bin/llama-perplexity", "-m", "/m.gguf", "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", "-t", "2",
                    "-c", "4096", "-b", "2048", "--chunks", "2", "-f", "/t/eval.txt"]
    kld = quality.ppl_argv("/bin/llama-perplexity", flags, 1024, 1, None, "/t/base.kld", kld=True)
    assert kld[-5:] == ["--chunks", "1", "--kl-divergence-base", "/t/base.kld", "--kl-divergence"]
    assert "-f" not in kld and kld[kld.index("-b") + 1] == "1024"


# ------------------------------------------------------------------ retrieval harness, known answers

@pytest.mark.parametrize(("text", "key", "right"), [
    (" 48213. Remember it.", "48213", True),
    ("48213", "48213", True),
    (" is 48213 and", "48213", True),
    (" 48231.", "48213", False),              # digits swapped
    (" 482130", "48213", False),              # a longer number is not the key
    (" 12345, no wait, 48213", "48213", False),  # the first number counts
    (" the pass key.", "48213", False),       # no number at all
    ("", "48213", False),
])
def test_answer_scoring(text: str, key: str, right: bool) -> None:
    assert quality.answer_is(text, key) is right


def test_prompt_is_exact_length_with_the_needle_at_depth() -> None:
    intro, needle, question = [1, 2, 3], [900, 901, 902, 903], [7, 8]
    hay = list(range(1000, 2000))
    for length in (256, 512, 1000):
        for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
            prompt, at = quality.build_prompt(intro, hay, needle, question, length, depth)
            assert len(prompt) == length
            assert prompt[:3] == intro and prompt[-2:] == question
            assert prompt[at:at + 4] == needle
            filler = length - 3 - 4 - 2
            assert abs((at - 3) - depth * filler) <= 1
            rest = [t for t in prompt[3:-2] if t >= 1000]
            assert rest == hay[:filler], "the haystack is the text in order, the needle only inserted"


def test_prompt_bad_lengths() -> None:
    with pytest.raises(quality.QualityError, match="too short"):
        quality.build_prompt([1] * 10, list(range(100)), [2] * 10, [3] * 10, 25, 0.5)
    with pytest.raises(quality.QualityError, match="use shorter --lengths"):
        quality.build_prompt([1], list(range(100)), [2], [3], 500, 0.5)


def test_pass_keys_are_reproducible_and_distinct() -> None:
    keys = {quality.pass_key(n, d, t) for n in (2048, 8192) for d in quality.DEPTHS for t in range(3)}
    assert len(keys) == 18 and all(len(k) == 5 and k.isdigit() for k in keys)
    assert quality.pass_key(2048, 0.5, 1) == quality.pass_key(2048, 0.5, 1)


def test_retrieval_lengths_stay_inside_the_context() -> None:
    assert quality.retrieval_lengths(2048) == [2048 - quality.ANSWER_TOKENS - 4]
    assert quality.retrieval_lengths(32768) == [2048, 8192, 32768 - quality.ANSWER_TOKENS - 4]
    assert evalrun.matrix_contexts(32768) == [2048, 8192, 32768]
    assert evalrun.matrix_contexts(1024) == [1024]


# ------------------------------------------------------------------ memory

def test_perplexity_memory_counts_the_vocabulary_logits() -> None:
    meta = {"tokenizer.tokens_count": 262144}
    small = quality.ppl_memory_bytes(meta, 250 * 2**20, 0, 2048, with_base=False)
    big = quality.ppl_memory_bytes(meta, 250 * 2**20, 0, 32768, with_base=True)
    # 32k: the scored half's logits alone are 16384 × 262144 × 4 B = 16 GiB, plus one chunk of base log-probs.
    assert big - small > 16 * 2**30 + 7 * 2**30
    assert quality.base_file_bytes(meta, 2048, 1) == pytest.approx(1023 * 262148 * 2 + 2048 * 4)


def test_ik_kld_context_limit_matches_its_32_bit_buffers() -> None:
    meta = {"tokenizer.tokens_count": 262144}
    limit = quality.kld_context_limit("ik_llama", meta)
    assert limit == 8191, "8192 x 262148 = 2^31 + 32768 overflows ik's int n_ctx * nv"
    assert limit * (262144 + 4) < 2**31 <= (limit + 1) * (262144 + 4)
    assert quality.kld_context_limit("ik_llama", {"tokenizer.tokens_count": 32000}) == 67100
    assert quality.kld_context_limit("llama.cpp", meta) is None, "llama.cpp sizes these in size_t"


# ------------------------------------------------------------------ saved results and plan

def test_saved_eval_results_are_kept_apart_from_bench(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    r = evalrun.EvalResult("s", "llama.cpp", "b11434", "gemma", "/m.gguf", "q8_0", 2048, quality.EVAL_TEXT_NAME,
                           perplexity=21.5, ppl_context=2048, tokens=1023, baseline="same server with f16 KV cache",
                           kld_mean=0.008, kld_p99=0.04, top1_agreement=0.94,
                           retrieval=[{"context_tokens": 2032, "depth": 0.5, "accuracy": 1.0, "trials": 2}])
    assert bench.save(path, "p", [r], kind="eval") == {}
    assert bench.last_saved(path, "p") == {}, "bench's 'last saved run' never picks an eval"
    assert bench.last_saved(path, "p", "eval")["servers"][0]["kld_mean"] == 0.008
    assert [e["kind"] for e in bench.saved(path, "eval")] == ["eval"]
    note = evalrun.describe(bench.saved(path, "eval")[0]["servers"][0], "T")
    assert "perplexity 21.500 (1023 tokens at context 2048)" in note
    assert "top-1 agreement 94.0%" in note and "retrieval 2/2 up to 2032 tokens" in note


# ------------------------------------------------------------------ CLI bad input

def _cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          env={**os.environ, "ORCHESTRATOR_STATE_DIR": str(state)}, cwd=ROOT, timeout=120)


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 16)  # a GGUF v3 header, no tensors
    doc = {"name": "q", "hardware": {"gpu": "cpu"},
           "servers": [{"name": "s", "engine": "llama.cpp", "context": 2048, "port": 18999,
                        "model": {"path": str(model)}}]}
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--baseline", "x.yaml", "--baseline-kv", "f16"], "not both"),
    (["--matrix", "--baseline-kv", "f16"], "leave out --baseline"),
    (["--plot", "x.png"], "add --matrix"),
    (["--no-retrieval", "--no-perplexity"], "nothing to measure"),
    (["--kv", "q6_0"], "add --matrix"),
    (["--lengths", "100"], "256 tokens or more"),
    (["--lengths", "2k"], "comma-separated token counts"),
    (["--depths", "150"], "from 0 to 100"),
    (["--trials", "0"], "--trials"),
])
def test_eval_usage_errors(profile: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = _cli("eval", str(profile), *args, state=tmp_path / "state")
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_eval_needs_a_running_server_for_retrieval(profile: Path, tmp_path: Path) -> None:
    r = _cli("eval", str(profile), "--no-perplexity", state=tmp_path / "state")
    assert r.returncode == 1
    assert "server s of q is not running" in r.stderr and "--up" in r.stderr


@pytest.mark.parametrize("engine,extra,message", [
    # vLLM: perplexity through the running server's prompt_logprobs, so the server must be up
    ("vllm", [], "server s of v is not running"),
    ("vllm", ["--baseline-kv", "fp8"], "KL divergence needs each token's whole distribution"),
    ("sglang", [], "SGLang has no llama-perplexity, and its server returns no prompt log-probabilities"),
])
def test_eval_perplexity_on_engines_without_llama_perplexity(engine: str, extra: list[str], message: str,
                                                            tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
                                                   "num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "vocab_size": 512, "max_position_embeddings": 2048}))
    doc = {"name": "v", "hardware": {"gpu": "cpu" if engine == "vllm" else "h100-sxm"},
           "servers": [{"name": "s", "engine": engine, "context": 1024, "port": 18998,
                        "model": {"path": str(model)}}]}
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = _cli("eval", str(path), "--no-retrieval", "--ignore-fit", *extra, state=tmp_path / "state")
    assert r.returncode == 1
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_prompt_logprobs_are_scored_like_llama_perplexity() -> None:
    """Chunks start with BOS, positions context/2+1 .. context-1 are scored (as llama-perplexity does),
    each read from the entry of the token actually at that position."""
    text_ids = list(range(100, 140))
    calls: list[tuple[str, bool]] = []

    def tokenize(text: str, special: bool) -> list[int]:
        calls.append((text[:10], special))
        ids = [5] if text == "The" else text_ids
        return [1, *ids] if special else ids

    chunks = quality.server_chunks(tokenize, 8, 3)
    assert chunks == [[1, *range(101, 108)], [1, *range(109, 116)], [1, *range(117, 124)]]
    chunk = chunks[0]
    entries = [None] + [{str(t): {"logprob": -float(i), "rank": 1}, "999": {"logprob": -0.1}}
                        for i, t in enumerate(chunk[1:], start=1)]
    assert quality.score_prompt_logprobs(chunk, entries) == [-5.0, -6.0, -7.0]
    assert len(quality.score_prompt_logprobs(chunk, entries)) == quality.scored_per_chunk(8)
    with pytest.raises(quality.QualityError, match="no log-probability for prompt token 6"):
        quality.score_prompt_logprobs(chunk, entries[:6] + [{"5": {"logprob": -1.0}}] + entries[7:])
    with pytest.raises(quality.QualityError, match="fewer than 3 chunk"):
        quality.server_chunks(lambda t, s: [1, 2, 3], 8, 3)
    # a tokenizer that adds no BOS: chunks are the text's own tokens
    assert quality.server_chunks(lambda t, s: [5] if t == "The" else text_ids, 8, 1) == [text_ids[:8]]


def test_shipped_text_decompresses_from_the_package() -> None:
    raw = resources.files("orchestrator.data").joinpath(quality.EVAL_TEXT_FILE).read_bytes()
    assert hashlib.sha256(lzma.decompress(raw)).hexdigest() == quality.EVAL_TEXT_SHA256


@pytest.mark.parametrize("engine,kv,context,noted", [
    ("llama.cpp", "q4_0", 32768, True), ("llama.cpp", "q8_0", 16384, True),
    ("llama.cpp", "q8_0", 4096, False),      # short prompts: the cost is small
    ("llama.cpp", "f16", 32768, False), ("ik_llama", "q4_0", 32768, False),
])
def test_plan_notes_the_measured_prefill_cost_of_quantized_kv_on_cpu(engine: str, kv: str, context: int,
                                                                      noted: bool) -> None:
    from orchestrator.pipeline import build_plan
    from orchestrator.profile import load_text

    doc = {"name": "q", "hardware": {"gpu": "cpu"},
           "servers": [{"name": "s", "engine": engine, "kv_cache": kv, "context": context,
                        "model": {"path": "/models/Qwen3-8B-Q4_K_M.gguf"}}]}
    plan = build_plan(load_text(yaml.safe_dump(doc), "q.yaml"), environ={"HOME": "/h"}, detect=False,
                      enforce_fit=False)
    notes = " ".join(plan.servers[0].notes)
    assert ("took" in notes and "as long as with f16" in notes) is noted, notes


def test_eval_kv_memory_is_what_the_planned_server_allocates() -> None:
    """With --swa-full in the plan (llama.cpp, prefix cache on a sliding-window model) the server keeps
    every layer's KV; the eval's KV column must count that, not the window."""
    from orchestrator.facts.model import gather
    from orchestrator.pipeline import build_plan
    from orchestrator.plan import fit
    from orchestrator.profile import load_text

    doc = {"name": "g", "hardware": {"gpu": "cpu"},
           "servers": [{"name": "s", "engine": "llama.cpp", "context": 32768,
                        "model": {"path": "/models/gemma-3-4b-it-Q4_K_M.gguf"}}]}
    sp = build_plan(load_text(yaml.safe_dump(doc), "g.yaml"), environ={"HOME": "/h"}, detect=False,
                    enforce_fit=False).servers[0]
    assert "--swa-full" in [f.name for f in sp.flags]
    facts = gather(sp.model_location)
    full = fit.kv_cache_bytes(facts, "llama.cpp", 32768, 1, "f16", swa_full=True)
    assert evalrun._result(sp).kv_cache_bytes == full > fit.kv_cache_bytes(facts, "llama.cpp", 32768, 1, "f16")
