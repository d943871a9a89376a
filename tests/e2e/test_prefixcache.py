"""The prefix-cache doctor on a real llama-server (llama.cpp b11434, Gemma 3 270M) behind the gateway,
driven with the official openai client: a conversation that appends (high reuse), one with a
timestamp in the system prompt, one that reorders its tools, one that edits an earlier message — each
diagnosed, and the engine's own count of reused tokens (`timings.cache_n`, read by the client) the one
the report holds; the report's reusable count is the common prefix on the engine's own tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.gateway_util import gateway_profile, metric, up

pytestmark = pytest.mark.engines

INSTRUCTIONS = ("You are the build assistant of the ACME monorepo. Answer in one short sentence. Prefer the "
                "tools over guessing; never invent file names; cite the file you read. ") * 6
CLIENT = "doctor-test"


def tool(name: str, description: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"path": {"type": "string", "description": "a path in the repository"}},
        "required": ["path"]}}}


# Gemma 3 270M's GGUF carries no chat template; this one renders the tools (first, as many templates do)
# and the messages ChatML-style.
TEMPLATE = """{%- if tools %}<|im_start|>system
Tools:
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
TOOLS = [tool("read_file", "Read a file of the repository"), tool("list_dir", "List a folder of the repository"),
         tool("run_tests", "Run the tests under a folder")]


@pytest.fixture
def engine_built() -> None:
    from orchestrator.provision import builds as provision

    provision.build("llama.cpp", "cpu")


def records(env, deployment: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The doctor's records once it has judged n requests (it works after each answer)."""
    from orchestrator.gateway.cachereport import read_records

    deadline = time.monotonic() + timeout
    while True:
        got = list(read_records(env.state, deployment))
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


class Conversation:
    def __init__(self, c: openai.OpenAI, model: str, system: str, first: str,
                 tools: list[dict[str, Any]] | None = None) -> None:
        self.c, self.model, self.tools = c, model, tools
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user",
                                                                                       "content": first}]
        self.timings: list[dict[str, Any]] = []

    def ask(self) -> str:
        extra: dict[str, Any] = {"tools": self.tools} if self.tools else {}
        r = self.c.chat.completions.create(model=self.model, messages=self.messages,  # type: ignore[arg-type]
                                           max_tokens=6, temperature=0, user=CLIENT, **extra)
        self.timings.append((r.model_extra or {})["timings"])
        return r.choices[0].message.content or ""

    def turn(self, user: str) -> None:
        answer = self.ask()
        self.messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": user}]


def check_reuse_matches_engine(recs: list[dict[str, Any]], convo: Conversation) -> None:
    """What the report says the engine reused is what the engine told the client."""
    assert [r["cached"] for r in recs] == [t["cache_n"] for t in convo.timings]
    assert [r["prompt"] for r in recs] == [t["cache_n"] + t["prompt_n"] for t in convo.timings]
    assert all(r["exact"] for r in recs), "the prompts were not tokenized by the engine"


def test_doctor_diagnoses_four_conversations_on_real_llama_cpp(engine_built: None, env, gemma: Path) -> None:
    template = env.tmp / "template.jinja"
    template.write_text(TEMPLATE)
    profile, port = gateway_profile(env, "pfx", [{"name": "g", "model": {"path": str(gemma),
                                                                        "served_name": "gemma"},
                                                  "context": 4096,
                                                  "extra_args": ["--jinja", "--chat-template-file", str(template)]}])
    plan = json.loads(env.run("plan", str(profile), "--json").stdout)
    swa_full = "--swa-full" in plan["servers"][0]["argv"]
    up(env, profile)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        seen = 0

        # 1. appends: every turn reuses the whole previous prompt
        a = Conversation(c, "gemma", INSTRUCTIONS, "Where are the gateway's tests?")
        a.turn("And the fixtures?")
        a.turn("Which one starts llama-server?")
        a.ask()
        recs = records(env, "pfx", seen + 3)[seen:]
        seen += 3
        check_reuse_matches_engine(recs, a)
        assert recs[0]["reference"] == "none" and recs[0]["causes"] == []
        for r in recs[1:]:
            assert r["reference"] == "conversation" and r["reusable"] > 100
            if swa_full:
                assert r["causes"] == [], r
                assert r["cached"] >= r["reusable"] - 2 >= r["prompt"] * 0.6, r
            else:           # the planner could not afford --swa-full: the report must say so
                assert [x["kind"] for x in r["causes"]] in ([], ["swa"]), r

        # 2. a clock in the system prompt: the reuse stops at the minute that changed
        stamp = "Current time: 2026-12-03 07:54 UTC. "
        b = Conversation(c, "gemma", stamp + INSTRUCTIONS, "What does orchestrate up do?")
        b.turn("And down?")
        b.messages[0]["content"] = stamp.replace("07:54", "07:55") + INSTRUCTIONS
        b.ask()
        recs = records(env, "pfx", seen + 2)[seen:]
        seen += 2
        check_reuse_matches_engine(recs, b)
        cause = recs[1]["causes"][0]
        assert cause["kind"] == "system_changed" and cause["where"] == "system prompt", recs[1]
        assert cause["looks_like"] == "a timestamp" and cause["char"] == stamp.index("07:54") + 4
        assert "'2026-12-03 07:55' vs '2026-12-03 07:54'" in cause["detail"]
        assert recs[1]["reusable"] < 40 < recs[1]["broken"], recs[1]    # only the template header and "Current time"
        assert cause["tokens"] == recs[1]["broken"] and cause["seconds"] > 0
        if swa_full:
            assert abs(recs[1]["cached"] - recs[1]["reusable"]) <= 2, recs[1]

        # 3. the same tools in another order
        t = Conversation(c, "gemma", INSTRUCTIONS, "Run the unit tests, please.", tools=list(TOOLS))
        t.turn("Now list tests/e2e.")
        t.tools = [TOOLS[1], TOOLS[0], TOOLS[2]]
        t.ask()
        recs = records(env, "pfx", seen + 2)[seen:]
        seen += 2
        check_reuse_matches_engine(recs, t)
        kinds = [x["kind"] for x in recs[1]["causes"]]
        assert kinds and kinds[0] == "tools_reordered", json.dumps([recs, t.timings])
        assert "['list_dir', 'read_file', 'run_tests'] now" in recs[1]["causes"][0]["detail"]
        assert recs[1]["broken"] > 0

        # 4. an earlier message edited
        e = Conversation(c, "gemma", INSTRUCTIONS, "How many servers does the quickstart start?")
        e.turn("And the gateway example?")
        e.turn("Which port does it use?")
        e.messages[3]["content"] = "And the gateway example, in examples/?"
        e.ask()
        recs = records(env, "pfx", seen + 3)[seen:]
        seen += 3
        check_reuse_matches_engine(recs, e)
        cause = recs[2]["causes"][0]
        assert cause["kind"] == "history_edited" and cause["where"] == "message 3 (user)", recs[2]
        assert "message 3 (user) differs at char 23" in cause["detail"]
        # everything up to the edit was reusable, and (with --swa-full) reused
        assert recs[2]["reusable"] > recs[1]["reusable"] * 0.8
        if swa_full:
            assert abs(recs[2]["cached"] - recs[2]["reusable"]) <= 2, recs[2]

        # /metrics and the report agree with the records
        import httpx

        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        all_recs = records(env, "pfx", seen)
        assert metric(text, "gateway_prefix_reused_tokens_total", model="gemma", client=f"user:{CLIENT}") == \
            sum(r["cached"] for r in all_recs)
        assert metric(text, "gateway_prefix_lost_tokens_total", cause="system_changed") > 0
        report = env.run("cache-report", "pfx", "--json")
        assert report.returncode == 0, report.stderr
        summary = json.loads(report.stdout)
        assert summary["requests"] == seen and len(summary["conversations"]) == 4
        found = {c["kind"] for c in summary["causes"]}
        assert {"system_changed", "tools_reordered", "history_edited"} <= found
        text_report = env.run("cache-report", str(profile), "--since", "1h")
        assert "looks like a timestamp" in text_report.stdout and "tools_reordered" in text_report.stdout
    finally:
        assert env.run("down", str(profile)).returncode == 0
