"""Tool calls through the gateway in front of real llama-server (llama.cpp b11434) on SmolLM2-135M-Instruct
and the Gemma 3 270M base model, with the official openai client. Neither model writes a proper tool call
on its own (tests/fixtures/toolcalls/collected.json), so every answer here goes through the gateway's
retries, its constrained retry or its escalation: what comes back as a call always passes the check,
streamed or not; what fails is a 502 naming why; headers and /metrics say what happened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from orchestrator.gateway import toolcalls as tc
from tests.e2e.gateway_util import gateway_profile, metric, up

pytestmark = pytest.mark.engines

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 40},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What's the weather in Lisbon right now?"}]


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)


def as_dicts(calls: Any) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls or []]


def request() -> dict[str, Any]:
    return {"model": "smollm", "messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required"}


def gateway_log(env: Any) -> str:
    return "\n".join(p.read_text() for p in (env.state / "logs").glob("*_gateway.log"))


@pytest.fixture
def deployment(env: Any, smollm: Path, gemma: Path) -> Any:
    profile, port = gateway_profile(env, "tools", [
        {"name": "smollm", "model": {"path": str(smollm), "served_name": "smollm"}, "context": 4096,
         "tool_calls": {"retries": 1}},
        {"name": "smollm-esc", "model": {"path": str(smollm), "served_name": "smollm-esc"}, "context": 4096,
         "tool_calls": {"retries": 0, "constrained": False, "escalate_to": "gemma"}},
        {"name": "gemma", "model": {"path": str(gemma), "served_name": "gemma"}, "context": 4096,
         "tool_calls": {"retries": 0}}])
    up(env, profile)
    try:
        yield port
    finally:
        env.run("down", str(profile))


def test_tool_calls_through_the_gateway(env: Any, deployment: int) -> None:
    port = deployment
    c = client(port)
    # unary: the first answer is prose (collected.json), so the gateway retries; what it returns validates
    raw = c.chat.completions.with_raw_response.create(**request(), temperature=0, max_tokens=96)
    chat = raw.parse()
    outcome, attempts = raw.headers["x-orchestrator-tool-calls"], int(raw.headers["x-orchestrator-tool-attempts"])
    assert outcome == "retried" and attempts >= 2, (outcome, attempts)
    msg = {"content": chat.choices[0].message.content, "tool_calls": as_dicts(chat.choices[0].message.tool_calls)}
    assert msg["tool_calls"] and tc.check(request(), msg).ok
    assert chat.choices[0].finish_reason == "tool_calls"

    # streamed: chunk format the openai client assembles into the same kind of call
    names, args, finish = [], [], None
    for chunk in c.chat.completions.create(**request(), temperature=0, max_tokens=96, stream=True):
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            if d.function and d.function.name:
                names.append(d.function.name)
                args.append("")
            if d.function and d.function.arguments:
                args[-1] += d.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    streamed = {"tool_calls": [tc.make_call(n, a) for n, a in zip(names, args, strict=True)]}
    assert tc.check(request(), streamed).ok

    # a request without tools is the plain relay: streamed as it comes, no tool-call header
    plain = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
        "model": "smollm", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8})
    assert plain.status_code == 200 and "x-orchestrator-tool-calls" not in plain.headers

    # escalation: smollm-esc has no retries and no constrained retry, so its prose goes to gemma
    body = {**request(), "model": "smollm-esc", "temperature": 0, "max_tokens": 96}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
    outcome = r.headers["x-orchestrator-tool-calls"]
    if r.status_code == 200:
        assert outcome == "escalated" and r.headers["x-orchestrator-server"] == "gemma"
        assert tc.check(body, tc.message_of(r.json()) or {}).ok
    else:           # gemma failed too: a clear error, never the invalid call
        assert r.status_code == 502 and outcome == "failed", r.text
        assert r.json()["error"]["type"] == "tool_call_error" and r.json()["error"]["errors"]
    assert "escalated to gemma" in gateway_log(env)

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    assert metric(text, "gateway_tool_calls_total", server="smollm", outcome="retried") == 2
    assert metric(text, "gateway_tool_call_failures_total", server="smollm", kind="no_call") >= 2
    assert metric(text, "gateway_tool_call_failures_total", server="smollm-esc", kind="no_call") == 1
    log = gateway_log(env)
    assert "attempt 1 on smollm invalid (no_call" in log
    assert "Lisbon" not in log and json.dumps(WEATHER) not in log      # the log names kinds, never content
