"""Benchmark running servers through their OpenAI-compatible API.

One streaming request gives: time to first token (TTFT), prefill rate (prompt tokens / TTFT),
per-stream decode rate ((completion tokens - 1) / time from first to last token) and the
inter-token latencies. Prompts are exact token counts: the text is tokenized by the server's own
tokenizer (/tokenize) and sent as token ids, so "512 prompt tokens" is what the engine processes;
the usage fields of each response confirm it. Every prompt is a disjoint slice of real English text
(the Python reference manual that ships with the interpreter), so no request hits another's
prefix cache, not even through llama.cpp's chunk reuse. Generation runs with ignore_eos so every
request produces exactly the tokens asked for.

No printing here: callers get results and a progress callback.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.errors import OrchestratorError
from orchestrator.plan.model import client_host
from orchestrator.runtime.health import HttpError, http

Progress = Callable[[str], None]


class BenchError(OrchestratorError):
    pass


# --------------------------------------------------------------------------- targets

@dataclass
class Target:
    """One server to benchmark."""

    name: str
    host: str
    port: int
    served_name: str
    engine: str
    api_key: str | None = None
    pid: int | None = None                 # process runtime: the server's pid (RSS sampling)
    model_location: str = ""
    kv_cache: str = "f16"
    bandwidth_gbs: float | None = None     # GPU catalog bandwidth; None on CPU (measured instead)
    gpu_ids: list[int] | None = None
    gpu: str = "cpu"                       # GPU catalog id of what runs the model ("cpu": the host)
    tflops: float | None = None            # GPU catalog FP16 TFLOPS; None on CPU (measured instead)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        r = http("POST", client_host(self.host), self.port, path, body, self.headers, timeout)
        if r.status_code != 200:
            raise HttpError("error", f"{path} {r.status_code}: {r.text[:200].strip()}")
        return r.json()

    def get(self, path: str, timeout: float = 5.0) -> Any:
        r = http("GET", client_host(self.host), self.port, path, headers=self.headers, timeout=timeout)
        if r.status_code != 200:
            raise HttpError("error", f"{path} {r.status_code}: {r.text[:200].strip()}")
        return r.json()


def check_target(t: Target) -> None:
    """The server answers and serves the model the profile names; a clear error otherwise."""
    try:
        models = t.get("/v1/models")
    except HttpError as exc:
        raise BenchError(f"server {t.name}: nothing answers on {t.host}:{t.port} ({exc})",
                         "start it with orchestrate up PROFILE, or pass --up") from None
    ids = [str(m.get("id")) for m in models.get("data", []) if isinstance(m, dict)]
    aliases = [str(a) for m in models.get("data", []) if isinstance(m, dict) for a in m.get("aliases", []) or []]
    if t.served_name not in ids + aliases:
        raise BenchError(f"server {t.name}: {t.host}:{t.port} serves {', '.join(ids) or 'no model'}, "
                         f"not {t.served_name!r} as the profile says",
                         "if the profile changed since up, run orchestrate up again to apply it; otherwise another "
                         "server holds that port")


# --------------------------------------------------------------------------- prompts

def _corpus_text() -> str:
    """Real English prose that ships with every Python: the language reference topics."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # stripped Python builds: the standard library's own docstrings
        import argparse
        import collections
        import email
        import json as json_mod
        import subprocess
        import threading as th

        docs = [obj.__doc__ for mod in (argparse, collections, email, json_mod, subprocess, th)
                for obj in (mod, *vars(mod).values()) if isinstance(getattr(obj, "__doc__", None), str)]
        return "\n\n".join(d for d in docs if d and len(d) > 200)
    return "\n\n".join(topics[k] for k in sorted(topics))


def _variant(text: str, n: int) -> str:
    """The n-th rewording of the corpus: every (n+1)-th word upper-cased. Different token sequences,
    still natural text, for runs that need more tokens than the corpus has."""
    if n == 0:
        return text
    words = text.split(" ")
    return " ".join(w.upper() if i % (n + 1) == 0 else w for i, w in enumerate(words))


class Prompts:
    """Hands out disjoint token slices of the corpus, tokenized by the server itself."""

    CHARS_PER_CALL = 60_000

    def __init__(self, target: Target) -> None:
        self.target = target
        self.text = _corpus_text()
        self.pass_ = 0
        self.pos = 0
        self.current = self.text
        self.tokens: list[int] = []
        self.method = ""

    def _tokenize(self, text: str, add_special: bool = False) -> list[int] | None:
        t = self.target
        for path, body in (("/tokenize", {"content": text, "add_special": add_special}),
                           ("/tokenize", {"model": t.served_name, "prompt": text,
                                          "add_special_tokens": add_special})):
            try:
                data = t.post(path, body, timeout=60)
            except (HttpError, ValueError):
                continue
            toks = data.get("tokens") if isinstance(data, dict) else None
            if isinstance(toks, list) and toks and all(isinstance(x, int) for x in toks):
                self.method = "server tokenizer (/tokenize); prompts sent as token ids"
                return [int(x) for x in toks]
        return None

    def _refill(self, need: int) -> None:
        while len(self.tokens) < need:
            if self.pos >= len(self.current):
                self.pass_ += 1
                self.pos = 0
                self.current = _variant(self.text, self.pass_)
            text = self.current
            # cut at a paragraph boundary so every chunk starts on clean text
            end = text.find("\n\n", self.pos + self.CHARS_PER_CALL)
            end = len(text) if end < 0 else end
            chunk = text[self.pos:end]
            self.pos = end
            toks = self._tokenize(chunk)
            if toks is None:
                raise BenchError(f"server {self.target.name}: no /tokenize endpoint answered, so exact prompt "
                                 "lengths cannot be built", "bench needs llama.cpp, ik_llama.cpp or vLLM's "
                                 "tokenizer endpoint")
            self.tokens.extend(toks)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """`text` in the server's own tokens (with its BOS token when add_special)."""
        toks = self._tokenize(text, add_special)
        if toks is None:
            raise BenchError(f"server {self.target.name}: no /tokenize endpoint answered",
                             "this needs llama.cpp, ik_llama.cpp or vLLM's tokenizer endpoint")
        return toks

    def take(self, n: int) -> list[int]:
        self._refill(n)
        out, self.tokens = self.tokens[:n], self.tokens[n:]
        return out


# --------------------------------------------------------------------------- one request

@dataclass
class Sample:
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)    # engine's own timings, where it sends them
    cached_tokens: int | None = None
    text: str = ""                          # the generated text

    @property
    def decode_tps(self) -> float | None:
        gen = self.total_s - self.ttft_s
        if self.completion_tokens < 2 or gen <= 0:
            return None
        return (self.completion_tokens - 1) / gen

    @property
    def prefill_tps(self) -> float | None:
        """Prompt tokens the engine evaluated (a cached prefix is not evaluated again) per second to the
        first token."""
        evaluated = self.prompt_tokens - (self.cached_tokens or 0)
        return evaluated / self.ttft_s if self.ttft_s > 0 and evaluated > 0 else None


def stream_completion(t: Target, prompt: list[int] | str, max_tokens: int, timeout: float = 600.0,
                      cache_prompt: bool | None = None) -> Sample:
    """One streaming /v1/completions request, timed on arrival of each chunk."""
    import http.client

    body: dict[str, Any] = {"model": t.served_name, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if cache_prompt is not None:
        body["cache_prompt"] = cache_prompt
    conn = http.client.HTTPConnection(client_host(t.host), t.port, timeout=timeout)
    s = Sample(ok=False)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **t.headers})
        r = conn.getresponse()
        if r.status != 200:
            s.error = f"HTTP {r.status}: {r.read().decode('utf-8', 'replace')[:200].strip()}"
            return s
        first = last = None
        chunks = 0
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            msg = json.loads(data)
            if "error" in msg:
                s.error = str(msg["error"])[:200]
                return s
            if _read_chunk(s, msg):
                if first is None:
                    first = now
                elif last is not None:
                    s.itl_s.append(now - last)
                last = now
                chunks += 1
    except (OSError, http.client.HTTPException, ValueError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
        return s
    finally:
        conn.close()
    if first is None or last is None:
        s.error = "the stream ended without a token"
        return s
    _complete(s, prompt, chunks)
    s.ttft_s, s.total_s = first - t0, last - t0
    s.ok = True
    return s


def _read_chunk(s: Sample, msg: dict[str, Any]) -> bool:
    """Take one streamed chunk's text, usage and engine timings into the sample; True when it carries a
    token (the chunk that times the stream)."""
    choices = msg.get("choices") or []
    if choices:
        s.text += choices[0].get("text") or ""
    usage = msg.get("usage")
    if usage:
        s.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        s.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is not None:
            s.cached_tokens = int(details["cached_tokens"])
    timings = msg.get("timings")
    if isinstance(timings, dict):
        s.server = {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}
    return bool(choices and (choices[0].get("text") or choices[0].get("finish_reason") is None))


def _complete(s: Sample, prompt: list[int] | str, chunks: int) -> None:
    """Counts the response did not report, from what the stream showed."""
    if not s.completion_tokens:
        s.completion_tokens = chunks
    if not s.prompt_tokens:
        s.prompt_tokens = len(prompt) if isinstance(prompt, list) else 0
    if s.cached_tokens is None and "cache_n" in s.server:
        s.cached_tokens = int(s.server["cache_n"])
    elif s.cached_tokens is None and "prompt_n" in s.server and s.prompt_tokens:
        s.cached_tokens = max(0, s.prompt_tokens - int(s.server["prompt_n"]))   # ik_llama: no cache_n


# --------------------------------------------------------------------------- resource sampling

class Sampler:
    """Samples server RSS (process tree) and, with NVML, GPU memory and power while a run lasts."""

    def __init__(self, pid: int | None, gpu_ids: list[int] | None, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.rss_peak = 0
        self.gpu_mem_peak = 0
        self.energy_j = 0.0
        self.power_samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list[Any] = []
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            ids = gpu_ids if gpu_ids is not None else list(range(count))
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in ids if i < count]
            self._nvml = pynvml
        except Exception:  # no NVML library, no driver, no GPU: memory from RSS only
            self._handles = []

    def _rss(self) -> int:
        if self.pid is None:
            return 0
        import psutil

        try:
            p = psutil.Process(self.pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _nvml_value(fn: Callable[[Any], Any], handle: Any, attr: str | None = None) -> float:
        try:
            value = fn(handle)
        except Exception:  # not reported by this GPU (power on some boards)
            return 0.0
        return float(getattr(value, attr) if attr else value)

    def _sample(self, dt: float) -> None:
        self.rss_peak = max(self.rss_peak, self._rss())
        if not self._handles:
            return
        watts = mem = 0.0
        for h in self._handles:
            mem += self._nvml_value(self._nvml.nvmlDeviceGetMemoryInfo, h, "used")
            watts += self._nvml_value(self._nvml.nvmlDeviceGetPowerUsage, h) / 1000.0
        self.gpu_mem_peak = max(self.gpu_mem_peak, int(mem))
        if watts:
            self.power_samples.append(watts)
            self.energy_j += watts * dt

    def _loop(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            self._sample(now - last)
            last = now

    def __enter__(self) -> Sampler:
        self._sample(0.0)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


# --------------------------------------------------------------------------- results

def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class Level:
    concurrency: int
    requests: int
    errors: int
    ttft_ms: float | None
    ttft_p95_ms: float | None
    prefill_tps: float | None              # median over requests: prompt tokens / TTFT
    decode_tps: float | None               # median per-stream decode rate
    itl_ms: float | None
    itl_p95_ms: float | None
    throughput_tps: float | None           # output tokens of all streams / wall time
    prompt_tokens: int
    completion_tokens: int
    server_prefill_tps: float | None = None   # the engine's own timings (llama.cpp/ik), median
    server_decode_tps: float | None = None
    error_examples: list[str] = field(default_factory=list)


def summarize(concurrency: int, samples: list[Sample], wall_s: float) -> Level:
    good = [s for s in samples if s.ok]
    ttft = [s.ttft_s * 1000 for s in good]
    itl = [x * 1000 for s in good for x in s.itl_s]
    decode = [d for s in good if (d := s.decode_tps) is not None]
    prefill = [p for s in good if (p := s.prefill_tps) is not None]
    sp = [s.server["prompt_per_second"] for s in good if s.server.get("prompt_per_second")]
    sd = [s.server["predicted_per_second"] for s in good if s.server.get("predicted_per_second")]
    out_tokens = sum(s.completion_tokens for s in good)
    return Level(
        concurrency=concurrency, requests=len(samples), errors=len(samples) - len(good),
        ttft_ms=_r(percentile(ttft, 50)), ttft_p95_ms=_r(percentile(ttft, 95)),
        prefill_tps=_r(statistics.median(prefill) if prefill else None),
        decode_tps=_r(statistics.median(decode) if decode else None, 2),
        itl_ms=_r(percentile(itl, 50), 2), itl_p95_ms=_r(percentile(itl, 95), 2),
        throughput_tps=_r(out_tokens / wall_s if good and wall_s > 0 else None, 2),
        prompt_tokens=round(statistics.median([s.prompt_tokens for s in good])) if good else 0,
        completion_tokens=round(statistics.median([s.completion_tokens for s in good])) if good else 0,
        server_prefill_tps=_r(statistics.median(sp) if sp else None),
        server_decode_tps=_r(statistics.median(sd) if sd else None, 2),
        error_examples=sorted({s.error for s in samples if not s.ok})[:3],
    )


@dataclass
class PrefixResult:
    prefix_tokens: int
    cold_ttft_ms: float
    warm_ttft_ms: float
    ttft_speedup: float
    cached_tokens: int | None              # tokens the engine says it took from its cache
    counter: str                           # where cached_tokens came from
    cold_processed: int | None = None      # prompt tokens the engine evaluated (its timings), cold and warm
    warm_processed: int | None = None


@dataclass
class Roofline:
    bytes_per_token: int                   # weights read per decoded token (+ KV at the prompt's depth)
    bandwidth_gbs: float
    bandwidth_source: str
    roofline_tps: float
    achieved_share: float | None           # decode_tps at concurrency 1 / roofline
    detail: str
    # prefill: FLOPs per prompt token over the device's FLOPS (plan.speed.flops_per_token)
    flops_per_token: float | None = None
    compute_tflops: float | None = None
    compute_source: str = ""
    prefill_roofline_tps: float | None = None
    prefill_share: float | None = None     # prefill at concurrency 1 (engine timings where reported) / roofline


@dataclass
class ServerResult:
    server: str
    engine: str
    model: str
    url: str
    prompt_tokens: int
    gen_tokens: int
    tokenizer: str
    levels: list[Level]
    prefix: PrefixResult | None = None
    depth: int = 0                         # tokens of shared, cached context every request started after
    rss_peak_bytes: int | None = None
    gpu_memory_peak_bytes: int | None = None
    avg_power_w: float | None = None
    joules_per_token: float | None = None
    roofline: Roofline | None = None
    gpu: str | None = None                 # GPU catalog id ("cpu": the host): what calibration matches on
    notes: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # per request (with --json)

    def as_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


# --------------------------------------------------------------------------- runs

def run_round(t: Target, prompts: list[list[int]], gen_tokens: int,
              cache_prompt: bool | None = None) -> tuple[list[Sample], float]:
    """All prompts sent at the same moment; returns their samples and the round's wall time."""
    results: list[Sample | None] = [None] * len(prompts)
    gate = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        gate.wait()
        results[i] = stream_completion(t, prompts[i], gen_tokens, cache_prompt=cache_prompt)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return [s for s in results if s is not None], time.perf_counter() - t0


def run_level(t: Target, prompts: Prompts, concurrency: int, prompt_tokens: int, gen_tokens: int,
              runs: int, prefix: list[int] | None = None) -> tuple[list[Sample], float]:
    """`runs` rounds of `concurrency` simultaneous requests; returns the samples and summed wall time.
    With a prefix (see prime_prefix) every request begins with it and asks the engine to reuse its cache,
    so `prompt_tokens` fresh tokens are evaluated at that depth."""
    samples: list[Sample] = []
    wall = 0.0
    head = prefix or []
    for _ in range(runs):
        got, took = run_round(t, [head + prompts.take(prompt_tokens) for _ in range(concurrency)], gen_tokens,
                              cache_prompt=True if prefix else None)
        samples.extend(got)
        wall += took
    return samples, wall


def prime_prefix(t: Target, prompts: Prompts, depth: int, concurrency: int) -> list[int]:
    """A shared prefix of `depth` tokens, evaluated once per slot the measured requests will use (one
    request per simultaneous stream, at the same moment, so each lands in its own slot), so that the
    measured requests find it cached. Returns the prefix."""
    prefix = prompts.take(depth)
    got, _ = run_round(t, [prefix + prompts.take(4) for _ in range(concurrency)], 2, cache_prompt=True)
    bad = [s for s in got if not s.ok]
    if bad or len(got) < concurrency:
        raise BenchError(f"server {t.name}: the {depth}-token shared prefix did not run: "
                         + (bad[0].error if bad else "a request was lost"),
                         "is the depth within the server's context per slot? (orchestrate plan shows -c and -np)")
    return prefix


def run_prefix(t: Target, prompts: Prompts, prefix_tokens: int, suffix_tokens: int = 32) -> PrefixResult:
    """Two requests sharing a long prefix: the second should skip its prefill."""
    prefix = prompts.take(prefix_tokens)
    cold = stream_completion(t, prefix + prompts.take(suffix_tokens), 4, cache_prompt=True)
    warm = stream_completion(t, prefix + prompts.take(suffix_tokens), 4, cache_prompt=True)
    if not (cold.ok and warm.ok):
        raise BenchError(f"server {t.name}: prefix-cache run failed: {cold.error or warm.error}")
    counter = ("engine timings (cache_n)" if "cache_n" in warm.server else
               "engine timings (prompt tokens - evaluated prompt_n)" if "prompt_n" in warm.server else
               "usage.prompt_tokens_details.cached_tokens" if warm.cached_tokens is not None else
               "not reported by this engine")
    def evaluated(s: Sample) -> int | None:
        return int(s.server["prompt_n"]) if "prompt_n" in s.server else None

    return PrefixResult(prefix_tokens, round(cold.ttft_s * 1000, 1), round(warm.ttft_s * 1000, 1),
                        round(cold.ttft_s / warm.ttft_s, 2) if warm.ttft_s > 0 else 0.0, warm.cached_tokens, counter,
                        evaluated(cold), evaluated(warm))


def warm_up(t: Target, prompts: Prompts) -> None:
    s = stream_completion(t, prompts.take(32), 8)
    if not s.ok:
        raise BenchError(f"server {t.name}: a warm-up request failed: {s.error}",
                         "check orchestrate logs for the server's side of it")


def bench_target(t: Target, prompt_tokens: int, gen_tokens: int, concurrency: list[int], runs: int,
                 prefix: bool = True, progress: Progress | None = None, depth: int = 0) -> ServerResult:
    """With `depth`, every request starts after a shared prefix of that many tokens, evaluated once per
    slot before the levels run (prime_prefix), so prefill and decode are measured at that context depth
    (llama-bench's -d, through the server)."""
    say = progress or (lambda msg: None)
    check_target(t)
    prompts = Prompts(t)
    say(f"{t.name}: warm-up")
    warm_up(t, prompts)
    head = None
    if depth:
        say(f"{t.name}: a {depth}-token shared prefix, once per slot")
        head = prime_prefix(t, prompts, depth, max(concurrency))
    levels: list[Level] = []
    all_samples: list[tuple[int, Sample]] = []
    tokens_out = 0
    with Sampler(t.pid, t.gpu_ids) as sampler:
        for c in concurrency:
            say(f"{t.name}: concurrency {c}, {runs} round(s) of {prompt_tokens}+{gen_tokens} tokens")
            samples, wall = run_level(t, prompts, c, prompt_tokens, gen_tokens, runs, head)
            levels.append(summarize(c, samples, wall))
            all_samples.extend((c, s) for s in samples)
            tokens_out += sum(s.completion_tokens for s in samples if s.ok)
    res = ServerResult(t.name, t.engine, t.served_name, t.url, prompt_tokens, gen_tokens, prompts.method, levels,
                       depth=depth)
    res.samples = [{**{k: v for k, v in asdict(s).items() if k not in ("itl_s", "text")}, "concurrency": c,
                    "decode_tps": s.decode_tps, "prefill_tps": s.prefill_tps} for c, s in all_samples]
    res.rss_peak_bytes = sampler.rss_peak or None
    res.gpu_memory_peak_bytes = sampler.gpu_mem_peak or None
    if sampler.power_samples:
        res.avg_power_w = round(statistics.mean(sampler.power_samples), 1)
        res.joules_per_token = round(sampler.energy_j / tokens_out, 4) if tokens_out else None
    elif sampler._handles:
        res.notes.append("the GPU does not report power: no watts per token")
    if prefix:
        say(f"{t.name}: shared-prefix run")
        res.prefix = run_prefix(t, prompts, max(prompt_tokens, 256))
    first = levels[0] if levels and levels[0].concurrency == 1 else None
    res.gpu = t.gpu
    res.roofline = roofline(t, depth + prompt_tokens, first.decode_tps if first else None,
                            (first.server_prefill_tps or first.prefill_tps) if first else None,
                            depth + prompt_tokens // 2)
    if res.roofline is None:
        res.notes.append("no decode roofline: the model file's tensor sizes are unknown")
    for lv in levels:
        if lv.errors:
            res.notes.append(f"concurrency {lv.concurrency}: {lv.errors} of {lv.requests} requests failed: "
                             + "; ".join(lv.error_examples))
    return res


# --------------------------------------------------------------------------- roofline

def bytes_per_token(model_location: str, kv_cache: str, depth: int) -> tuple[int, str] | None:
    """Bytes a batch-1 decode step reads (plan.speed.decode_bytes on the model file's facts): every
    weight except the token-embedding table, only the active share of MoE experts, and the KV cache
    of `depth` earlier tokens. None when the file's tensor sizes are unknown."""
    from orchestrator.facts.model import gather
    from orchestrator.plan.speed import decode_bytes

    facts = gather(model_location)
    if not facts.metadata.get("tensors.bytes") and not (facts.exists and facts.size_bytes
                                                        and not facts.size_is_estimate):
        return None
    got = decode_bytes(facts, kv_cache, depth)
    if got is None:
        return None
    read, kv, detail = got
    return read + kv, detail


@functools.lru_cache(maxsize=1)
def memory_bandwidth_gbs(seconds: float = 1.0) -> float:
    """This machine's memory read bandwidth, measured now (a decode step streams the weights, so
    reads are what count): up to 16 threads each summing a 128 MiB float32 array, best of 3."""
    import numpy as np
    import psutil

    threads = min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, 16)
    arrays = [np.ones(32 * 2**20, dtype=np.float32) for _ in range(threads)]
    best = 0.0
    for _ in range(3):
        done = [0] * threads
        until = time.perf_counter() + seconds / 3

        def read(i: int, until: float = until, done: list[int] = done) -> None:
            while time.perf_counter() < until:
                arrays[i].sum()   # releases the GIL: the threads read in parallel
                done[i] += arrays[i].nbytes

        t0 = time.perf_counter()
        workers = [threading.Thread(target=read, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, sum(done) / (time.perf_counter() - t0) / 1e9)
    return best


@functools.lru_cache(maxsize=1)
def matmul_gflops(seconds: float = 1.0) -> float:
    """This machine's float32 matrix-multiply rate, measured now (prefill is matmul-bound): numpy's
    BLAS on 1024 x 1024 matrices, on all the threads it uses, best of 3."""
    import numpy as np

    n = 1024
    a = np.ones((n, n), dtype=np.float32)
    b = np.ones((n, n), dtype=np.float32)
    a @ b   # warm-up: BLAS threads start
    best = 0.0
    for _ in range(3):
        done = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            done += 1
        best = max(best, done * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def roofline(t: Target, depth: int, decode_tps: float | None, prefill_tps: float | None = None,
             prefill_depth: int | None = None) -> Roofline | None:
    """Decode after `depth` tokens of context; prefill at a mean depth of `prefill_depth` (half the prompt
    when the context starts empty)."""
    if not t.model_location:
        return None
    got = bytes_per_token(t.model_location, t.kv_cache, depth)
    if got is None:
        return None
    nbytes, detail = got
    if t.bandwidth_gbs:
        bw, src = t.bandwidth_gbs, "GPU catalog"
    else:
        bw, src = memory_bandwidth_gbs(), "measured on this machine now (parallel reads)"
    roof = bw * 1e9 / nbytes
    share = round(decode_tps / roof, 3) if decode_tps else None
    rf = Roofline(nbytes, round(bw, 1), src, round(roof, 1), share, detail)
    from orchestrator.facts.model import gather
    from orchestrator.plan.speed import flops_per_token

    flops = flops_per_token(gather(t.model_location), depth // 2 if prefill_depth is None else prefill_depth)
    tflops, csrc = ((t.tflops, "GPU catalog FP16") if t.tflops else
                    (matmul_gflops() / 1000, "measured on this machine now (float32 matmul)") if not t.bandwidth_gbs
                    else (None, "unknown"))
    if flops and tflops:
        rf.flops_per_token = flops[0]
        rf.compute_tflops = round(tflops, 3)
        rf.compute_source = csrc
        rf.prefill_roofline_tps = round(tflops * 1e12 / flops[0], 1)
        rf.prefill_share = round(prefill_tps / rf.prefill_roofline_tps, 3) if prefill_tps else None
    return rf


# --------------------------------------------------------------------------- compare

@dataclass
class Ratio:
    metric: str
    a: float | None
    b: float | None
    ratio: float | None            # median of per-round B/A
    low: float | None              # spread: min and max per-round ratio
    high: float | None
    higher_is_better: bool


COMPARE_METRICS = (("prefill_tps", True), ("decode_tps", True), ("throughput_tps", True),
                   ("ttft_ms", False), ("itl_ms", False))


def ratios(rounds_a: list[ServerResult], rounds_b: list[ServerResult]) -> list[Ratio]:
    """Per concurrency level and metric: medians of A and B and the median and spread of B/A over
    rounds run side by side."""
    out = []
    for i, lv in enumerate(rounds_a[0].levels):
        for metric, better_high in COMPARE_METRICS:
            av = [getattr(r.levels[i], metric) for r in rounds_a]
            bv = [getattr(r.levels[i], metric) for r in rounds_b]
            pairs = [(a, b) for a, b in zip(av, bv, strict=True) if a and b]
            rs = [b / a for a, b in pairs]
            name = f"c={lv.concurrency} {metric}"
            out.append(Ratio(name, _med([a for a, _ in pairs]), _med([b for _, b in pairs]),
                             # the ratio at the spread's precision: _med's 2 decimals put it below the
                             # low end when two rounds' ratios agreed to 3 (1.54 < 1.541)
                             _r(statistics.median(rs), 3) if rs else None, _r(min(rs), 3) if rs else None,
                             _r(max(rs), 3) if rs else None,
                             better_high))
    return out


def _med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 2) if xs else None


# --------------------------------------------------------------------------- saving

def results_file(state_dir: str) -> Path:
    return Path(state_dir) / "bench" / "results.jsonl"


class Saveable(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


def save(path: Path, profile: str, results: Sequence[Saveable], kind: str = "bench") -> dict[str, Any]:
    """Append one run; return the previous saved run of the same kind and profile, if any. `kind`
    tells bench runs from quality evaluations (orchestrate eval), which share the file."""
    import platform

    previous = last_saved(path, profile, kind)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, "profile": profile,
             "host": platform.node(), "servers": [r.as_dict() for r in results]}
    torn = False
    if path.exists() and path.stat().st_size:
        with path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as fh:
        fh.write(("\n" if torn else "") + json.dumps(entry) + "\n")   # never glued to a line cut short
    return previous


def last_saved(path: Path, profile: str, kind: str = "bench") -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in _entries(path):
        if entry.get("profile") == profile and entry.get("kind", "bench") == kind:
            found = entry
    return found


def saved(path: Path, kind: str) -> list[dict[str, Any]]:
    """Every saved run of one kind, oldest first."""
    return [e for e in _entries(path) if e.get("kind", "bench") == kind]


def _entries(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue   # a line cut short by a crash: the others still count
        if isinstance(entry, dict):
            yield entry


def plot(results: list[ServerResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib", "pip install 'orchestrator[plot]'") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        xs = [lv.concurrency for lv in r.levels]
        ax1.plot(xs, [lv.throughput_tps or 0 for lv in r.levels], marker="o", label=f"{r.server} aggregate")
        ax1.plot(xs, [lv.decode_tps or 0 for lv in r.levels], marker="x", linestyle="--",
                 label=f"{r.server} per stream")
        ax2.plot(xs, [lv.ttft_ms or 0 for lv in r.levels], marker="o", label=f"{r.server} TTFT p50")
        ax2.plot(xs, [lv.itl_ms or 0 for lv in r.levels], marker="x", linestyle="--", label=f"{r.server} ITL p50")
    ax1.set(xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput")
    ax2.set(xlabel="concurrent requests", ylabel="ms", title="Latency", yscale="log")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    r0 = results[0]
    fig.suptitle(f"{r0.model}: {r0.prompt_tokens} prompt + {r0.gen_tokens} generated tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
