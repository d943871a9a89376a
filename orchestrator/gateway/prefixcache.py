"""The prefix-cache doctor: for every chat or completion request through the gateway, how many prompt
tokens the engine reused (its own count), how many it could have reused (the longest common prefix
with the conversation's previous prompt, on the engine's own tokens where it can render and tokenize),
and, when reuse was lost, what broke it — located to the message and the characters, or the engine's
own limit.

The request path pays only for reading the shape of the body (`prepare`) and the engine's counts from
the answer (`finished`); rendering (`/apply-template`), tokenizing (`/tokenize`), comparing and the
record are done after the answer, by one worker in arrival order. Memory is bounded: the previous prompt
of at most `MAX_CONVERSATIONS` conversations and `MAX_BYTES` of prompt text and tokens, least recently
used dropped first. Records (no prompt text beyond the short located snippets) go to
STATE_DIR/prefix-cache/DEPLOYMENT.jsonl, rotated at `MAX_RECORD_BYTES`, for `orchestrate cache-report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from orchestrator.gateway.prefixdiff import (
    Cause,
    Counts,
    Shape,
    Verdict,
    common_prefix,
    common_tokens,
    located,
    normalize_tools,
    shape_causes,
    shape_of,
)
from orchestrator.plan.model import Plan, ServerPlan

if TYPE_CHECKING:
    from orchestrator.gateway.metrics import Metrics

MAX_CONVERSATIONS = 512
MAX_BYTES = 64 * 2**20
PER_CLIENT = 8                 # recent conversations of one client compared when a request starts a new one
MAX_RECORD_BYTES = 8 * 2**20   # then DEPLOYMENT.jsonl becomes DEPLOYMENT.jsonl.1 (one kept)
QUEUE = 1024                   # requests waiting for analysis; more are counted as skipped
ENGINE_TIMEOUT_S = 10.0
RENDERING_ENGINES = ("llama.cpp", "ik_llama")   # /apply-template and /tokenize
OFF_FLAGS = {"--no-cache-prompt", "--no-enable-prefix-caching", "--disable-radix-cache"}


def records_path(state_root: str | Path, deployment: str) -> Path:
    return Path(state_root) / "prefix-cache" / f"{deployment}.jsonl"


@dataclass
class Seen:
    """One finished request, as remembered for the next request of its conversation."""

    conversation: str
    client: str
    model: str
    server: str
    shape: Shape
    text: str                  # the rendered prompt (or the shape's stand-in)
    tokens: bytes | None       # the engine's token ids (array('i')), when it tokenized
    prompt: int | None
    generated: int
    seq: int = 0               # the server's request counter when it finished
    rendered: bool = True      # text is the engine's rendering (False: the shape's stand-in)

    def size(self) -> int:
        return 2 * len(self.text) + self.shape.size() * 2 + len(self.tokens or b"") + 256


class Memory:
    """The last prompt of each recent conversation, least recently used dropped first."""

    def __init__(self, max_conversations: int = MAX_CONVERSATIONS, max_bytes: int = MAX_BYTES) -> None:
        self.max_conversations, self.max_bytes = max_conversations, max_bytes
        self.by_conversation: OrderedDict[str, Seen] = OrderedDict()
        self.bytes = 0

    def remember(self, seen: Seen) -> None:
        old = self.by_conversation.pop(seen.conversation, None)
        if old is not None:
            self.bytes -= old.size()
        self.by_conversation[seen.conversation] = seen
        self.bytes += seen.size()
        while self.by_conversation and (len(self.by_conversation) > self.max_conversations
                                        or self.bytes > self.max_bytes):
            _, dropped = self.by_conversation.popitem(last=False)
            self.bytes -= dropped.size()

    def reference(self, cur: Seen) -> tuple[Seen | None, str]:
        """The previous prompt of the same conversation ("conversation"); else the client's recent prompt
        that shares the most with this one: a rewrite of that conversation's first turn when this
        request carries history that one had ("client"), else another conversation whose shared
        prefix (a common system prompt) is still reusable ("shared")."""
        same = self.by_conversation.get(cur.conversation)
        if same is not None and same.model == cur.model:
            return same, "conversation"
        best, best_n = None, 0
        recent = [s for s in reversed(self.by_conversation.values()) if s.client == cur.client and
                  s.model == cur.model][:PER_CLIENT]
        for s in recent:
            n = common_prefix(cur.text, s.text)
            if n > best_n:
                best, best_n = s, n
        if best is None:
            return None, "none"
        later = set(cur.shape.messages[2:])
        if later and any(m in later for m in best.shape.messages[2:]):
            return best, "client"
        return best, "shared"


@dataclass
class ServerInfo:
    """What the plan says about a server's cache."""

    engine: str
    slots: int
    context: int
    cache_off: str | None       # the flag that turns prefix caching off, if planned
    swa_without_full: bool      # llama.cpp on a sliding-window model without --swa-full

    @staticmethod
    def of(sp: ServerPlan, swa_layers: int) -> ServerInfo:
        names = {f.name for f in sp.flags}
        off = next((f for f in sorted(OFF_FLAGS) if f in names), None)
        settings = sp.settings
        swa_full = bool(settings and settings.swa_full) or "--swa-full" in names
        return ServerInfo(sp.engine, settings.slots if settings else 1, settings.context if settings else 0, off,
                          sp.engine == "llama.cpp" and swa_layers > 0 and not swa_full)


@dataclass
class Job:
    endpoint: str
    body: dict[str, Any]
    shape: Shape
    model: str
    server: str
    client: str
    conversation: str
    status: int
    counts: Counts
    t: float = field(default_factory=time.time)


def conversation_key(client: str, model: str, shape: Shape) -> str:
    """Requests of one client and model that start with the same first user turn (or, for completions,
    all of a client's requests) make one conversation."""
    first = next((m.text for m in shape.messages if m.role == "user"), "") if shape.prompt is None else "completion"
    digest = hashlib.blake2b(f"{client}\x00{model}\x00{first}".encode(errors="replace"), digest_size=6).hexdigest()
    return "c-" + digest


def judge(cur: Seen, ref: Seen | None, how: str, counts: Counts, info: ServerInfo, cache_prompt: bool,
          others_since: int) -> Verdict:
    """How much of the prompt was reusable, what the engine reused, and every cause of a loss."""
    prompt, cached = counts.prompt, counts.cached
    if ref is None:
        return Verdict(prompt, cached, cached or 0, reference="none", exact=cur.tokens is not None)
    exact = cur.tokens is not None and ref.tokens is not None
    cur_text, ref_text = cur.text, ref.text
    if cur.rendered != ref.rendered:     # never a rendering against a stand-in: both stand-ins
        cur_text, ref_text, exact = cur.shape.flat(), ref.shape.flat(), False
    prefix_chars = common_prefix(cur_text, ref_text)
    if exact:
        assert cur.tokens is not None and ref.tokens is not None
        lcp = common_tokens(cur.tokens, ref.tokens)
        ref_len = len(ref.tokens) // 4
    else:
        total = prompt or 0
        lcp = round(prefix_chars / max(len(cur_text), 1) * total)
        ref_len = ref.prompt or 0
    if prompt:
        lcp = min(lcp, prompt - 1)        # the engine evaluates at least the last token again
    v = Verdict(prompt, cached, max(lcp, 0), reference=how, exact=exact)
    reusable = v.reusable or 0
    appended = cur_text.startswith(ref_text)
    if how != "shared" and not appended and prefix_chars < len(ref_text):
        causes = shape_causes(cur.shape, ref.shape)
        if not causes:
            text, at, kind, _, _ = located("the rendered prompt", cur_text, ref_text)
            causes = [Cause("rendered_differs", f"{text}: the messages are unchanged, so the chat template renders "
                            "earlier turns differently", "template", at, kind)]
        v.broken = max(0, ref_len - lcp)
        causes[0].tokens = v.broken
        v.causes += causes
    if cached is not None and cached > reusable and v.causes:
        # the engine found more elsewhere (another slot, its host-memory prompt cache): the break cost less
        v.broken = max(0, v.broken - (cached - reusable))
        v.causes[0].tokens = v.broken
    if cached is not None:
        lost = reusable - cached
        if lost > max(4, reusable // (50 if exact else 10)):   # an estimate on characters is rougher
            v.lost = lost
            v.causes.append(engine_cause(cur, ref, info, cache_prompt, others_since, lost))
        v.reusable = max(reusable, cached)
    if counts.prompt_per_second:
        for c in v.causes:
            c.seconds = c.tokens / counts.prompt_per_second
    return v


def engine_cause(cur: Seen, ref: Seen, info: ServerInfo, cache_prompt: bool, others_since: int, lost: int) -> Cause:
    share = f"the engine reused {lost} tokens fewer than the prompt shares with the previous one"
    if not cache_prompt:
        return Cause("cache_prompt_off", f"{share}: the request sent cache_prompt: false", "engine", tokens=lost)
    if info.cache_off:
        return Cause("prefix_cache_off", f"{share}: the server runs with {info.cache_off} (profile prefix_cache: "
                     "false)", "engine", tokens=lost)
    if ref.server != cur.server:
        return Cause("other_server", f"{share}: the previous request was answered by server {ref.server}, whose "
                     "cache holds it", "engine", tokens=lost)
    if others_since >= info.slots:
        return Cause("slot_evicted", f"{share}: {others_since} other conversation(s) used the server's "
                     f"{info.slots} slot(s) since this one's last request; raise parallel or keep fewer "
                     "conversations going at once", "engine", tokens=lost)
    if info.context and (ref.prompt or 0) + ref.generated >= info.context:
        return Cause("context_shift", f"{share}: the previous turn ({ref.prompt} + {ref.generated} tokens) filled "
                     f"the slot's context of {info.context}, so the engine shifted or dropped it", "engine",
                     tokens=lost)
    if info.swa_without_full:
        return Cause("swa", f"{share}: a sliding-window model on llama.cpp without --swa-full keeps only the "
                     "window of those layers' KV, so a shared prefix is processed again; the planner adds "
                     "--swa-full when it fits (lower context or parallel to make room)", "engine", tokens=lost)
    return Cause("engine_unknown", f"{share}; it did not say why (see the server's log)", "engine", tokens=lost)


class PrefixCacheHook:
    """The gateway hook (prepare / finished) and its analysis worker."""

    def __init__(self, plan: Plan, upstream: Any, client: httpx.AsyncClient, metrics: Metrics | None,
                 state_root: str | Path | None, normalize: bool = False, memory: Memory | None = None) -> None:
        self.plan = plan
        self.upstream = upstream            # name -> (base URL, headers), the gateway's
        self.client = client
        self.metrics = metrics
        self.normalize = normalize
        self.memory = memory or Memory()
        self.path = records_path(state_root, plan.name) if state_root is not None else None
        self.queue: asyncio.Queue[Job] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.activity: dict[str, deque[tuple[int, str]]] = {}
        self.seq: dict[str, int] = {}
        self.infos: dict[str, ServerInfo] = {}
        self.skipped = 0
        self.render_failures = 0
        self.last: Verdict | None = None

    # ------------------------------------------------------------------ on the request path

    def prepare(self, call: Any) -> None:
        if call.endpoint == "/v1/embeddings":
            return None
        if self.normalize and normalize_tools(call.body):
            call.set_body(call.body)
            call.notes["prefix_cache.normalized"] = True
        return None

    def finished(self, call: Any, status: int, answer: dict[str, Any] | None) -> None:
        if status != 200 or call.endpoint == "/v1/embeddings":
            return
        shape = shape_of(call.endpoint, call.body)
        if shape is None:
            return
        job = Job(call.endpoint, call.body, shape, call.model, call.name, call.client,
                  conversation_key(call.client, call.model, shape), status, Counts.of(answer))
        self.submit(job)

    def submit(self, job: Job) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue(QUEUE)
            self.worker = asyncio.get_running_loop().create_task(self._work())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.skipped += 1

    # ------------------------------------------------------------------ after the answer

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            job = await self.queue.get()
            try:
                await self.analyse(job)
            except Exception as exc:   # the doctor never takes the gateway down
                if self.metrics:
                    self.metrics.log(f"prefix-cache: analysis failed: {type(exc).__name__}: {exc}")
            finally:
                self.queue.task_done()

    async def drain(self) -> None:
        """Wait until every finished request has been analysed (tests, benchmarks, shutdown)."""
        if self.queue is not None:
            await self.queue.join()

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.worker

    async def analyse(self, job: Job) -> Verdict:
        info = await self.info(job.server)
        text, tokens, rendered = await self.render(job, info)
        seq = self.seq[job.server] = self.seq.get(job.server, 0) + 1
        cur = Seen(job.conversation, job.client, job.model, job.server, job.shape, text, tokens, job.counts.prompt,
                   job.counts.generated or 0, seq, rendered)
        ref, how = self.memory.reference(cur)
        others = 0
        if ref is not None:
            others = len({c for s, c in self.activity.get(job.server, ()) if s > ref.seq and c != ref.conversation})
        verdict = judge(cur, ref, how, job.counts, info, job.body.get("cache_prompt") is not False, others)
        if ref is not None and how == "client":
            self.memory.by_conversation.pop(ref.conversation, None)   # the conversation goes on under its new key
        self.memory.remember(cur)
        self.activity.setdefault(job.server, deque(maxlen=256)).append((seq, job.conversation))
        self.last = verdict
        self.count(job, verdict)
        self.write(job, verdict)
        return verdict

    async def info(self, name: str) -> ServerInfo:
        if name not in self.infos:
            sp = self.plan.server(name)
            self.infos[name] = ServerInfo.of(sp, await asyncio.to_thread(_swa_layers, sp))
        return self.infos[name]

    async def render(self, job: Job, info: ServerInfo) -> tuple[str, bytes | None, bool]:
        """The prompt as the engine renders and tokenizes it, where it can (llama.cpp, ik_llama.cpp);
        otherwise the shape's stand-in, untokenized."""
        if info.engine not in RENDERING_ENGINES:
            return job.shape.flat(), None, job.shape.prompt is not None
        base, headers = self.upstream(job.server)

        async def post(path: str, body: dict[str, Any]) -> Any:
            for attempt in (1, 2):      # a kept-alive connection the engine closed meanwhile: once more
                try:
                    r = await self.client.post(base + path, json=body, headers=headers, timeout=ENGINE_TIMEOUT_S)
                    break
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                    if attempt == 2:
                        raise
            r.raise_for_status()
            return r.json()

        try:
            text = job.shape.prompt
            if text is None:
                body = {k: v for k, v in job.body.items() if k not in ("stream", "stream_options")}
                text = (await post("/apply-template", body))["prompt"]
                if not isinstance(text, str):
                    return job.shape.flat(), None, False
            ids = (await post("/tokenize", {"content": text, "add_special": True, "parse_special": True}))["tokens"]
            return text, array("i", ids).tobytes(), True
        except (httpx.HTTPError, ValueError, KeyError, TypeError, OverflowError) as exc:
            self.render_failures += 1
            if self.metrics and self.render_failures <= 3:
                detail = exc.response.text[:200] if isinstance(exc, httpx.HTTPStatusError) else ""
                self.metrics.log(f"prefix-cache: {job.server} could not render/tokenize the prompt "
                                 f"({type(exc).__name__} {detail}); counting on the messages instead")
            if job.shape.prompt is not None:
                return job.shape.prompt, None, True
            return job.shape.flat(), None, False

    # ------------------------------------------------------------------ what it tells

    def count(self, job: Job, v: Verdict) -> None:
        if self.metrics is None or not hasattr(self.metrics, "prefix_prompt"):
            return
        m = self.metrics
        client = m.client_label(job.client)
        m.prefix_prompt.labels(job.model, client).inc(v.prompt or 0)
        m.prefix_reused.labels(job.model, client).inc(v.cached or 0)
        m.prefix_reusable.labels(job.model, client).inc(v.reusable or 0)
        for c in v.causes:
            m.prefix_lost.labels(job.model, client, c.kind).inc(c.tokens)
        if v.causes:
            m.log(f"prefix-cache {job.model} client={client} {job.conversation}: reused {v.cached} of "
                  f"{v.reusable} reusable, {v.prompt} prompt tokens; " + "; ".join(c.detail for c in v.causes))

    def write(self, job: Job, v: Verdict) -> None:
        if self.path is None:
            return
        rec = {"t": round(job.t, 3), "model": job.model, "server": job.server, "client": job.client,
               "conversation": job.conversation, "endpoint": job.endpoint, "prompt": v.prompt, "cached": v.cached,
               "reusable": v.reusable, "broken": v.broken, "lost": v.lost, "exact": v.exact,
               "reference": v.reference, "prompt_per_second": job.counts.prompt_per_second,
               "causes": [c.as_dict() for c in v.causes]}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_size + len(line) > MAX_RECORD_BYTES:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:
                fh.write(line)
        except OSError as exc:
            if self.metrics:
                self.metrics.log(f"prefix-cache: cannot write {self.path}: {exc.strerror}")


def _swa_layers(sp: ServerPlan) -> int:
    """Sliding-window layers of the server's model (0 when unknown): the GGUF header, cached by file."""
    if sp.model_format != "gguf" or sp.model_is_hf:
        return 0
    try:
        from orchestrator.facts.model import gather
        from orchestrator.plan.fit import swa_layers

        return swa_layers(gather(sp.model_location))
    except Exception:
        return 0
