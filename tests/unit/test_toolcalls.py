"""The gateway's tool-call checks (orchestrator/gateway/toolcalls.py): real answers collected from the
models here and hand-written broken answers in the formats models write calls in, each rescued,
repaired or rejected; JSON Schema cases; the retry and constrained-retry bodies; the stream events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from orchestrator.gateway import toolcalls as tc
from orchestrator.gateway.tool_eval import correct, load_tasks

FIXTURES = Path(__file__).parent.parent / "fixtures" / "toolcalls"

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                                                                           "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "web_search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"],
    "additionalProperties": False}}}


def body(choice: Any = "required", tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "weather in Lisbon?"}],
            "tools": tools or [WEATHER, SEARCH], "tool_choice": choice}


def answer(content: str | None = None, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls is not None:
        msg["tool_calls"] = calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}


def call(name: str, args: Any) -> dict[str, Any]:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": args if isinstance(args, str)
                                                         else json.dumps(args)}}


def pairs(ans: dict[str, Any]) -> list[list[Any]]:
    msg = tc.message_of(ans) or {}
    return [[c["function"]["name"], json.loads(c["function"]["arguments"])] for c in msg["tool_calls"]]


HAND = json.loads((FIXTURES / "handwritten.json").read_text())["cases"]


@pytest.mark.parametrize("case", HAND, ids=[c["id"] for c in HAND])
def test_handwritten_broken_answers_are_rescued_or_rejected(case: dict[str, Any]) -> None:
    b = body()
    a = answer(case["content"])
    verdict = tc.check(b, tc.message_of(a) or {})
    assert not verdict.ok
    rescued = tc.rescue(b, a)
    if case["expect"] == "rescued":
        assert rescued is not None, case["id"]
        assert pairs(rescued) == case["calls"]
        assert rescued["choices"][0]["finish_reason"] == "tool_calls"
        assert rescued["choices"][0]["message"]["content"] is None
        assert tc.check(b, tc.message_of(rescued) or {}).ok
    else:
        assert rescued is None
        assert verdict.kind == case["kind"]


COLLECTED = json.loads((FIXTURES / "collected.json").read_text())


@pytest.mark.parametrize("case", COLLECTED, ids=[f"{c['request']['model']}-{c['task']}" for c in COLLECTED])
def test_answers_collected_from_the_models_here(case: dict[str, Any]) -> None:
    """SmolLM2-135M-Instruct and the Gemma 3 270M base model answered these tool tasks in prose (or
    echoed the prompt): nothing to rescue, and the check says so."""
    a = answer(case["message"]["content"], case["message"].get("tool_calls"))
    verdict = tc.check(case["request"], tc.message_of(a) or {})
    assert (verdict.kind or "valid") == case["verdict"]
    if not verdict.ok:
        assert tc.rescue(case["request"], a) is None and tc.repair(case["request"], a) is None


def test_valid_call_and_tool_choice_rules() -> None:
    good = answer(None, [call("get_weather", {"city": "Lisbon"})])
    assert tc.check(body(), tc.message_of(good) or {}).ok
    assert tc.check(body("auto"), tc.message_of(answer("It is sunny.")) or {}).ok     # auto: text is fine
    assert tc.check(body("required"), tc.message_of(answer("It is sunny.")) or {}).kind == tc.NO_CALL
    assert tc.check(body("none"), tc.message_of(good) or {}).kind == tc.UNWANTED
    named = body({"type": "function", "function": {"name": "web_search"}})
    assert tc.check(named, tc.message_of(good) or {}).kind == tc.UNWANTED
    v = tc.check(body("auto"), tc.message_of(answer('<tool_call>{"name": "get_weather"}')) or {})
    assert v.kind == tc.TEXT_CALL                       # auto, but a call attempt written as text


@pytest.mark.parametrize(("args", "kind", "says"), [
    ({"city": 3}, tc.SCHEMA, "city: 3 is not of type 'string'"),
    ({"city": "Lisbon", "unit": "kelvin"}, tc.SCHEMA, "unit: 'kelvin' is not one of"),
    ({"unit": "celsius"}, tc.SCHEMA, "'city' is a required property"),
    ({"city": "Lisbon", "country": "PT"}, tc.SCHEMA, "Additional properties are not allowed ('country'"),
    ('{"city": "Lisbon"', tc.BAD_JSON, "arguments are not valid JSON"),
    ('["Lisbon"]', tc.BAD_JSON, "must be a JSON object, not list"),
])
def test_schema_cases(args: Any, kind: str, says: str) -> None:
    v = tc.check(body(), tc.message_of(answer(None, [call("get_weather", args)])) or {})
    assert not v.ok and v.kind == kind
    assert any(says in e for e in v.errors), v.errors


def test_unknown_tool_names_the_tools() -> None:
    v = tc.check(body(), tc.message_of(answer(None, [call("get_forecast", {"city": "x"})])) or {})
    assert v.kind == tc.UNKNOWN_TOOL and "get_weather, web_search" in v.errors[0]


NESTED = {"type": "function", "function": {"name": "create_event", "parameters": {
    "type": "object", "required": ["title", "start"], "additionalProperties": False, "properties": {
        "title": {"type": "string"},
        "start": {"type": "object", "required": ["date"], "properties": {
            "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}}},
        "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}}}


@pytest.mark.parametrize(("args", "ok", "says"), [
    ({"title": "x", "start": {"date": "2026-12-07"}, "attendees": ["a@b"]}, True, ""),
    ({"title": "x", "start": {"date": "7 Dec"}}, False, "start/date: '7 Dec' does not match"),
    ({"title": "x", "start": {}}, False, "start: 'date' is a required property"),
    ({"title": "x", "start": {"date": "2026-12-07"}, "attendees": [1]}, False, "attendees/0: 1 is not of type"),
    ({"title": "x", "start": {"date": "2026-12-07"}, "attendees": []}, False, "attendees: [] should be non-empty"),
])
def test_nested_objects_and_arrays(args: dict[str, Any], ok: bool, says: str) -> None:
    v = tc.check(body("required", [NESTED]), tc.message_of(answer(None, [call("create_event", args)])) or {})
    assert v.ok is ok
    if not ok:
        assert any(says in e for e in v.errors), v.errors


def test_repair_is_accepted_only_when_the_result_validates() -> None:
    broken = answer(None, [call("get_weather", "{'city': 'Lisbon',}")])
    fixed = tc.repair(body(), broken)
    assert fixed is not None and pairs(fixed) == [["get_weather", {"city": "Lisbon"}]]
    still_wrong = answer(None, [call("get_weather", "{'city': 'Lisbon', 'unit': 'kelvin'")])
    assert tc.repair(body(), still_wrong) is None        # repaired JSON, but not valid for the schema
    assert tc.repair(body(), answer(None, [call("get_weather", {"city": "x"})])) is None   # nothing to repair


def test_retry_body_carries_the_errors() -> None:
    b = body()
    v = tc.check(b, tc.message_of(answer("It is sunny.")) or {})
    retry = tc.retry_body(b, answer("It is sunny."), v.errors)
    assert retry["tools"] == b["tools"] and retry["messages"][:1] == b["messages"]
    assert retry["messages"][1] == {"role": "assistant", "content": "It is sunny."}
    assert "a tool call is required" in retry["messages"][2]["content"]


def test_call_schema_admits_only_valid_calls_to_the_tools() -> None:
    schema = tc.call_schema(body())
    v = Draft202012Validator(schema)
    assert v.is_valid({"name": "get_weather", "arguments": {"city": "Lisbon"}})
    assert v.is_valid({"name": "web_search", "arguments": {"query": "q"}})
    assert not v.is_valid({"name": "get_weather", "arguments": {"query": "q"}})
    assert not v.is_valid({"name": "other", "arguments": {}})
    assert not v.is_valid({"name": "get_weather", "arguments": {"city": "x", "unit": "kelvin"}})
    named = tc.call_schema(body({"type": "function", "function": {"name": "web_search"}}))
    assert named["properties"]["name"] == {"const": "web_search"}


def test_constrained_body_per_engine() -> None:
    b = body()
    llama = tc.constrained_body(b, "llama.cpp", ["x"])
    assert llama is not None and "tools" not in llama and "tool_choice" not in llama
    assert llama["json_schema"] == tc.call_schema(b) and llama["messages"][0]["role"] == "system"
    vllm = tc.constrained_body(b, "vllm", [])
    assert vllm is not None and vllm["response_format"]["json_schema"]["schema"] == tc.call_schema(b)
    assert tc.constrained_body(b, "someengine", []) is None
    got = tc.from_constrained(b, answer('{"name": "get_weather", "arguments": {"city": "Lisbon"}}'))
    assert got is not None and pairs(got) == [["get_weather", {"city": "Lisbon"}]]
    assert tc.from_constrained(b, answer('{"name": "get_weather", "arguments": {}}')) is None


def test_chunks_are_openai_stream_events() -> None:
    ans = tc.with_calls(answer(), [call("get_weather", {"city": "Lisbon"})])
    events = tc.chunks(ans)
    assert events[-1] == b"data: [DONE]\n\n"
    data = [json.loads(e[6:]) for e in events[:-1]]
    assert all(d["object"] == "chat.completion.chunk" for d in data)
    assert data[0]["choices"][0]["delta"]["role"] == "assistant"
    delta = data[1]["choices"][0]["delta"]["tool_calls"][0]
    assert delta["index"] == 0 and delta["function"]["name"] == "get_weather"
    assert data[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_suite_has_forty_tasks_over_valid_schemas() -> None:
    data = load_tasks()
    tasks = data["tasks"]
    assert len(tasks) >= 40
    for t in data["tools"].values():
        Draft202012Validator.check_schema(t["function"]["parameters"])
    assert any(not t["expect"] for t in tasks) and any(len(t["expect"]) == 2 for t in tasks)
    for t in tasks:
        assert set(t["tools"]) <= set(data["tools"]) and all(e["name"] in t["tools"] for e in t["expect"])


def test_task_correct_matches_names_and_arguments() -> None:
    task = next(t for t in load_tasks()["tasks"] if t["id"] == "flight-family")
    args = {"origin": "London", "destination": "New York", "date": "2027-01-05",
            "passengers": {"adults": 2, "children": 1}, "cabin": "business"}
    assert correct(task, {"tool_calls": [call("book_flight", args)]})
    assert not correct(task, {"tool_calls": [call("book_flight", {**args, "cabin": "economy"})]})
    assert not correct(task, {"content": "booked"})
