"""What a quant, a KV-cache precision and a context length cost: measured.

Perplexity and KL divergence come from the engine's own `llama-perplexity` (built from the same
source as its `llama-server`), run with the plan's model, KV-cache and attention flags on a fixed,
checksummed public-domain text. `llama-perplexity` scores the second half of every chunk of
n_ctx tokens (each scored token sees at least n_ctx/2 tokens of context), so a chunk scores
n_ctx - 1 - n_ctx/2 tokens. Its KL-divergence base file holds those tokens' log-probabilities over
the whole vocabulary (2 bytes each: 0.5 MiB per token for a 262k vocabulary); it lives in a temporary
directory and is deleted after use.

Long-context retrieval runs through the running server: a pass key hidden at a given depth of a
haystack of real text, exact token lengths (the server's own tokenizer), greedy decoding.

No printing here: callers get results and a progress callback.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError

Progress = Callable[[str], None]
GIB = 2**30

EVAL_TEXT_FILE = "adventures-of-sherlock-holmes.txt.xz"
EVAL_TEXT_SHA256 = "d6e5e50e8358ac384f8f4b5b739e2f551b4fbae0f8e5669033f8111514cc803f"
EVAL_TEXT_NAME = "The Adventures of Sherlock Holmes (A. C. Doyle, 1892; public domain)"
PPL_TOOL = "llama-perplexity"
# Flags of a llama-server plan that change what the model computes; llama-perplexity takes the same syntax.
COMPUTE_FLAGS = ("-m", "-t", "-ngl", "-cmoe", "-ncmoe", "--fit", "-fa", "-ctk", "-ctv", "-mla", "-amb")
MAX_BATCH = 2048


class QualityError(OrchestratorError):
    pass


# --------------------------------------------------------------------------- evaluation text

def eval_text() -> str:
    """The evaluation text, checked against its pinned SHA-256."""
    data = lzma.decompress(resources.files("orchestrator.data").joinpath(EVAL_TEXT_FILE).read_bytes())
    got = hashlib.sha256(data).hexdigest()
    if got != EVAL_TEXT_SHA256:
        raise QualityError(f"the evaluation text {EVAL_TEXT_FILE} has SHA-256 {got[:16]}…, expected "
                           f"{EVAL_TEXT_SHA256[:16]}…", "reinstall orchestrator: the shipped file was changed")
    return data.decode("utf-8")


# --------------------------------------------------------------------------- perplexity / KLD

@dataclass
class PplRun:
    """One llama-perplexity measurement."""

    context: int
    chunks: int
    tokens: int                         # tokens scored: chunks × (context - 1 - context/2)
    perplexity: float
    perplexity_error: float | None = None
    perplexity_base: float | None = None    # KLD runs: the baseline's perplexity on the same tokens
    kld_mean: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None     # share of tokens whose most likely token matches the baseline's
    seconds: float = 0.0
    argv: list[str] = field(default_factory=list)


def scored_per_chunk(context: int) -> int:
    return context - 1 - context // 2


def chunks_for(context: int, tokens: int) -> int:
    """Chunks needed to score at least `tokens` tokens at this context (at least one)."""
    return max(1, math.ceil(tokens / scored_per_chunk(context)))


def ppl_argv(tool: str, flags: list[tuple[str, str | None]], context: int, chunks: int, text_file: str | None,
             base_file: str | None = None, kld: bool = False) -> list[str]:
    """llama-perplexity with the plan's compute flags (model, threads, offload, attention, KV types).
    One sequence per pass (-b ≤ n_ctx), as the server's slots run."""
    argv = [tool]
    for name, value in flags:
        if name in COMPUTE_FLAGS:
            argv += [name] if value is None else [name, value]
    argv += ["-c", str(context), "-b", str(min(context, MAX_BATCH)), "--chunks", str(chunks)]
    if kld:
        assert base_file is not None
        argv += ["--kl-divergence-base", base_file, "--kl-divergence"]
    else:
        assert text_file is not None
        argv += ["-f", text_file]
        if base_file:
            argv += ["--kl-divergence-base", base_file]
    return argv


_NUM = r"(-?(?:\d+(?:\.\d*)?|nan|inf))"


def _float(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def parse_ppl_output(text: str) -> dict[str, float | int | None]:
    """The figures of a llama-perplexity run. Both builds' formats:
    llama.cpp b11434  `Final estimate: PPL = 21.6832 +/- 1.86111`
    ik 55d3c05bf      `Final estimate: PPL over 1 chunks for n_ctx=2048 = 21.6832 +/- 1.86111`
    and, with --kl-divergence, the statistics block both print the same way."""
    out: dict[str, float | int | None] = {}
    m = re.search(r"Final estimate: PPL(?: over \d+ chunks for n_ctx=\d+)? = " + _NUM + r" \+/- " + _NUM, text)
    if m:
        out["perplexity"], out["perplexity_error"] = float(m.group(1)), float(m.group(2))
    m = re.search(r"(?:computing|calculating perplexity) over (\d+) chunks, n_ctx=(\d+)", text)
    if m:
        out["chunks"], out["context"] = int(m.group(1)), int(m.group(2))
    q = _float(r"Mean PPL\(Q\)\s*:\s*" + _NUM, text)
    if q is not None:
        out["perplexity"] = q
        out["perplexity_error"] = _float(r"Mean PPL\(Q\)\s*:\s*\S+\s*±\s*" + _NUM, text)
    out["perplexity_base"] = _float(r"Mean PPL\(base\)\s*:\s*" + _NUM, text)
    out["kld_mean"] = _float(r"Mean\s+KLD:\s*" + _NUM, text)
    out["kld_p99"] = _float(r"99\.0%\s+KLD:\s*" + _NUM, text)
    out["kld_max"] = _float(r"Maximum KLD:\s*" + _NUM, text)
    top = _float(r"Same top p:\s*" + _NUM, text)
    out["top1_agreement"] = None if top is None else top / 100.0
    return out


def _failure_reason(text: str) -> str:
    for pattern in (r"you need at least \d+ tokens[^\n]*", r"failed to load model[^\n]*", r"error:[^\n]*",
                    r"GGML_ASSERT[^\n]*", r"inconsistent vocabulary[^\n]*", r"has been computed with[^\n]*"):
        m = re.search(pattern, text)
        if m:
            return m.group(0).strip()
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "no output"


def run_ppl(argv: list[str], cwd: str, timeout: float = 3600.0) -> PplRun:
    """Run llama-perplexity (in `cwd`: ik writes llama.log into its working directory)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, errors="replace", cwd=cwd, timeout=timeout,
                           stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise QualityError(f"{Path(argv[0]).name} did not finish within {timeout:.0f} s",
                           "lower --tokens or the context") from None
    text = p.stdout + "\n" + p.stderr
    got = parse_ppl_output(text)
    if p.returncode != 0 or got.get("perplexity") is None:
        raise QualityError(f"{Path(argv[0]).name} failed (exit {p.returncode}): {_failure_reason(text)}",
                           f"run it by hand to see the whole log: {' '.join(argv)}")
    if "--kl-divergence" in argv and got.get("kld_mean") is None:
        raise QualityError(f"{Path(argv[0]).name} printed no KL-divergence statistics (fewer than 100 tokens "
                           "scored?)", "raise --tokens")
    context = int(argv[argv.index("-c") + 1])
    chunks = int(got.get("chunks") or int(argv[argv.index("--chunks") + 1]))
    return PplRun(context=context, chunks=chunks, tokens=chunks * scored_per_chunk(context),
                  perplexity=float(got["perplexity"] or 0.0), perplexity_error=_opt(got.get("perplexity_error")),
                  perplexity_base=_opt(got.get("perplexity_base")), kld_mean=_opt(got.get("kld_mean")),
                  kld_p99=_opt(got.get("kld_p99")), kld_max=_opt(got.get("kld_max")),
                  top1_agreement=_round(got.get("top1_agreement")), seconds=round(time.monotonic() - t0, 1),
                  argv=argv)


def _opt(x: float | int | None) -> float | None:
    return None if x is None else float(x)


def ppl_memory_bytes(meta: dict[str, Any], weights_bytes: int, kv_bytes: int, context: int,
                     with_base: bool) -> int:
    """Host memory a llama-perplexity pass holds: weights, KV cache, the context's output buffer
    (n_batch × n_vocab floats), the logits of the scored half of a chunk (n_ctx/2 × n_vocab floats)
    and, for KL divergence, one chunk of base log-probabilities (2 B per vocabulary entry)."""
    n_vocab = int(meta.get("tokenizer.tokens_count") or 32000)
    batch = min(context, MAX_BATCH)
    out_buf = batch * n_vocab * 4
    logits = (context // 2) * n_vocab * 4 if context > batch else 0
    base = scored_per_chunk(context) * (n_vocab + 4) * 2 if with_base else 0
    return weights_bytes + kv_bytes + out_buf + logits + base + 256 * 2**20


def kld_context_limit(engine: str, meta: dict[str, Any]) -> int | None:
    """Largest context ik_llama's llama-perplexity can write or read a KL-divergence base at.

    Its KLD paths size buffers as `n_ctx * nv` and `n_ctx * n_vocab` in 32-bit int, which overflow
    at 2^31 (a 262,144-token vocabulary at 8192 context). llama.cpp computes these in size_t."""
    if engine != "ik_llama":
        return None
    n_vocab = int(meta.get("tokenizer.tokens_count") or 32000)
    return (2**31 - 1) // (2 * ((n_vocab + 1) // 2) + 4)


def kld_chunk(limit: int) -> int:
    """The chunk size used under a KL-divergence context limit: a whole multiple of 256 tokens."""
    return limit // 256 * 256


def base_file_bytes(meta: dict[str, Any], context: int, chunks: int) -> int:
    n_vocab = int(meta.get("tokenizer.tokens_count") or 32000)
    return chunks * (context * 4 + scored_per_chunk(context) * (2 * ((n_vocab + 1) // 2) + 4) * 2)


def scratch_dir(prefix: str = "orchestrate-eval-") -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)


# --------------------------------------------------------------------------- perplexity through the server

# Engines whose OpenAI completions endpoint returns the log-probability of every prompt token
# (vLLM: `prompt_logprobs`, vllm/entrypoints/openai/completion/protocol.py).
PROMPT_LOGPROB_ENGINES = ("vllm",)


def server_chunks(tokenize: Callable[[str, bool], list[int]], context: int, chunks: int) -> list[list[int]]:
    """The evaluation text as `chunks` consecutive chunks of `context` tokens in the server's own
    tokenizer, each starting with its BOS token where the model has one, as llama-perplexity builds them."""
    text = eval_text()
    need = context * chunks
    size = min(len(text), need * 6)
    while True:
        ids = tokenize(text[:size], False)
        if len(ids) > need or size >= len(text):
            break
        size = min(len(text), size * 2)
    if len(ids) < need:
        raise QualityError(f"the evaluation text has {len(ids)} tokens in this tokenizer, fewer than {chunks} "
                           f"chunk(s) of {context}", "score fewer tokens (--tokens) or a shorter --ppl-context")
    # The model's BOS: what the tokenizer puts before a text when asked for its special tokens.
    plain, special = tokenize("The", False), tokenize("The", True)
    bos = special[:1] if len(special) == len(plain) + 1 and special[1:] == plain else []
    out = []
    for i in range(chunks):
        chunk = ids[i * context:(i + 1) * context]
        out.append(bos + chunk[1:] if bos else chunk)
    return out


def score_prompt_logprobs(chunk: list[int], entries: list[Any]) -> list[float]:
    """Log-probabilities of the scored half of one chunk (positions context/2+1 .. context-1, as
    llama-perplexity scores), read from vLLM's per-prompt-token dicts {token_id: {logprob, ...}}."""
    if len(entries) != len(chunk):
        raise QualityError(f"the server returned {len(entries)} prompt log-probabilities for {len(chunk)} tokens",
                           "report this with the engine's version")
    out = []
    for pos in range(len(chunk) // 2 + 1, len(chunk)):
        entry = entries[pos] or {}
        got = entry.get(str(chunk[pos]))
        if not isinstance(got, dict) or not isinstance(got.get("logprob"), int | float):
            raise QualityError(f"no log-probability for prompt token {pos} ({chunk[pos]}) in the server's answer",
                               "report this with the engine's version")
        out.append(float(got["logprob"]))
    return out


def server_ppl(target: Any, context: int, chunks: int, say: Callable[[str], None]) -> PplRun:
    """Perplexity through the running server: each chunk sent as token ids to /v1/completions with
    prompt_logprobs, one token generated. Same chunks, same scored positions as llama-perplexity."""
    from orchestrator.measure import bench
    from orchestrator.runtime.health import HttpError

    t0 = time.monotonic()
    prompts = bench.Prompts(target)
    data = server_chunks(prompts.tokenize, context, chunks)
    logprobs: list[float] = []
    for i, chunk in enumerate(data):
        say(f"{target.name}: perplexity chunk {i + 1}/{chunks} ({context} tokens, prompt log-probabilities)")
        body = {"model": target.served_name, "prompt": chunk, "max_tokens": 1, "temperature": 0,
                "prompt_logprobs": 0}
        try:
            answer = target.post("/v1/completions", body, timeout=3600)
        except HttpError as exc:
            raise QualityError(f"server {target.name}: a {context}-token prompt_logprobs request failed: {exc}",
                               "the chunk must fit the server's context (--ppl-context), see orchestrate logs") \
                from None
        entries = ((answer.get("choices") or [{}])[0] or {}).get("prompt_logprobs")
        if not isinstance(entries, list):
            raise QualityError(f"server {target.name}: /v1/completions returned no prompt_logprobs",
                               "this needs an engine that returns prompt log-probabilities (vLLM)")
        logprobs += score_prompt_logprobs(chunk, entries)
    nll = -sum(logprobs) / len(logprobs)
    # llama-perplexity's error estimate: the standard error of the mean NLL, carried through exp().
    sd = statistics.pstdev(logprobs) if len(logprobs) > 1 else 0.0
    err = math.exp(nll) * sd / math.sqrt(max(len(logprobs) - 1, 1))
    return PplRun(context, chunks, len(logprobs), math.exp(nll), err, seconds=time.monotonic() - t0,
                  argv=[f"POST {target.url}/completions prompt_logprobs=0 ({chunks} chunk(s) of {context} tokens)"])


# --------------------------------------------------------------------------- retrieval

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 12
DEPTHS = (0.1, 0.5, 0.9)


def pass_key(length: int, depth: float, trial: int) -> str:
    """The same key for the same (length, depth, trial) on every run: results are reproducible."""
    return str(random.Random(f"{length}/{depth:.3f}/{trial}").randint(10000, 99999))  # noqa: S311 - not secret


def answer_is(text: str, key: str) -> bool:
    """Correct when the first number the model writes is the key."""
    m = re.search(r"\d+", text)
    return bool(m) and m is not None and m.group(0) == key


def build_prompt(intro: list[int], haystack: list[int], needle: list[int], question: list[int], length: int,
                 depth: float) -> tuple[list[int], int]:
    """Exactly `length` tokens: intro, haystack with the needle at `depth` of it, question.
    Returns the prompt and the needle's token offset."""
    filler = length - len(intro) - len(needle) - len(question)
    if filler < 1:
        raise QualityError(f"a retrieval prompt of {length} tokens is too short for the pass-key frame "
                           f"({length - filler} tokens)", "use lengths of 256 tokens or more")
    if filler > len(haystack):
        raise QualityError(f"the evaluation text has {len(haystack)} tokens, fewer than the {filler} a "
                           f"{length}-token retrieval prompt needs", "use shorter --lengths")
    at = round(filler * depth)
    body = haystack[:filler]
    return intro + body[:at] + needle + body[at:] + question, len(intro) + at


@dataclass
class RetrievalCell:
    context_tokens: int
    depth: float
    trials: int
    correct: int
    accuracy: float
    answers: list[str] = field(default_factory=list)
    decode_tps: float | None = None        # median per-request decode rate at this depth of context


@dataclass
class Retrieval:
    cells: list[RetrievalCell]
    decode_tps_by_length: dict[int, float | None]
    method: str


def run_retrieval(target: Any, lengths: list[int], depths: tuple[float, ...] | list[float], trials: int,
                  progress: Progress | None = None) -> Retrieval:
    """Pass-key retrieval through the server's text-completion endpoint, as token ids."""
    from orchestrator.measure import bench

    say = progress or (lambda msg: None)
    bench.check_target(target)
    prompts = bench.Prompts(target)
    text = eval_text()
    need = max(lengths)
    # ~4 characters per token for English; tokenize generously once, then cut.
    hay = prompts.tokenize(text[: min(len(text), need * 6 + 4096)])
    intro = prompts.tokenize(INTRO, add_special=True)   # with the model's BOS token, as a text prompt gets
    question = prompts.tokenize(QUESTION)
    cells: list[RetrievalCell] = []
    decode: dict[int, list[float]] = {}
    for length in lengths:
        for depth in depths:
            answers: list[str] = []
            rates: list[float] = []
            correct = 0
            for trial in range(trials):
                key = pass_key(length, depth, trial)
                needle = prompts.tokenize(NEEDLE.format(key=key))
                prompt, _ = build_prompt(intro, hay, needle, question, length, depth)
                say(f"{target.name}: retrieval {length} tokens, depth {depth:.0%}, trial {trial + 1}/{trials}")
                s = bench.stream_completion(target, prompt, ANSWER_TOKENS, timeout=3600)
                if not s.ok:
                    raise QualityError(f"server {target.name}: a {length}-token retrieval request failed: {s.error}",
                                       "check the server's context (the prompt must fit one slot) and "
                                       "orchestrate logs")
                answers.append(s.text.strip()[:40])
                correct += answer_is(s.text, key)
                if s.decode_tps:
                    rates.append(s.decode_tps)
            decode.setdefault(length, []).extend(rates)
            cells.append(RetrievalCell(length, depth, trials, correct, round(correct / trials, 3), answers,
                                       round(statistics.median(rates), 2) if rates else None))
    return Retrieval(cells, {k: (round(statistics.median(v), 2) if v else None) for k, v in decode.items()},
                     "pass key in a haystack of the evaluation text, greedy text completion as token ids "
                     f"(/v1/completions), {ANSWER_TOKENS} tokens generated")


def retrieval_lengths(context: int) -> list[int]:
    """Prompt lengths up to the server's context: 2k, 8k, 32k, 128k below it, and the context itself
    (less room for the answer)."""
    top = context - ANSWER_TOKENS - 4
    ladder = [n for n in (2048, 8192, 32768, 131072) if n < top]
    return [*ladder, top]


def as_dicts(cells: list[RetrievalCell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]


def _round(x: float | int | None) -> float | None:
    return None if x is None else round(float(x), 7)
