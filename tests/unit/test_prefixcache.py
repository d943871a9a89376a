"""The prefix-cache doctor's pure half: locating what changed between two prompts of a conversation,
the engine's counts, the verdict, the bounded memory. The real engine's side is in
tests/e2e/test_prefixcache.py."""

from __future__ import annotations

import json
from array import array

import pytest

from orchestrator.gateway.prefixcache import Memory, Seen, ServerInfo, conversation_key, judge
from orchestrator.gateway.prefixdiff import (
    Counts,
    common_prefix,
    common_tokens,
    normalize_tools,
    shape_causes,
    shape_of,
)

CHAT = "/v1/chat/completions"


def tool(name: str, **props: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                             "parameters": {"type": "object",
                                                            "properties": {k: {"type": v} for k, v in props.items()}}}}


def chat(*messages: tuple[str, str], tools: list | None = None) -> dict:
    body: dict = {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}
    if tools is not None:
        body["tools"] = tools
    return body


def causes(now: dict, before: dict, endpoint: str = CHAT) -> list:
    a, b = shape_of(endpoint, now), shape_of(endpoint, before)
    assert a is not None and b is not None
    return shape_causes(a, b)


def test_common_prefix_strings_and_tokens() -> None:
    assert common_prefix("abcdef", "abcxef") == 3
    assert common_prefix("abc", "abcdef") == 3
    assert common_prefix("", "x") == 0
    assert common_prefix("x" * 10000 + "a", "x" * 10000 + "b") == 10000
    a, b = array("i", [1, 2, 3, 4, 5]).tobytes(), array("i", [1, 2, 3, 9, 5]).tobytes()
    assert common_tokens(a, b) == 3
    # ids that share low bytes must not count as one more common token
    assert common_tokens(array("i", [1, 256]).tobytes(), array("i", [1, 512]).tobytes()) == 1


def test_appending_is_no_cause() -> None:
    before = chat(("system", "You are terse."), ("user", "hi"))
    now = chat(("system", "You are terse."), ("user", "hi"), ("assistant", "hello"), ("user", "more"))
    assert causes(now, before) == []


def test_timestamp_in_system_prompt_is_located() -> None:
    sys_a = "You are a helpful assistant for ACME. Today is 2026-12-03 07:54. Answer briefly."
    sys_b = sys_a.replace("07:54", "07:55")
    [c] = causes(chat(("system", sys_b), ("user", "hi")), chat(("system", sys_a), ("user", "hi")))
    assert c.kind == "system_changed" and c.where == "system prompt"
    assert c.char == sys_a.index("07:54") + 4
    assert c.looks_like == "a timestamp"
    assert "'2026-12-03 07:55' vs '2026-12-03 07:54'" in c.detail
    assert c.detail.startswith(f"system prompt differs at char {c.char}")


@pytest.mark.parametrize("old,new,kind", [
    ("request 550e8400-e29b-41d4-a716-446655440000 here", "request 650e8400-e29b-41d4-a716-446655440000 here",
     "a uuid"),
    ("turn 41 of the session", "turn 42 of the session", "a counter"),
    ("sent at 1764748800 by", "sent at 1764748861 by", "a timestamp"),
    ("Today is Thursday, December 3, be nice", "Today is Friday, December 4, be nice", "a date"),
])
def test_what_a_change_looks_like(old: str, new: str, kind: str) -> None:
    [c] = causes(chat(("system", new), ("user", "q")), chat(("system", old), ("user", "q")))
    assert c.looks_like == kind, c.detail


def test_tools_reordered_changed_and_key_order() -> None:
    a, b, c = tool("search", q="string"), tool("read", path="string"), tool("write", path="string")
    msgs = (("user", "go"),)
    [r] = causes(chat(*msgs, tools=[b, a, c]), chat(*msgs, tools=[a, b, c]))
    assert r.kind == "tools_reordered" and "['read', 'search', 'write'] now" in r.detail
    [r] = causes(chat(*msgs, tools=[a, b]), chat(*msgs, tools=[a, b, c]))
    assert r.kind == "tools_changed" and "removed ['write']" in r.detail
    changed = tool("search", q="string", limit="integer")
    [r] = causes(chat(*msgs, tools=[changed, b]), chat(*msgs, tools=[a, b]))
    assert r.kind == "tools_changed" and "tool 'search''s definition differs" in r.detail
    shuffled = json.loads(json.dumps({"function": a["function"], "type": "function"}))
    [r] = causes(chat(*msgs, tools=[shuffled, b]), chat(*msgs, tools=[a, b]))
    assert r.kind == "tool_key_order"


def test_history_edited_removed_inserted() -> None:
    base = [("system", "S"), ("user", "u1"), ("assistant", "the answer is 12"), ("user", "u2")]
    edited = list(base)
    edited[2] = ("assistant", "the answer is 13")
    [c] = causes(chat(*edited, ("assistant", "x"), ("user", "u3")), chat(*base))
    assert c.kind == "history_edited" and c.where == "message 2 (assistant)" and c.looks_like == "a counter"
    removed = base[:2] + base[3:]
    [c] = causes(chat(*removed, ("assistant", "y")), chat(*base))
    assert c.kind == "history_removed" and c.where == "message 2 (assistant)"
    inserted = base[:2] + [("user", "extra")] + base[2:]
    [c] = causes(chat(*inserted), chat(*base))
    assert c.kind == "history_inserted" and c.where == "message 2 (user)"


def test_completion_prompts_and_client_templates() -> None:
    ep = "/v1/completions"
    assert causes({"prompt": "abc def ghi"}, {"prompt": "abc def"}, ep) == []
    [c] = causes({"prompt": "Log 12: x"}, {"prompt": "Log 11: x"}, ep)
    assert c.kind == "prompt_changed" and c.char == 5
    [c] = causes({"prompt": "<|im_start|>user\nhi<|im_end|>"}, {"prompt": "<start_of_turn>user\nhi<end_of_turn>"}, ep)
    assert c.kind == "template_changed"
    assert shape_of("/v1/embeddings", {"input": "x"}) is None
    assert shape_of(ep, {"prompt": [1, 2, 3]}) is None


def test_normalize_tools_sorts_names_and_keys() -> None:
    a, b = tool("b_tool", x="string"), tool("a_tool", y="string")
    body = {"tools": [a, json.loads(json.dumps({"function": b["function"], "type": "function"}))]}
    assert normalize_tools(body)
    assert [t["function"]["name"] for t in body["tools"]] == ["a_tool", "b_tool"]
    assert list(body["tools"][0]) == ["function", "type"]
    assert not normalize_tools(body)            # already normal: untouched
    assert not normalize_tools({"messages": []})


def test_counts_from_each_engine() -> None:
    llama = Counts.of({"timings": {"cache_n": 90, "prompt_n": 10, "prompt_per_second": 500.0, "predicted_n": 7}})
    assert (llama.prompt, llama.cached, llama.generated, llama.prompt_per_second) == (100, 90, 7, 500.0)
    ik = Counts.of({"usage": {"prompt_tokens": 100, "completion_tokens": 5}, "timings": {"prompt_n": 30}})
    assert (ik.prompt, ik.cached) == (100, 70)
    vllm = Counts.of({"usage": {"prompt_tokens": 64, "prompt_tokens_details": {"cached_tokens": 48}}})
    assert (vllm.prompt, vllm.cached) == (64, 48)
    assert Counts.of(None).prompt is None and Counts.of({"usage": None}).cached is None


INFO = ServerInfo("llama.cpp", slots=1, context=4096, cache_off=None, swa_without_full=False)


def seen(body: dict, tokens: list[int], conv: str = "c1", server: str = "s", prompt: int | None = None,
         seq: int = 1, client: str = "cl") -> Seen:
    shape = shape_of(CHAT, body)
    assert shape is not None
    return Seen(conv, client, "m", server, shape, "".join(chr(65 + t % 50) for t in tokens),
                array("i", tokens).tobytes(), prompt or len(tokens), 10, seq)


def test_judge_appended_timestamp_and_engine_causes() -> None:
    before_body = chat(("system", "S at 07:54"), ("user", "hi"))
    before = seen(before_body, list(range(50)))
    now = seen(chat(("system", "S at 07:54"), ("user", "hi"), ("assistant", "a"), ("user", "b")), list(range(80)),
               seq=2)
    v = judge(now, before, "conversation", Counts(80, 50, 5, 1000.0), INFO, True, 0)
    assert v.ok and v.reusable == 50 and v.exact and v.lost == 0
    # the engine reused nothing of what was shared: on a single slot another conversation came between
    v = judge(now, before, "conversation", Counts(80, 0, 5, 1000.0), INFO, True, 1)
    assert [c.kind for c in v.causes] == ["slot_evicted"] and v.lost == 50
    assert v.causes[0].seconds == pytest.approx(0.05)
    for info, cache_prompt, kind in [(INFO, False, "cache_prompt_off"),
                                     (ServerInfo("llama.cpp", 1, 4096, "--no-cache-prompt", False), True,
                                      "prefix_cache_off"),
                                     (ServerInfo("llama.cpp", 1, 4096, None, True), True, "swa"),
                                     (ServerInfo("llama.cpp", 1, 55, None, False), True, "context_shift"),
                                     (INFO, True, "engine_unknown")]:
        v = judge(now, before, "conversation", Counts(80, 0), info, cache_prompt, 0)
        assert [c.kind for c in v.causes] == [kind]
    # the system prompt's clock moved: the prefix breaks at the token where it differs
    tokens = list(range(50))
    tokens[5] = 999
    moved = seen(chat(("system", "S at 07:55"), ("user", "hi")), tokens + list(range(50, 60)), seq=2)
    v = judge(moved, before, "conversation", Counts(60, 5, 3, 1000.0), INFO, True, 0)
    assert [c.kind for c in v.causes] == ["system_changed"] and v.reusable == 5 and v.broken == 45
    assert v.causes[0].tokens == 45 and v.causes[0].looks_like == "a timestamp"


def test_judge_without_a_reference_or_tokens() -> None:
    first = seen(chat(("user", "hi")), list(range(10)))
    v = judge(first, None, "none", Counts(10, 0), INFO, True, 0)
    assert v.ok and v.reference == "none"
    a = seen(chat(("user", "hi")), list(range(10)))
    b = seen(chat(("user", "hi"), ("assistant", "x"), ("user", "y")), list(range(20)))
    a.tokens = b.tokens = None
    v = judge(b, a, "conversation", Counts(20, 10), INFO, True, 0)
    assert not v.exact and v.reusable == 10 and v.ok


def test_memory_is_bounded_lru_and_finds_rewritten_first_turns() -> None:
    mem = Memory(max_conversations=3, max_bytes=10**9)
    for i in range(5):
        mem.remember(seen(chat(("user", f"q{i}")), [i] * 10, conv=f"c{i}"))
    assert list(mem.by_conversation) == ["c2", "c3", "c4"]
    small = Memory(max_conversations=100, max_bytes=5000)
    for i in range(50):
        small.remember(seen(chat(("user", "x" * 100)), list(range(100)), conv=f"c{i}"))
    assert small.bytes <= 5000 and 0 < len(small.by_conversation) < 50
    mem = Memory()
    base = seen(chat(("system", "S"), ("user", "first"), ("assistant", "a"), ("user", "second")), list(range(30)),
                conv="c1")
    mem.remember(base)
    rewritten = seen(chat(("system", "S"), ("user", "first, edited"), ("assistant", "a"), ("user", "second"),
                          ("assistant", "b"), ("user", "third")), list(range(10)) + [99] * 25, conv="c2")
    ref, how = mem.reference(rewritten)
    assert ref is base and how == "client"
    # a new conversation with the same system prompt: its shared prefix is reusable, nothing broke
    fresh = seen(chat(("system", "S"), ("user", "another task")), list(range(10)) + [98] * 5, conv="c4")
    ref, how = mem.reference(fresh)
    assert ref is base and how == "shared"
    v = judge(fresh, ref, how, Counts(15, 10), INFO, True, 0)
    assert v.ok and v.reusable == 10
    stranger = seen(chat(("user", "other")), [7] * 30, conv="c3", client="someone-else")
    assert mem.reference(stranger) == (None, "none")


def test_conversation_key_follows_the_first_user_turn() -> None:
    a = shape_of(CHAT, chat(("system", "t=1"), ("user", "hi")))
    b = shape_of(CHAT, chat(("system", "t=2"), ("user", "hi"), ("assistant", "x"), ("user", "y")))
    c = shape_of(CHAT, chat(("user", "other")))
    assert a and b and c
    assert conversation_key("cl", "m", a) == conversation_key("cl", "m", b) != conversation_key("cl", "m", c)
    assert conversation_key("cl", "m", a) != conversation_key("cl2", "m", a)


# ---------------------------------------------------------------------------------------- the hook and the report


class FakeCall:
    """The fields of gateway.app.Call the hook reads (the relay itself is exercised in the e2e tests)."""

    def __init__(self, body: dict, client: str = "cl", name: str = "a", model: str = "gemma-a") -> None:
        self.endpoint, self.body, self.model, self.name, self.client = CHAT, body, model, name, client
        self.notes: dict = {}
        self.raw = json.dumps(body).encode()

    def set_body(self, body: dict) -> None:
        self.body, self.raw = body, json.dumps(body).encode()


def gateway_plan(extra: str = ""):
    from orchestrator.pipeline import build_plan
    from orchestrator.profile import load_text
    from tests.unit.test_gateway_profile import ENV, two_servers

    return build_plan(load_text(two_servers(f"gateway:\n  port: 9100\n{extra}"), "gw.yaml"), detect=False,
                      environ=ENV)


def test_hook_records_metrics_and_rotation(tmp_path, monkeypatch) -> None:
    import asyncio
    import io

    import httpx

    from orchestrator.gateway import prefixcache
    from orchestrator.gateway.cachereport import read_records, render, summarize
    from orchestrator.gateway.metrics import Metrics
    from tests.e2e.gateway_util import metric

    plan = gateway_plan()
    log = io.StringIO()
    metrics = Metrics(log)

    async def run() -> list:
        async with httpx.AsyncClient() as client:
            # No engine listens there: the hook falls back to the request's messages, estimated by characters.
            hook = prefixcache.PrefixCacheHook(plan, lambda name: ("http://127.0.0.1:9", {}), client, metrics,
                                               tmp_path)
            system = "You are terse. It is 2026-12-03 07:54 now."
            turns = [chat(("system", system), ("user", "hi")),
                     chat(("system", system), ("user", "hi"), ("assistant", "hello"), ("user", "again")),
                     chat(("system", system.replace("07:54", "07:55")), ("user", "hi"), ("assistant", "hello"),
                          ("user", "again"), ("assistant", "ok"), ("user", "more"))]
            answers = [{"timings": {"cache_n": 0, "prompt_n": 20, "prompt_per_second": 200.0, "predicted_n": 3}},
                       {"timings": {"cache_n": 19, "prompt_n": 11, "prompt_per_second": 200.0, "predicted_n": 3}},
                       {"timings": {"cache_n": 8, "prompt_n": 32, "prompt_per_second": 200.0, "predicted_n": 3}}]
            for body, answer in zip(turns, answers, strict=True):
                hook.finished(FakeCall(body), 200, answer)
            hook.finished(FakeCall(turns[0]), 500, None)                      # failures are not judged
            await hook.drain()
            await hook.close()
            return list(read_records(tmp_path, plan.name))

    recs = asyncio.run(run())
    assert [r["causes"] and r["causes"][0]["kind"] for r in recs] == [[], [], "system_changed"]
    assert recs[1]["reusable"] >= 19 and recs[1]["cached"] == 19 and not recs[1]["exact"]
    third = recs[2]["causes"][0]
    assert third["looks_like"] == "a timestamp" and third["tokens"] > 0 and third["seconds"] == pytest.approx(
        third["tokens"] / 200.0, abs=1e-3)
    text = metrics.text().decode()
    assert metric(text, "gateway_prefix_reused_tokens_total", model="gemma-a", client="cl") == 27
    assert metric(text, "gateway_prefix_lost_tokens_total", cause="system_changed") == third["tokens"]
    assert "system prompt differs at char" in log.getvalue()
    raw = (tmp_path / "prefix-cache" / f"{plan.name}.jsonl")
    assert "You are terse" not in raw.read_text()                # no prompt text beyond the located snippet
    assert raw.stat().st_mode & 0o777 == 0o600
    summary = summarize(recs, plan.name)
    assert summary["requests"] == 3 and summary["causes"][0]["kind"] == "system_changed"
    lines = render(summary)
    assert "system_changed: 1×" in lines[1] and any("looks like a timestamp" in line for line in lines)
    # rotation keeps the newest records under the cap
    monkeypatch.setattr(prefixcache, "MAX_RECORD_BYTES", raw.stat().st_size + 10)

    async def more() -> None:
        async with httpx.AsyncClient() as client:
            hook = prefixcache.PrefixCacheHook(plan, lambda name: ("http://127.0.0.1:9", {}), client, None, tmp_path)
            hook.finished(FakeCall(chat(("user", "x"))), 200, {"timings": {"cache_n": 0, "prompt_n": 3}})
            await hook.drain()
            await hook.close()

    asyncio.run(more())
    assert raw.with_name(raw.name + ".1").exists() and len(list(read_records(tmp_path, plan.name))) == 4


def test_hook_normalizes_tools_only_when_asked() -> None:
    from orchestrator.gateway.prefixcache import PrefixCacheHook

    plan = gateway_plan("  prefix_cache: {normalize_tools: true}\n")
    assert plan.gateway is not None and plan.gateway.normalize_tools
    body = chat(("user", "go"), tools=[tool("b"), tool("a")])
    call = FakeCall(body)
    PrefixCacheHook(plan, None, None, None, None, normalize=True).prepare(call)   # type: ignore[arg-type]
    assert [t["function"]["name"] for t in json.loads(call.raw)["tools"]] == ["a", "b"]
    call = FakeCall(chat(("user", "go"), tools=[tool("b"), tool("a")]))
    PrefixCacheHook(plan, None, None, None, None).prepare(call)                  # type: ignore[arg-type]
    assert [t["function"]["name"] for t in json.loads(call.raw)["tools"]] == ["b", "a"]
    assert gateway_plan().gateway.normalize_tools is False                       # type: ignore[union-attr]


def test_since_and_report_cli(tmp_path) -> None:
    from orchestrator.errors import OrchestratorError
    from orchestrator.gateway.cachereport import parse_since

    assert parse_since("1h", now=10_000.0) == 6_400.0
    assert parse_since("30m", now=10_000.0) == 8_200.0
    assert parse_since(None) is None
    assert parse_since("2026-12-03T07:00+00:00") == 1796281200.0
    with pytest.raises(OrchestratorError, match="--since 'yesterday' is neither"):
        parse_since("yesterday")
    import os
    import subprocess
    import sys

    folder = tmp_path / "prefix-cache"
    folder.mkdir()
    rec = {"t": 1.0, "model": "m", "client": "cl", "conversation": "c-1", "prompt": 100, "cached": 10, "reusable": 90,
           "causes": [{"kind": "tools_reordered", "detail": "tools reordered: ['a', 'b'] now", "tokens": 80,
                       "seconds": 0.4}]}
    (folder / "dep.jsonl").write_text(json.dumps(rec) + "\nnot json\n")
    env = {**os.environ, "ORCHESTRATOR_STATE_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "orchestrator", "cache-report", "--json"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["deployment"] == "dep" and data["lost_tokens"] == 80 and data["reuse"] == 0.1
    assert data["conversations"][0]["causes"][0]["kind"] == "tools_reordered"
    r = subprocess.run([sys.executable, "-m", "orchestrator", "cache-report", "dep", "--since", "1h"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "no chat or completion requests recorded in that time" in r.stdout


def test_a_break_costs_less_when_the_engine_found_the_prefix_elsewhere() -> None:
    before = seen(chat(("system", "S at 07:54"), ("user", "hi")), list(range(50)))
    tokens = list(range(50))
    tokens[5] = 999
    moved = seen(chat(("system", "S at 07:55"), ("user", "hi")), tokens + list(range(50, 60)), seq=2)
    # its host-memory prompt cache held 30 tokens of another conversation with the same clock
    v = judge(moved, before, "conversation", Counts(60, 30), INFO, True, 0)
    assert v.reusable == 30 and v.broken == 45 - 25 and v.causes[0].tokens == 20
