"""Where two prompts of one conversation part, and why: the pure half of the prefix-cache doctor.

A request's prompt is seen twice: as its *shape* (the tools and messages of a chat request, or the
prompt of a completion), which says which message and which characters changed, and as the *rendered*
prompt the engine tokenizes (its token ids when the engine can tokenize), which says how many tokens
the two share. Nothing here does I/O; `prefixcache.py` feeds it what the engine said.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

SNIPPET = 24          # characters of each side shown around a change (records keep no more prompt text)

# What usually makes a prompt differ from one request to the next without anyone meaning to.
PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("a uuid", re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")),
    ("a timestamp", re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")),
    ("a timestamp", re.compile(r"\b\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s?[AaPp][Mm])?\b")),
    ("a timestamp", re.compile(r"\b1[5-9]\d{8}(?:\d{3})?\b")),                       # unix seconds / ms
    ("a date", re.compile(r"\d{4}-\d{2}-\d{2}|\b\d{1,2}/\d{1,2}/\d{2,4}\b")),
    ("a date", re.compile(r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)[a-z]*,?\s+\w+\s+\d{1,2}|\b(?:Jan|Feb|Mar|Apr|May|Jun|"
                          r"Jul|Aug|Sep|Oct|Nov|Dec)[a-z]*\.?\s+\d{1,2}(?:,?\s+\d{4})?")),
    ("an id", re.compile(r"\b(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b")),
    ("a counter", re.compile(r"\d+")),
]
# Marks of a chat template written out by the client (a /v1/completions prompt it rendered itself).
TEMPLATE_MARKS = re.compile(r"<\|[^|>]{1,40}\|>|<start_of_turn>|<end_of_turn>|\[/?INST\]|<s>|</s>|<bos>|"
                            r"^### (?:Instruction|Response|User|Assistant)|\b(?:USER|ASSISTANT):", re.M)


def common_prefix(a: str | bytes | memoryview, b: str | bytes | memoryview) -> int:
    """Length of the longest common prefix, by bisection over slice equality (memcmp speed, no
    per-character Python loop)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:                     # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_tokens(a: bytes, b: bytes) -> int:
    """Common prefix of two token id arrays stored as 4-byte ints."""
    n = common_prefix(memoryview(a), memoryview(b))
    return n // 4


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):     # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, dict) and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                parts.append(json.dumps(p, ensure_ascii=False))
        return "".join(parts)
    return json.dumps(content, ensure_ascii=False)


@dataclass(frozen=True)
class Message:
    role: str
    text: str

    def label(self, index: int) -> str:
        if index == 0 and self.role in ("system", "developer"):
            return "system prompt"
        return f"message {index} ({self.role})"


@dataclass(frozen=True)
class Shape:
    """What a request's prompt is made of: tools and messages (chat), or a prompt (completions)."""

    tools: tuple[tuple[str, str], ...] = ()        # (name, the tool's JSON as sent)
    messages: tuple[Message, ...] = ()
    prompt: str | None = None                      # /v1/completions
    template: str = ""                             # chat_template / chat_template_kwargs as sent

    def size(self) -> int:
        return (sum(len(n) + len(j) for n, j in self.tools) + sum(len(m.text) + 8 for m in self.messages)
                + len(self.prompt or "") + len(self.template))

    def flat(self) -> str:
        """A stand-in for the rendered prompt when the engine cannot render it."""
        if self.prompt is not None:
            return self.prompt
        head = "".join(j for _, j in self.tools) + self.template
        return head + "".join(f"\x00{m.role}\x00{m.text}" for m in self.messages)


def shape_of(endpoint: str, body: dict[str, Any]) -> Shape | None:
    """The shape of a chat or completion request; None for what has no prefix to reuse (embeddings,
    token-id or batched prompts)."""
    if endpoint.endswith("/chat/completions"):
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return None
        messages = []
        for m in msgs:
            if not isinstance(m, dict):
                return None
            text = _text(m.get("content"))
            if m.get("tool_calls"):
                text += json.dumps(m["tool_calls"], ensure_ascii=False)
            if m.get("reasoning_content"):
                text = _text(m["reasoning_content"]) + text
            messages.append(Message(str(m.get("role", "")), text))
        tools = []
        for t in body.get("tools") or []:
            fn = t.get("function", {}) if isinstance(t, dict) else {}
            name = str(fn.get("name", "?")) if isinstance(fn, dict) else "?"
            tools.append((name, json.dumps(t, ensure_ascii=False)))
        template = ""
        for key in ("chat_template", "chat_template_kwargs"):
            if key in body:
                template += json.dumps(body[key], sort_keys=True, ensure_ascii=False)
        return Shape(tuple(tools), tuple(messages), None, template)
    if endpoint.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        return Shape(prompt=prompt) if isinstance(prompt, str) else None
    return None


def normalize_tools(body: dict[str, Any]) -> bool:
    """Sort tool definitions by name and the keys of each definition, in place; True when anything
    changed. (It changes what the model sees: off unless the profile turns it on.)"""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return False

    def name(t: Any) -> str:
        fn = t.get("function") if isinstance(t, dict) else None
        return str(fn.get("name", "")) if isinstance(fn, dict) else json.dumps(t, sort_keys=True)

    fixed = [json.loads(json.dumps(t, sort_keys=True)) for t in sorted(tools, key=name)]
    if json.dumps(fixed) == json.dumps(tools):
        return False
    body["tools"] = fixed
    return True


# ---------------------------------------------------------------------------------------- locating a change


def what_it_looks_like(a: str, b: str, at: int) -> tuple[str | None, str, str]:
    """(what the changed text looks like, the changed text now, before) around position `at`."""
    for kind, pattern in PATTERNS:
        ma = _covering(pattern, a, at)
        mb = _covering(pattern, b, at)
        if ma and mb and ma != mb:
            return kind, ma, mb
    start = max(0, at - 8)
    return None, a[start:start + SNIPPET], b[start:start + SNIPPET]


def _covering(pattern: re.Pattern[str], text: str, at: int) -> str | None:
    lo = max(0, at - 40)
    for m in pattern.finditer(text, lo, min(len(text), at + 40)):
        if m.start() <= at <= m.end() and (m.end() > at or m.start() == at):
            return m.group(0)[:SNIPPET * 2]
    return None


def located(label: str, now: str, before: str) -> tuple[str, int, str | None, str, str]:
    """'system prompt differs at char 112: '…' vs '…' — looks like a timestamp', with its parts."""
    at = common_prefix(now, before)
    kind, a, b = what_it_looks_like(now, before, at)
    text = f"{label} differs at char {at}: {a!r} vs {b!r} (now vs before)"
    if kind:
        text += f" — looks like {kind}"
    return text, at, kind, a, b


@dataclass
class Cause:
    kind: str             # see KINDS
    detail: str           # one line, located; never more prompt text than the short snippets
    where: str = ""       # "system prompt", "message 3 (user)", "tools", "prompt", "engine"
    char: int | None = None
    looks_like: str | None = None
    tokens: int = 0       # what it cost, in tokens
    seconds: float | None = None   # …and in prefill time, from the engine's measured prompt speed

    def as_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "detail": self.detail, "where": self.where, "tokens": self.tokens}
        if self.char is not None:
            out["char"] = self.char
        if self.looks_like:
            out["looks_like"] = self.looks_like
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 4)
        return out


KINDS = {
    "tools_reordered": "the tool list came in another order",
    "tools_changed": "a tool was added, removed or its definition changed",
    "tool_key_order": "the JSON keys of a tool schema came in another order",
    "system_changed": "the system prompt changed",
    "history_edited": "an earlier message was edited",
    "history_removed": "an earlier message was removed",
    "history_inserted": "a message was inserted into the history",
    "template_changed": "the prompt's template changed",
    "rendered_differs": "the chat template rendered earlier turns differently",
    "prompt_changed": "the completion prompt changed before its end",
    "cache_prompt_off": "the request turned cache_prompt off",
    "prefix_cache_off": "the server runs with prefix caching off",
    "swa": "a sliding-window model without --swa-full",
    "slot_evicted": "other conversations took the server's slots",
    "context_shift": "the conversation outgrew the slot's context",
    "engine_unknown": "the engine reused less than the shared prefix, without saying why",
}


def shape_causes(now: Shape, before: Shape) -> list[Cause]:
    """What changed between two prompts of one conversation, first change first; [] when the new
    prompt only appends to the old one."""
    causes: list[Cause] = []
    if now.prompt is not None or before.prompt is not None:
        a, b = now.prompt or "", before.prompt or ""
        if a.startswith(b):
            return []
        at = common_prefix(a, b)
        window_a, window_b = a[max(0, at - 16):at + 16], b[max(0, at - 16):at + 16]
        text, at, kind, sa, sb = located("prompt", a, b)
        if TEMPLATE_MARKS.search(window_a) or TEMPLATE_MARKS.search(window_b):
            return [Cause("template_changed", f"the prompt's template differs at char {at}: {sa!r} vs {sb!r} (now vs "
                          "before): the client rendered it with another chat template", "prompt", at)]
        return [Cause("prompt_changed", text, "prompt", at, kind)]
    if now.template != before.template:
        causes.append(Cause("template_changed", "chat_template / chat_template_kwargs differ from the previous "
                            "request's", "template"))
    causes += _tool_causes(now.tools, before.tools)
    causes += _message_causes(now.messages, before.messages)
    return causes


def _tool_causes(now: tuple[tuple[str, str], ...], before: tuple[tuple[str, str], ...]) -> list[Cause]:
    if now == before:
        return []
    names_now, names_before = [n for n, _ in now], [n for n, _ in before]

    def canon(j: str) -> str:
        return json.dumps(json.loads(j), sort_keys=True)

    if sorted(names_now) == sorted(names_before) and sorted(map(canon, (j for _, j in now))) == \
            sorted(map(canon, (j for _, j in before))):
        if names_now != names_before:
            return [Cause("tools_reordered", f"tools reordered: {names_now} now, {names_before} before (same "
                          "definitions); send them in a fixed order, or turn on gateway.prefix_cache.normalize_tools",
                          "tools")]
        for (name, ja), (_, jb) in zip(now, before, strict=True):
            if ja != jb:
                return [Cause("tool_key_order", f"tool {name!r}: the same schema with its JSON keys in another "
                              "order; serialise it the same way each time, or turn on "
                              "gateway.prefix_cache.normalize_tools", "tools")]
    added = [n for n in names_now if n not in names_before]
    removed = [n for n in names_before if n not in names_now]
    parts = []
    if added:
        parts.append(f"added {added}")
    if removed:
        parts.append(f"removed {removed}")
    old = dict(before)
    for name, j in now:
        if name in old and canon(old[name]) != canon(j):
            text, at, kind, a, b = located(f"tool {name!r}'s definition", j, old[name])
            parts.append(text)
            break
    if not parts:
        parts.append(f"tools reordered and changed: {names_now} now, {names_before} before")
    return [Cause("tools_changed", "tools changed: " + "; ".join(parts), "tools")]


def _message_causes(now: tuple[Message, ...], before: tuple[Message, ...]) -> list[Cause]:
    n = min(len(now), len(before))
    i = next((k for k in range(n) if now[k] != before[k]), n)
    if i == len(before) or i == len(now):
        return []        # appended (or the new request is a shorter prefix: a retry)
    old, new = before[i], now[i]
    k = min(len(now) - i, len(before) - i - 1)
    if k >= 1 and now[i:i + k] == before[i + 1:i + 1 + k]:
        return [Cause("history_removed", f"history rewritten: {old.label(i)} was removed (it was {len(old.text)} "
                      "chars)", old.label(i))]
    k = min(len(now) - i - 1, len(before) - i)
    if k >= 1 and now[i + 1:i + 1 + k] == before[i:i + k]:
        return [Cause("history_inserted", f"history rewritten: {new.label(i)} was inserted before the old "
                      f"{old.label(i)}", new.label(i))]
    if new.role != old.role:
        return [Cause("history_edited", f"history rewritten: {new.label(i)} is {new.role!r} now, {old.role!r} before",
                      new.label(i))]
    label = new.label(i)
    text, at, kind, _, _ = located(label, new.text, old.text)
    if label == "system prompt":
        return [Cause("system_changed", text, label, at, kind)]
    return [Cause("history_edited", f"history rewritten: {text}", label, at, kind)]


@dataclass
class Counts:
    """What the engine said about one request's prompt."""

    prompt: int | None = None         # prompt tokens
    cached: int | None = None         # of them, reused from the engine's cache
    generated: int | None = None
    prompt_per_second: float | None = None

    @staticmethod
    def of(answer: dict[str, Any] | None) -> Counts:
        """llama.cpp `timings` (cache_n + prompt_n; ik_llama.cpp: prompt_tokens less prompt_n), or
        `usage.prompt_tokens_details.cached_tokens` (vLLM, SGLang)."""
        c = Counts()
        if not isinstance(answer, dict):
            return c
        u, t = answer.get("usage"), answer.get("timings")
        usage: dict[str, Any] = u if isinstance(u, dict) else {}
        timings: dict[str, Any] = t if isinstance(t, dict) else {}
        if isinstance(usage.get("prompt_tokens"), int):
            c.prompt = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            c.generated = usage["completion_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            c.cached = details["cached_tokens"]
        prompt_n, cache_n = timings.get("prompt_n"), timings.get("cache_n")
        if isinstance(prompt_n, int):
            if isinstance(cache_n, int):
                c.cached, c.prompt = cache_n, cache_n + prompt_n
            elif c.prompt is not None and c.cached is None:
                c.cached = max(0, c.prompt - prompt_n)
            elif c.prompt is None:
                c.prompt = prompt_n
        if isinstance(timings.get("predicted_n"), int):
            c.generated = timings["predicted_n"]
        pps = timings.get("prompt_per_second")
        if isinstance(pps, int | float) and pps > 0:
            c.prompt_per_second = float(pps)
        return c


@dataclass
class Verdict:
    """One request's finding: tokens reused, reusable and lost, and why."""

    prompt: int | None
    cached: int | None
    reusable: int | None              # the longest common prefix with the conversation's previous prompt
    broken: int = 0                   # tokens of the previous prompt the new one no longer shares
    lost: int = 0                     # reusable tokens the engine processed again
    exact: bool = False               # counted on the engine's own tokens (else estimated from characters)
    causes: list[Cause] = field(default_factory=list)
    reference: str = "none"           # conversation | client | none

    @property
    def ok(self) -> bool:
        return not self.causes
