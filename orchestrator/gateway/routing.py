"""Routing: a virtual model name (`gateway.routes`) answered by the server of one of its tiers, chosen
per request by a fast scoring of what the user asked, with the reason in the response.

- `score(body)` is pure and fast (compiled regexes, no model): signals such as code, math, reasoning and
  multi-step words, "think step by step", the length of the user's own text and of the conversation,
  tools present, max_tokens, language. Lengths count the user's messages only: the long system prompts
  and tool lists that agent harnesses prepend do not make every request hard; `<system-reminder>`
  blocks inside user messages are stripped too.
- `Router` is a gateway hook: it recognises a route's name, picks the tier whose level covers the score,
  sets `call.name` and the `x-orchestrator-route` header. A conversation (a hash of client, system
  prompt and first user message) stays on its tier (a bounded LRU): it never moves down, so the
  prefix cache keeps working, and moves up one tier on an explicit `x-route-tier` header, on an upstream
  error (5xx, or a prompt that exceeds the server's context), or after repeated tool-call failures
  (`call.notes["tool_calls"] == "failed"`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import httpx

from orchestrator.gateway.scheduler import Rejected
from orchestrator.plan.model import RoutePlan

LEVELS = ("simple", "medium", "complex", "reasoning")


def _rx(*words: str) -> re.Pattern[str]:
    """Keyword patterns, matched against lowercased text (cheaper than re.IGNORECASE)."""
    pattern = "|".join(words)
    assert not re.search(r"\\[SWDB]", pattern), "lowercasing would change an escape"
    return re.compile(pattern.lower())


CODE_BLOCK = re.compile(r"```|^\s{4,}\S.*[;{}]\s*$|^(Traceback|\s+File \"[^\"]+\", line \d+)", re.MULTILINE)
CODE_WORDS = _rx(r"\b(def|class|func|fn|struct|impl|const|let|var|return|import|#include|SELECT|JOIN|WHERE)\b.*[(){};=:]",
                 r"\b(function|script|program|regex|parser|algorithm|component|endpoint|dockerfile|compose|query|"
                 r"unit tests?|tests?\b.*(pass|fail)|type hints|add tests|refactor|implement|compile[rs]?|deadlock|segfault|"
                 r"segmentation fault|borrow checker|memory leak|leaks? memory|stack ?trace|exception|"
                 r"TypeError|KeyError|RecursionError|null pointer|race condition|thread-safe|async(io)?|"
                 r"CORS|SQL|API|CLI|CI|cron|build takes|regression test|parameteri[sz]ed)\b",
                 r"\b(python|rust|golang|go code|javascript|typescript|java|c\+\+|bash|react|node|sql|kotlin)\b",
                 r"\b(Funktion|Skript|Schleife|fonction|requête|programa|función)\b")
MATH = _rx(r"\b(prove|proof|integral|integrate|derivative|differentiat\w*|equation|eigen\w*|matrix|probability|"
           r"induction|theorem|irrational|variance|binomial|solve|solutions?|compounded|interest|combinatori\w*|"
           r"how many ways|how fast|rate of change)\b",
           r"\d\s*[x*/^]\s*\w|[a-z]\^\d|\b\d+(\.\d+)?\s*%|[xy]''|\by\(0\)",
           r"\b(Beweise|Wahrscheinlichkeit|Gleichung|équation|probabilidad|ecuación|différentielle)\b")
REASONING = _rx(r"\b(explain (why|how|the (cause|mechanism|reasoning))|why does|why is|analy[sz]e|analysis|"
                r"compare|comparison|trade-?offs?|pros and cons|evaluate|justify|reason(ing)? (carefully|backwards)?|"
                r"derive|design|plan (a|an|the|my|our)|downtime|per second|architect\w*|strategy|diagnose|root cause|implications?|rigorous|"
                r"inconsistenc\w+|deductions?|inferences?|fallac\w+|edge cases|recommend (one|an approach))\b",
                r"\b(erkläre|warum|Analyse|analysiere|entwirf|pourquoi|explique|analyse|diseña|estrategia|"
                r"explica|razonamiento)\b")
STEPWISE = _rx(r"step[- ]by[- ]step|think (it )?(through|carefully)|reason carefully|show (the|your) work(ing)?|"
               r"Schritt für Schritt|étape par étape|paso a paso")
MULTISTEP = _rx(r"\b(then|after that|and then|finally|first|steps?|plan|phases?|week-by-week|prioriti[sz]ed|"
                r"migration|migrate|rollback|risks?|outline|schedule|list the steps)\b",
                r"\b(dann|danach|Phasen|ensuite|puis|étapes|fases|riesgos|plan de)\b")
SIMPLE = _rx(r"^\s*(hi|hello|hey|hallo|bonjour|hola|ciao|thanks?|thank you|danke|merci|gracias|ok|lol|good (morning|night))\b",
             r"\b(what is the (capital|plural|chemical symbol|boiling point)|who (wrote|painted)|how many (legs|days)|"
             r"what does \w+ stand for|define the word|translate|rephrase|rewrite|fix the grammar|correct the spelling|"
             r"summari[sz]e|tl;dr|synonyms?|capitali[sz]e|sort these|classify|sentiment|is this review|extract the)\b",
             r"\b(übersetze|fasse .*zusammen|formuliere|traduis|résume|corrige|quelle est|was ist|wie viele|cuántos)\b")
NON_LATIN = re.compile(r"[\u0400-\u04ff\u0600-\u06ff\u0900-\u097f\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")
NON_ENGLISH = _rx(r"\b(der|die|das|und|ist|nicht|ich|le|la|les|est|une|des|el|los|las|qué|por|para)\b")
HEAD = 1500
REMINDER = re.compile(r"<system-reminder>.*?</system-reminder>", re.DOTALL | re.IGNORECASE)

# Signal weights (tuned on the labeled set's training split: orchestrator/data/route_prompts.jsonl).
WEIGHTS = {"code": 0.35, "math": 0.30, "reasoning": 0.25, "step_by_step": 0.45, "multi_step": 0.10,
           "length": 0.20, "conversation": 0.05, "tools": 0.03, "max_tokens": 0.05, "language": 0.03,
           "simple": -0.20}


@dataclass
class Decision:
    score: float
    level: str
    signals: dict[str, float]

    def top(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(((k, v) for k, v in self.signals.items() if v), key=lambda kv: -abs(kv[1]))[:n]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # OpenAI content parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def user_texts(body: dict[str, Any]) -> tuple[list[str], str]:
    """(the user's messages, oldest first, reminders stripped; the system prompt)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        prompt = body.get("prompt")
        return [prompt if isinstance(prompt, str) else ""], ""
    users, system = [], ""
    for m in messages:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "user":
            users.append(REMINDER.sub("", _text(m.get("content"))))
        elif m.get("role") in ("system", "developer") and not system:
            system = _text(m.get("content"))
    return users or [""], system


def _count(rx: re.Pattern[str], text: str, cap: int) -> float:
    return min(len(rx.findall(text)), cap) / cap


def score(body: dict[str, Any], thresholds: dict[str, float]) -> Decision:
    """The request's complexity in [0, 1], its level, and each signal's part of the score."""
    users, _ = user_texts(body)
    ask = users[-1]
    # Keyword signals read the ask's start and end, where instructions are; a pasted document counts by its length.
    region = ask if len(ask) <= HEAD else ask[:HEAD - 500] + "\n" + ask[-500:]
    head = region.lower()
    raw = {
        "code": 1.0 if CODE_BLOCK.search(region) else _count(CODE_WORDS, head, 2),
        "math": _count(MATH, head, 2),
        "reasoning": _count(REASONING, head, 2),
        "step_by_step": 1.0 if STEPWISE.search(head) else 0.0,
        "multi_step": _count(MULTISTEP, head, 3),
        "length": min(max(len(ask) - 200, 0) / 2000, 1.0),
        "conversation": min(max(len(users) - 1, 0) / 6, 1.0),
        "tools": 1.0 if body.get("tools") else 0.0,
        "max_tokens": _max_tokens(body),
        "language": 1.0 if NON_LATIN.search(head) or len(NON_ENGLISH.findall(head)) >= 2 else 0.0,
        "simple": 0.0,
    }
    if not (raw["code"] or raw["math"]) and SIMPLE.search(head):   # "rewrite this function" is not a rewrite
        raw["simple"] = 1.0
    signals = {k: round(WEIGHTS[k] * v, 3) for k, v in raw.items()}
    total = max(0.0, min(1.0, sum(signals.values())))
    return Decision(round(total, 3), level_of(total, thresholds), signals)


def _max_tokens(body: dict[str, Any]) -> float:
    m = body.get("max_completion_tokens", body.get("max_tokens"))
    if not isinstance(m, int) or isinstance(m, bool):
        return 0.0
    return 1.0 if m >= 2048 else (-1.0 if m <= 32 else 0.0)


def level_of(total: float, thresholds: dict[str, float]) -> str:
    for level in LEVELS[:-1]:
        if total < thresholds[level]:
            return level
    return LEVELS[-1]


def tier_of(route: RoutePlan, level: str) -> int:
    """The first tier whose up_to covers the level (the last tier takes the rest)."""
    rank = LEVELS.index(level)
    for i, t in enumerate(route.tiers):
        if t.up_to is None or LEVELS.index(t.up_to) >= rank:
            return i
    return len(route.tiers) - 1


def conversation_key(client: str, body: dict[str, Any]) -> str:
    users, system = user_texts(body)
    blob = "\0".join((client, system, users[0]))
    return hashlib.blake2b(blob.encode("utf-8", "replace"), digest_size=12).hexdigest()


@dataclass
class Pin:
    tier: int
    failures: int = 0
    escalated: bool = False


@dataclass
class RouteState:
    route: RoutePlan
    pins: OrderedDict[str, Pin] = field(default_factory=OrderedDict)

    def get(self, key: str) -> Pin | None:
        pin = self.pins.get(key)
        if pin is not None:
            self.pins.move_to_end(key)
        return pin

    def put(self, key: str, pin: Pin) -> None:
        if self.route.sticky <= 0:
            return
        self.pins[key] = pin
        self.pins.move_to_end(key)
        while len(self.pins) > self.route.sticky:
            self.pins.popitem(last=False)


def asked_tier(route: RoutePlan, value: str) -> int | None:
    """An x-route-tier header: a tier number (0 = first), a server or model name, or a level."""
    value = value.strip().lower()
    if value.isdigit():
        return min(int(value), len(route.tiers) - 1)
    for i, t in enumerate(route.tiers):
        if value in (t.server, t.served_name):
            return i
    if value in LEVELS:
        return tier_of(route, value)
    return None


def route_header(route: RoutePlan, tier: int, decision: Decision, how: str, verdict: str = "") -> str:
    top = ",".join(f"{k}:{v:+.2f}" for k, v in decision.top())
    return (f"{route.name} tier={tier} server={route.tiers[tier].server} level={decision.level} "
            f"score={decision.score:.2f} by={how}" + (f" judge={verdict}" if verdict else "") +
            (f" signals={top}" if top else ""))


def decide(route: RoutePlan, body: dict[str, Any]) -> dict[str, Any]:
    """What `POST /v1/route` answers: the decision for a body, without pins and without a model."""
    d = score(body, route.thresholds)
    tier = tier_of(route, d.level)
    return {"route": route.name, "server": route.tiers[tier].server, "model": route.tiers[tier].served_name,
            "tier": tier, "level": d.level, "score": d.score, "signals": {k: v for k, v in d.signals.items() if v},
            "top": [k for k, _ in d.top()]}


def near(route: RoutePlan, total: float) -> int | None:
    """The boundary (between tier i and i + 1) the score is within the judge's margin of, if any."""
    best = None
    for i, t in enumerate(route.tiers[:-1]):
        assert t.up_to is not None
        gap = abs(total - route.thresholds[t.up_to])
        if gap <= route.judge_margin and (best is None or gap < best[0]):
            best = (gap, i)
    return best[1] if best else None


JUDGE_PROMPT = ("You sort requests between a small fast model and a large smart one. Reply with one letter: A if a "
                "small model can answer it well (chit-chat, a fact, a rewrite, a short summary), B if it needs the "
                "large model (code, math, multi-step reasoning, planning, long analysis).")


class Judge:
    """A gateway handler for calls the Router left undecided near a tier boundary: one token from the
    judge server (through the scheduler, bounded by judge_timeout_ms), then the plain relay."""

    def __init__(self, router: Router, gateway: Any, outcomes: Any = None) -> None:
        self.router, self.gateway, self.outcomes = router, gateway, outcomes

    def claims(self, call: Any) -> bool:
        note = call.notes.get("route")
        return bool(note and note.get("judge"))

    async def verdict(self, call: Any, route: RoutePlan) -> str:
        users, _ = user_texts(call.body)
        judge = {t.server: t.served_name for t in route.tiers}.get(route.judge_server or "", route.judge_server)
        body = {"model": judge, "messages": [{"role": "system", "content": JUDGE_PROMPT},
                                             {"role": "user", "content": users[-1][:2000]}],
                "max_tokens": 1, "temperature": 0}
        # Bounded without waiting for the cancellation to land: a request still queued for a slot, or already
        # sent, finishes (and gives its slot back) on its own while the call goes on.
        task = asyncio.ensure_future(self.gateway.complete(call, body, route.judge_server))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        done, _ = await asyncio.wait({task}, timeout=route.judge_timeout_ms / 1000)
        if not done:
            task.cancel()
            return "timeout"
        try:
            status, answer = task.result()
        except (Rejected, httpx.HTTPError):
            return "failed"
        try:
            text = str(answer["choices"][0]["message"]["content"]).strip().upper() if status == 200 else ""
        except (KeyError, IndexError, TypeError):
            text = ""
        return "simple" if text.startswith("A") else "hard" if text.startswith("B") else "unclear"

    async def handle(self, call: Any, request: Any) -> Any:
        note = call.notes["route"]
        route = self.router.routes[note["route"]].route
        verdict = await self.verdict(call, route)
        if self.outcomes is not None:
            self.outcomes.labels(route.name, verdict).inc()
        boundary = near(route, note["score"])
        tier, how = note["tier"], "score"
        if boundary is not None and verdict in ("simple", "hard"):
            tier, how = (boundary if verdict == "simple" else boundary + 1), "judge"
        self.router.commit(call, tier, how, verdict)
        call.headers["x-orchestrator-server"] = call.name
        gw = self.gateway
        try:
            waiter = gw.sched.enqueue(call.name)
        except Rejected as exc:
            return gw.rejected(exc, call)
        return await (gw.stream(request, call, waiter) if call.stream else gw.unary(request, call, waiter))


CONTEXT_ERROR = re.compile(r"exceed|context", re.IGNORECASE)


class Router:
    """The gateway hook of `gateway.routes` (see the module's docstring)."""

    def __init__(self, routes: list[RoutePlan], counter: Any = None, escalations: Any = None) -> None:
        self.routes = {r.name: RouteState(r) for r in routes}
        self.counter, self.escalations = counter, escalations

    def prepare(self, call: Any) -> None:
        state = self.routes.get(call.model)
        if state is None:
            return None
        route = state.route
        d = score(call.body, route.thresholds)
        tier, how = tier_of(route, d.level), "score"
        key = conversation_key(call.client, call.body)
        pin = state.get(key)
        if pin is not None and pin.tier > tier:
            tier, how = pin.tier, ("escalated" if pin.escalated else "sticky")
        asked = call.request_headers.get("x-route-tier", "").strip().lower()
        if asked == "up":
            tier, how = min(tier + 1, len(route.tiers) - 1), "header"
        elif asked and (want := asked_tier(route, asked)) is not None:
            tier, how = want, "header"
        call.name = route.tiers[tier].server
        call.notes["route"] = {"route": route.name, "key": key, "tier": tier, "level": d.level, "score": d.score,
                               "by": how, "decision": d}
        if how == "score" and pin is None and route.judge_server and near(route, d.score) is not None:
            call.notes["route"]["judge"] = True     # Judge (a handler) decides, then commits
            return None
        self.commit(call, tier, how)
        return None

    def commit(self, call: Any, tier: int, how: str, verdict: str = "") -> None:
        """The decision made: the conversation's pin, the server, the header, the counter."""
        note = call.notes["route"]
        state = self.routes[note["route"]]
        route = state.route
        pin = state.get(note["key"])
        if pin is None or pin.tier != tier:
            pin = Pin(tier, pin.failures if pin else 0, how in ("header", "escalated"))
        state.put(note["key"], pin)
        note.update(tier=tier, by=how)
        call.name = route.tiers[tier].server
        call.headers["x-orchestrator-route"] = route_header(route, tier, note["decision"], how, verdict)
        if self.counter is not None:
            self.counter.labels(route.name, str(tier), call.name, how).inc()

    def finished(self, call: Any, status: int, answer: dict[str, Any] | None) -> None:
        note = call.notes.get("route")
        if not note:
            return
        state = self.routes[note["route"]]
        pin = state.get(note["key"]) or Pin(note["tier"])
        cause = ""
        if status >= 500:
            cause = "error"
        elif status == 400 and answer and CONTEXT_ERROR.search(str(answer.get("error", ""))[:500]):
            cause = "context"
        elif call.notes.get("tool_calls") == "failed":
            pin.failures += 1
            if pin.failures >= state.route.escalate_after:
                cause = "tool_calls"
        if cause and pin.tier < len(state.route.tiers) - 1:
            pin = Pin(pin.tier + 1, 0, True)
            if self.escalations is not None:
                self.escalations.labels(state.route.name, cause).inc()
        state.put(note["key"], pin)
