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
    base = seen(chat(("system", "S"), ("user", "first")), list(range(30)), conv="c1")
    mem.remember(base)
    rewritten = seen(chat(("system", "S"), ("user", "first, edited")), list(range(10)) + [99] * 25, conv="c2")
    ref, how = mem.reference(rewritten)
    assert ref is base and how == "client"
    stranger = seen(chat(("user", "other")), [7] * 30, conv="c3", client="someone-else")
    assert mem.reference(stranger) == (None, "none")


def test_conversation_key_follows_the_first_user_turn() -> None:
    a = shape_of(CHAT, chat(("system", "t=1"), ("user", "hi")))
    b = shape_of(CHAT, chat(("system", "t=2"), ("user", "hi"), ("assistant", "x"), ("user", "y")))
    c = shape_of(CHAT, chat(("user", "other")))
    assert a and b and c
    assert conversation_key("cl", "m", a) == conversation_key("cl", "m", b) != conversation_key("cl", "m", c)
    assert conversation_key("cl", "m", a) != conversation_key("cl2", "m", a)
